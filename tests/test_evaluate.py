"""--mode=bpd, --mode=fid and --mode=evaluate_watch on a tiny trained digits model: results,
resumption after an interruption (a SIGKILL for FID), the worker's bookkeeping, and the user
errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from conftest import write_test_inception_weights
from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import bpd as bpd_eval
from ddpm_jax.evaluation import fid as fid_eval
from ddpm_jax.evaluation import results
from ddpm_jax.evaluation import samples as samples_eval
from ddpm_jax.evaluation import watch as watch_eval
from ddpm_jax.metrics import fid as fid_lib

REFERENCE_FRECHET_DISTANCE = fid_lib.frechet_distance  # before any test replaces it

T = 10  # tiny_config's diffusion steps


def eval_config(workdir_root, weights="", **overrides):
  """tiny_config with evaluation sizes a CPU test can afford (Inception costs ~0.4 s per image
  here)."""
  config = tiny_config()
  ev = config.evaluation
  ev.split, ev.num_examples, ev.batch_size = "train", 10, 4  # bpd batches [0, 4), [4, 8), [8, 10)
  ev.num_fid_samples, ev.sample_chunk_size = (
    12,
    5,
  )  # chunks [0, 5), [5, 10), [10, 12); IS: 10 splits of 1-2
  ev.fid_reference_splits, ev.num_fid_reference = ("train", "test"), 4
  ev.inception_weights = str(weights)
  ev.stats_dir = str(workdir_root / "fid_stats")
  ev.watch_modes = ("bpd",)
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def cli_flags(config):
  """Flags that turn configs/digits.py into `config`; tuples of strings are quoted, as a user types
  them."""
  flags = config_flags(config, "data", "model", "diffusion", "training", "sampling")
  for key, value in config.evaluation.items():
    value = repr(tuple(value)) if isinstance(value, tuple) else value
    flags.append(f"--config.evaluation.{key}={value}")
  return ["--config=configs/digits.py", *flags]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def trained(root):
  """A workdir with checkpoints at steps 2 and 4 of the tiny model (copied by each test that
  writes)."""
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  workdir = root / "trained"
  train.train(tiny_config(), str(workdir))
  return workdir


def copy_of(trained, path):
  shutil.copytree(trained, path, ignore=shutil.ignore_patterns("eval", "samples", "events.*"))
  return path


@pytest.fixture(scope="module")
def inception_weights(root):
  return write_test_inception_weights(str(root / "inception_with_logits.npz"))


def load_json(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- bits/dim


def test_bpd_cli_writes_a_consistent_bound_plot_and_scalars(trained, root):
  workdir = copy_of(trained, root / "bpd_cli")
  result = run_cli(*cli_flags(eval_config(root)), f"--workdir={workdir}", "--mode=bpd")
  assert result.returncode == 0, result.stderr[-3000:]
  r = load_json(workdir / "eval" / "bpd_4_train.json")
  assert r["step"] == 4 and r["num_examples"] == 10 and r["num_timesteps"] == T
  assert len(r["terms_bpd"]) == len(r["mse_pred_xstart"]) == T
  total, prior = r["bits_per_dim"]["mean"], r["prior_bpd"]["mean"]
  assert total == pytest.approx(sum(r["terms_bpd"]) + prior, rel=1e-12)
  assert r["rate_bpd"]["mean"] + r["distortion_bpd"]["mean"] == pytest.approx(total, rel=1e-12)
  assert r["distortion_bpd"]["mean"] == pytest.approx(r["terms_bpd"][0], rel=1e-12)
  assert r["decoder_bpd_L0"] == r["distortion_bpd"]
  assert 0 < r["bits_per_dim"]["stderr"] < total and prior > 0
  assert Image.open(workdir / "eval" / r["plot"]).size == (900, 560)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "eval"))


def test_bpd_matches_calc_bpd_loop_and_resumes_with_the_same_numbers(trained, root, monkeypatch):
  """An interruption after the first batch keeps that batch's file; the resumed run computes only
  the rest and equals both an uninterrupted run and calc_bpd_loop applied image by image to the EMA
  params."""
  config = eval_config(root)
  plain = bpd_eval.evaluate(config, str(copy_of(trained, root / "bpd_plain")))
  workdir = copy_of(trained, root / "bpd_resume")
  real_part, calls = bpd_eval._part, []

  def interrupted_after_one_batch(*args, **kwargs):
    if calls:
      raise KeyboardInterrupt
    calls.append(kwargs["start"])
    return real_part(*args, **kwargs)

  monkeypatch.setattr(bpd_eval, "_part", interrupted_after_one_batch)
  with pytest.raises(KeyboardInterrupt):
    bpd_eval.evaluate(config, str(workdir))
  parts = workdir / "eval" / "bpd_4_train_seed0_parts"
  first = parts / "examples_0000000_0000004.npz"
  assert sorted(os.listdir(parts)) == ["examples_0000000_0000004.npz", "settings.json"]
  kept = (first.read_bytes(), os.stat(first).st_mtime_ns)

  calls.clear()
  monkeypatch.setattr(
    bpd_eval, "_part", lambda *a, **k: calls.append(k["start"]) or real_part(*a, **k)
  )
  resumed = bpd_eval.evaluate(config, str(workdir))
  assert calls == [4, 8]
  assert (first.read_bytes(), os.stat(first).st_mtime_ns) == kept
  a, b = load_json(plain), load_json(resumed)
  for key in (
    "bits_per_dim",
    "prior_bpd",
    "rate_bpd",
    "distortion_bpd",
    "terms_bpd",
    "mse_pred_xstart",
  ):
    assert a[key] == b[key], key

  # Independently: calc_bpd_loop on each image with its own key, on the restored EMA parameters.
  built = state_lib.build(config)
  d, model = built.diffusion, built.model
  params, _ = checkpoint.restore_ema_params(
    config, str(workdir), built=built, mesh=parallel.make_mesh()
  )
  x = images.to_model_input(
    next(data.eval_batches(config.data, split="train", batch_size=10, num_examples=10))
  )
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  model_fn = lambda x_t, t: model.apply(params, x_t, t, train=False)
  bound = jax.jit(lambda x, k: dm.calc_bpd_loop(d, model_fn, x_start=x, key=k).total_bpd[0])
  totals = [float(bound(x[i : i + 1], jax.random.fold_in(key, i))) for i in range(10)]
  assert b["bits_per_dim"]["mean"] == pytest.approx(np.mean(totals), rel=1e-5)


# ----------------------------------------------------------------------------- FID


def low_rank_frechet_distance(mu1, sigma1, mu2, sigma2, **_):
  """The Frechet distance, exact when sigma1 has rank < 64 (statistics of a few images): tr
  sqrt(sigma1 sigma2) from 64x64 matrices in the range of sigma1 instead of a 2048x2048 sqrtm, which
  takes 30-90 s on this shared 2-core machine. Checked against fid.frechet_distance below; the
  metrics tests check
  that
  one."""
  q, _ = np.linalg.qr(sigma1 @ np.random.default_rng(0).normal(size=(len(mu1), 64)))
  w, v = np.linalg.eigh(q.T @ sigma1 @ q)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (q.T @ sigma2 @ q) @ root), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def test_the_low_rank_frechet_distance_equals_the_reference_one():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(12, 96)), rng.normal(0.3, 2.0, size=(4, 96))
  stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
  assert low_rank_frechet_distance(*stats[0], *stats[1]) == pytest.approx(
    REFERENCE_FRECHET_DISTANCE(*stats[0], *stats[1]), rel=1e-4
  )


@pytest.fixture(scope="module")
def fast_fid():
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(fid_lib, "frechet_distance", low_rank_frechet_distance)
    yield


@pytest.fixture(scope="module")
def fid_run(trained, root, inception_weights, fast_fid):
  """One uninterrupted --mode=fid (in process): (workdir, result path)."""
  workdir = copy_of(trained, root / "fid_plain")
  return workdir, fid_eval.evaluate(eval_config(root, inception_weights), str(workdir))


def chunk_paths(workdir):
  folder = workdir / "eval" / "fid_4_ancestral10_seed0"
  return folder, sorted(
    p for p in folder.iterdir() if p.name.startswith("chunk_") and p.suffix == ".npz"
  )


def test_fid_writes_fid_vs_both_splits_is_and_the_sample_record(fid_run, root, inception_weights):
  workdir, path = fid_run
  r = load_json(path)
  assert os.path.basename(path) == "fid_4_ancestral10.json"
  assert (
    r["step"] == 4
    and r["num_samples"] == 12
    and r["sampler"] == {"method": "ancestral", "num_steps": T}
  )
  assert r["inception"]["resize"] == "tf" and r["inception"]["has_logits"]
  assert set(r["fid"]) == {"train", "test"} and all(
    np.isfinite(v) and v > 0 for v in r["fid"].values()
  )
  assert r["fid"]["train"] == r["fid"]["test"]  # the digits' two splits are the same images
  assert {s: ref["count"] for s, ref in r["reference"].items()} == {"train": 4, "test": 4}
  assert r["inception_score"]["splits"] == 10 and r["inception_score"]["mean"] >= 1.0
  assert Image.open(workdir / "eval" / r["grid"]).size[0] >= 256
  # The reference statistics are cached with their convention inside, and reused.
  stats = fid_lib.load_stats(r["reference"]["train"]["path"])
  assert (
    stats.meta["weights_hash"] == r["inception"]["weights_hash"] and stats.meta["split"] == "train"
  )
  assert stats.meta["resize"] == "tf" and stats.count == 4
  # Chunks hold samples 0..9 exactly as the sampler draws them alone (sample i depends on the seed
  # and i only).
  folder, chunks = chunk_paths(workdir)
  assert [p.name for p in chunks] == [
    "chunk_0000000_0000005.npz",
    "chunk_0000005_0000010.npz",
    "chunk_0000010_0000012.npz",
  ]
  drawn = np.concatenate([np.load(p)["arr_0"] for p in chunks])
  config = eval_config(root, inception_weights)
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  params, _ = checkpoint.restore_ema_params(config, str(workdir), built=built, mesh=mesh)
  alone = sampling.generate(
    sampling.from_config(config, built, mesh),
    params,
    key=samples_eval.sample_key(config),
    num_samples=12,
    batch_size=2,
    mesh=mesh,
  )
  np.testing.assert_array_equal(drawn, alone)
  # FID and IS recomputed from scratch: Inception outputs of those samples and of the first 4
  # digits.
  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  features = inception.make_feature_fn(
    inception.load_params(inception_weights), resize="tf", batch_size=4
  )
  pool3, logits = features(drawn)
  reference, _ = features(
    next(data.eval_batches(config.data, split="train", batch_size=4, num_examples=4))
  )
  expected = low_rank_frechet_distance(
    pool3.mean(0), np.cov(pool3, rowvar=False), reference.mean(0), np.cov(reference, rowvar=False)
  )
  assert r["fid"]["train"] == pytest.approx(expected, rel=1e-6)
  assert r["inception_score"]["mean"] == pytest.approx(
    fid_lib.inception_score(logits, 10)[0], rel=1e-9
  )


def test_fid_killed_after_its_first_chunk_keeps_it_and_ends_as_an_uninterrupted_run(
  fid_run, trained, root, inception_weights, fast_fid
):
  """SIGKILL when the first chunk appears; chunks the killed run finished after it are removed, so
  the state is exactly 'killed after chunk 0' whatever the timing. The rerun must keep chunk 0 byte
  for byte (same mtime) and end with the chunks and numbers of the uninterrupted run."""
  config = eval_config(root, inception_weights)
  workdir = copy_of(trained, root / "fid_killed")
  folder = workdir / "eval" / "fid_4_ancestral10_seed0"
  first = folder / "chunk_0000000_0000005.npz"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "ddpm_jax.main",
      *cli_flags(config),
      f"--workdir={workdir}",
      "--mode=fid",
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate(timeout=60)
  assert first.exists(), stderr[-3000:]
  for path in folder.iterdir():
    if path.name.startswith("chunk_") and path != first:
      path.unlink()
  (folder / "chunk_0000005_0000010.npz.tmp").write_bytes(
    b"half a file"
  )  # a write the kill cut short
  kept = (first.read_bytes(), os.stat(first).st_mtime_ns, os.stat(first).st_ino)

  resumed = load_json(fid_eval.evaluate(config, str(workdir)))
  assert (first.read_bytes(), os.stat(first).st_mtime_ns, os.stat(first).st_ino) == kept
  _, plain_chunks = chunk_paths(fid_run[0])
  _, chunks = chunk_paths(workdir)
  assert [p.name for p in chunks] == [p.name for p in plain_chunks]
  for a, b in zip(plain_chunks, chunks):
    np.testing.assert_array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])
  plain = load_json(fid_run[1])
  assert resumed["fid"] == plain["fid"] and resumed["inception_score"] == plain["inception_score"]


def test_cached_reference_statistics_of_another_convention_are_refused(tmp_path, inception_weights):
  """A stats file at the cache path whose recorded convention differs (here: pytorch-fid's resize)
  is an error naming the key, never used silently."""
  config = eval_config(tmp_path, inception_weights)
  evaluator = fid_eval.FidEvaluator(
    config,
    str(tmp_path / "w"),
    built=state_lib.build(config),
    mesh=parallel.make_mesh(),
    scalars=results.Scalars(str(tmp_path / "w")),
  )
  params, _ = evaluator._load_inception()
  meta = {
    "dataset": "digits",
    "split": "train",
    "count": 4,
    "image_size": 8,
    "num_channels": 1,
    "weights_hash": params.weights_hash,
    "resize": "pytorch",
  }
  path = tmp_path / "fid_stats" / f"digits_train_8px_n4_tf_{params.weights_hash}.npz"
  fid_lib.save_stats(str(path), fid_lib.Stats(np.zeros(2048), np.eye(2048), 4, meta))
  with pytest.raises(ConfigError, match="resize = 'pytorch' \\(needed: 'tf'\\)"):
    evaluator.reference_stats("train")
  fid_lib.save_stats(
    str(path), fid_lib.Stats(np.zeros(2048), np.eye(2048), 4, dict(meta, resize="tf"))
  )
  stats, cached = evaluator.reference_stats("train")
  assert cached == str(path) and stats.count == 4


# ---------------------------------------------------------------------------- the evaluation worker


def test_watcher_evaluates_each_checkpoint_once_and_survives_one_deleted_mid_read(
  trained, root, monkeypatch
):
  """Checkpoints 2 and 4 exist; 2 vanishes while it is restored (the trainer's clean-up); during the
  first sleep the 'trainer' writes step 6, the final one. The worker evaluates 4 and 6 and stops; a
  second worker finds nothing to do."""
  workdir = copy_of(trained, root / "watch")
  config = eval_config(root, training__num_steps=6)
  real_restore, restored, now = checkpoint.restore, [], [0.0]

  def restore(
    manager, *, step=None, **kwargs
  ):  # orbax's read, with the trainer deleting step 2 under it
    restored.append(step)
    if step == 2:
      shutil.rmtree(workdir / "checkpoints" / "2")
    return real_restore(manager, step=step, **kwargs)

  def sleep(seconds):
    now[0] += seconds
    ckpts = workdir / "checkpoints"
    if not (ckpts / "6").exists():
      shutil.copytree(ckpts / "4", ckpts / "tmp6")
      os.rename(ckpts / "tmp6", ckpts / "6")

  monkeypatch.setattr(checkpoint, "restore", restore)
  done = watch_eval.watch(config, str(workdir), sleep=sleep, clock=lambda: now[0])
  assert restored == [2, 4, 6]
  assert set(done) == {"4", "6"} and load_json(workdir / "eval" / "done.json") == done
  assert done["6"]["bpd"] == "bpd_6_train.json" and (workdir / "eval" / "bpd_6_train.json").exists()

  restored.clear()
  assert watch_eval.watch(config, str(workdir), sleep=sleep, clock=lambda: now[0]) == done
  assert not restored


def test_watcher_stops_after_the_timeout_without_new_checkpoints(tmp_path, root):
  config = eval_config(root, evaluation__watch_timeout_secs=5, evaluation__watch_poll_secs=2)
  now = [0.0]
  sleeps = []

  def sleep(seconds):
    sleeps.append(seconds)
    now[0] += seconds

  assert watch_eval.watch(config, str(tmp_path), sleep=sleep, clock=lambda: now[0]) == {}
  assert sleeps == [2, 2, 2]


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
  "mode,overrides,message",
  [
    ("fid", {}, "inception_weights"),
    ("fid", {"evaluation__inception_weights": "/nonexistent/w.npz"}, "does not exist"),
    ("fid", {"evaluation__num_fid_samples": 0}, "num_fid_samples = 0 must be an integer >= 2"),
    ("fid", {"evaluation__fid_reference_splits": ("validation",)}, "'validation'"),
    ("fid", {"evaluation__fid_resize": "bicubic"}, "fid_resize"),
    ("bpd", {"evaluation__split": "validation"}, "'validation'"),
    ("bpd", {"evaluation__num_examples": 0}, "num_examples"),
    ("evaluate_watch", {"evaluation__watch_modes": ("fidd",)}, "watch_modes"),
  ],
)
def test_bad_settings_fail_before_any_work(tmp_path, root, mode, overrides, message):
  """ConfigError, which `main` prints as one sentence with exit status 1 (test_cli checks that
  path)."""
  from ddpm_jax import main  # pylint: disable=g-import-not-at-top

  config = eval_config(root, **overrides)
  with pytest.raises(ConfigError, match=message):
    main.run(config, str(tmp_path), mode)
  assert not (tmp_path / "eval").exists()


def test_results_with_other_settings_are_never_overwritten(tmp_path):
  storage.write_json(str(tmp_path / "bpd_4_train.json"), {"settings": {"num_examples": 10}})
  assert results.result_path(str(tmp_path), "bpd_4_train", {"num_examples": 10}).endswith(
    "bpd_4_train.json"
  )
  assert results.result_path(str(tmp_path), "bpd_4_train", {"num_examples": 20}).endswith(
    "bpd_4_train_1.json"
  )


def test_parts_computed_with_other_settings_are_refused(tmp_path):
  results.check_parts_dir(str(tmp_path / "p"), {"seed": 0}, what="samples")
  results.check_parts_dir(str(tmp_path / "p"), {"seed": 0}, what="samples")
  with pytest.raises(ConfigError, match="seed: 0 there, 1 now"):
    results.check_parts_dir(str(tmp_path / "p"), {"seed": 1}, what="samples")


def test_result_files_record_the_sampler_and_name_their_folders_by_it():
  config = tiny_config()  # T = 10
  assert sampling.record(config) == {"method": "ancestral", "num_steps": 10}
  config.sampling.method, config.sampling.num_steps, config.sampling.eta = "ddim", 5, 0.0
  record = sampling.record(config)
  assert record == {"method": "ddim", "num_steps": 5, "spacing": "uniform", "eta": 0.0}
  assert sampling.tag(record) == "ddim5_eta0.0_spacinguniform"
  config.sampling.method = "ancestral"
  assert sampling.tag(sampling.record(config)) == "ancestral5_spacinguniform"


# ----------------------------------------------------------------------------- FID/IS conventions


def test_the_paper_s_conventions_unrounded_fid_input_and_one_is_split_are_offered_and_recorded(
  fid_run, trained, root, inception_weights
):
  """fid_input = "float" feeds the Inception network the unrounded samples (clipped to [0, 255]),
  as the paper's TF code did; is_splits = 1 scores all samples at once (TF-GAN's, the paper's).
  Each result records its choice, and differs from the default one where the choice matters."""
  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  default = load_json(fid_run[1])
  assert default["fid_input"] == "uint8" and default["inception_score"]["splits"] == 10
  assert "rounded to uint8" in default["conventions"]["fid"]
  assert "10 splits" in default["conventions"]["inception_score"]
  config = eval_config(
    root, inception_weights, evaluation__fid_input="float", evaluation__is_splits=1
  )
  workdir = copy_of(trained, root / "fid_paper")
  r = load_json(fid_eval.evaluate(config, str(workdir)))
  assert r["fid_input"] == "float" and "unrounded" in r["conventions"]["fid"]
  assert r["inception_score"]["splits"] == 1 and "paper" in r["conventions"]["inception_score"]
  assert r["settings"]["fid_input"] == "float" and r["settings"]["is_splits"] == 1
  # The samples are the default run's before rounding: the same images to within half a level.
  folder = workdir / "eval" / "fid_4_ancestral10_seed0_float"
  unrounded = np.concatenate(
    [
      np.load(folder / f"chunk_{a:07d}_{b:07d}.npz")["arr_0"]
      for a, b in ((0, 5), (5, 10), (10, 12))
    ]
  )
  rounded = np.concatenate([np.load(p)["arr_0"] for p in chunk_paths(fid_run[0])[1]])
  assert unrounded.dtype == np.float32 and 0 <= unrounded.min() and unrounded.max() <= 255
  assert np.abs(unrounded - rounded).max() <= 0.5 + 1e-4 and not np.all(unrounded == rounded)
  # IS with one split, from the Inception logits of exactly those unrounded samples.
  features = inception.make_feature_fn(inception.load_params(inception_weights), batch_size=4)
  _, logits = features(unrounded)
  assert r["inception_score"]["mean"] == pytest.approx(
    fid_lib.inception_score(logits, 1)[0], rel=1e-5
  )
  assert r["fid"]["train"] != default["fid"]["train"]
