"""The training engine: optimizer recipe, exact resume, device/process independence, learning,
sampling."""

import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import config_flags
from conftest import tiny_config
from ddpm_jax import data
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import train


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_optimizer_is_the_papers_recipe():
  config = tiny_config(training__warmup_steps=5000, training__learning_rate=2e-4)
  tx, lr_fn = state_lib.make_optimizer(config.training)
  assert (
    float(lr_fn(0)) == 0.0
    and float(lr_fn(2500)) == pytest.approx(1e-4)
    and float(lr_fn(10**6)) == pytest.approx(2e-4)
  )
  # Global-norm clipping at 1.0 happens before Adam: a huge gradient gives the same first update as
  # a clipped one.
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  g = {"w": jnp.array([300.0, 400.0, 0.0])}
  u_big, _ = tx.update(g, state, params)
  u_clip, _ = tx.update({"w": g["w"] / 500.0}, state, params)
  np.testing.assert_allclose(u_big["w"], u_clip["w"], rtol=1e-6)


def test_ema_starts_at_params_and_follows_the_decay():
  config = tiny_config()
  _, model, tx, _ = state_lib.build(config)
  state = state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config))
  for p, e in zip(leaves(state.params), leaves(state.ema_params)):
    np.testing.assert_array_equal(p, e)
  new = state_lib.ema_update({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, 0.9999)
  np.testing.assert_allclose(new["a"], 0.9999)


def test_per_example_randomness_does_not_depend_on_the_split():
  key = jax.random.key(0)
  full = train.per_example_randomness(key, jnp.arange(8), num_timesteps=10, shape=(2, 2, 1))
  halves = [
    train.per_example_randomness(key, jnp.arange(4) + 4 * i, num_timesteps=10, shape=(2, 2, 1))
    for i in range(2)
  ]
  np.testing.assert_array_equal(full[0], np.concatenate([h[0] for h in halves]))
  np.testing.assert_array_equal(full[1], np.concatenate([h[1] for h in halves]))


def _train(config, workdir):
  return train.train(config, str(workdir))


def test_stop_and_resume_equals_uninterrupted_bitwise(tmp_path):
  full = _train(tiny_config(training__num_steps=6, model__dropout=0.1), tmp_path / "full")
  _train(tiny_config(training__num_steps=2, model__dropout=0.1), tmp_path / "split")
  resumed = _train(tiny_config(training__num_steps=6, model__dropout=0.1), tmp_path / "split")
  assert int(resumed.step) == int(full.step) == 6
  for a, b in zip(leaves(full), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # The resumed run read the data from where the first one stopped (not from the start again):
  # a run that restarts the data stream at step 2 ends elsewhere.
  assert os.path.exists(tmp_path / "split" / "checkpoints" / "2")


def test_resume_from_a_checkpoint_written_while_batches_were_read_ahead_equals_uninterrupted(
  tmp_path,
):
  """The trainer reads the next dispatch's batches before a checkpoint is written (device prefetch);
  the checkpoint must hold the data position of the steps taken. Resume from the middle of a run
  (2 steps per dispatch, an odd total) and end bitwise where the uninterrupted run ends."""
  config = lambda: tiny_config(
    training__num_steps=7, training__steps_per_dispatch=2, training__checkpoint_every=2
  )
  full = _train(config(), tmp_path / "full")
  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  for step in (4, 6, 7):
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / str(step))
  resumed = _train(config(), tmp_path / "cut")
  assert int(resumed.step) == int(full.step) == 7
  for a, b in zip(leaves(full), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_model(tmp_path):
  _train(tiny_config(training__num_steps=2), tmp_path)
  with pytest.raises(ValueError, match=r"model\.ch: 32 -> 64"):
    _train(tiny_config(training__num_steps=4, model__ch=64), tmp_path)
  with pytest.raises(ValueError, match="num_timesteps"):
    _train(tiny_config(training__num_steps=4, diffusion__num_timesteps=20), tmp_path)


def test_non_finite_loss_stops_without_writing_a_checkpoint(tmp_path):
  _train(tiny_config(training__num_steps=2), tmp_path)
  # An absurd learning rate drives the loss to infinity within a few steps.
  config = tiny_config(
    training__num_steps=40,
    training__learning_rate=1e30,
    training__warmup_steps=0,
    training__grad_clip=1e30,
    training__log_every=1,
    training__checkpoint_every=1,
  )
  with pytest.raises(train.NonFiniteError, match=r"at step \d+"):
    _train(config, tmp_path)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  _, model, tx, _ = state_lib.build(config)
  manager = checkpoint.make_manager(str(tmp_path), keep=10, read_only=True)
  for step in steps:
    state = checkpoint.restore(
      manager,
      abstract_state=state_lib.abstract_state(
        model, tx, shape=state_lib.image_shape(config), mesh=parallel.make_mesh()
      ),
      step=step,
    )
    assert all(np.isfinite(x).all() for x in leaves(state.params)), step


def test_training_on_digits_learns_and_samples_look_like_the_data(tmp_path):
  """A short run on the built-in digits: the loss falls far below its start, and samples have the
  data's pixel statistics (the values are printed; see pytest -s)."""
  config = tiny_config(
    training__num_steps=300,
    training__batch_size=32,
    training__learning_rate=2e-3,
    training__warmup_steps=20,
    training__log_every=50,
    training__checkpoint_every=300,
    training__ema_decay=0.99,
    diffusion__num_timesteps=50,
    diffusion__beta_start=2e-3,
    diffusion__beta_end=0.4,
    training__num_grid_samples=0,
  )
  losses = []
  original = train._Logger.report

  def spy(self, step):
    original(self, step)
    losses.append(self.last_loss)

  train._Logger.report = spy
  try:
    state = _train(config, tmp_path)
  finally:
    train._Logger.report = original
  assert losses[-1] < 0.4 * losses[0], losses
  d, model, _, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  fn = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
  samples = sampling.generate(
    fn, state.ema_params, key=jax.random.key(1), num_samples=256, batch_size=128, mesh=mesh
  )
  real = np.stack([data.load_images(config.data, split="train")[i] for i in range(1797)])
  s, r = samples.astype(np.float64) / 255, real.astype(np.float64) / 255
  print(
    f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; mean pixel {s.mean():.3f} (data {r.mean():.3f}); "
    f"ink > 0.5 {(s > 0.5).mean():.3f} (data {(r > 0.5).mean():.3f}); per-image mean std "
    f"{s.mean(axis=(1, 2, 3)).std():.3f} (data {r.mean(axis=(1, 2, 3)).std():.3f})"
  )
  assert abs(s.mean() - r.mean()) < 0.08, (s.mean(), r.mean())
  assert abs((s > 0.5).mean() - (r > 0.5).mean()) < 0.1, ((s > 0.5).mean(), (r > 0.5).mean())
  # Samples are not all alike: their per-image means spread like the data's.
  assert s.mean(axis=(1, 2, 3)).std() > 0.3 * r.mean(axis=(1, 2, 3)).std()


def test_sampler_is_one_loop_whose_size_does_not_depend_on_T():
  """The network appears once in the compiled sampler (inside the loop), not T times."""
  config = tiny_config()
  mesh = parallel.make_mesh()
  counts = []
  for T in (10, 100):
    config.diffusion.num_timesteps = T
    d, model, tx, _ = state_lib.build(config)
    params = jax.eval_shape(
      # called right here, in this iteration: model and tx are this T's
      lambda: state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config))  # noqa: B023
    ).ema_params
    fn = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
    text = jax.jit(fn).lower(params, jax.random.key(0), jnp.arange(4)).as_text()
    counts.append((text.count("stablehlo.convolution"), text.count("stablehlo.while"), len(text)))
  (conv10, while10, len10), (conv100, while100, len100) = counts
  assert conv10 == conv100 and 0 < conv10 < 40  # the tiny U-Net has 17 convolutions
  assert while10 == while100  # (the text grows only by the T-long schedule constants)


def test_progressive_sampling_records_the_chain_and_ends_at_the_sample():
  config = tiny_config()
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  state = state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config))
  plain = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
  chained = sampling.make_sampler(
    model, d, mesh, image_shape=state_lib.image_shape(config), record_every=3
  )
  ids = sampling.sample_ids(0, 4, mesh)
  images, chain = chained(state.ema_params, jax.random.key(0), ids)
  np.testing.assert_array_equal(images, plain(state.ema_params, jax.random.key(0), ids))
  assert list(chain.timesteps) == [9, 6, 3, 0]
  assert chain.x.shape == (4, 4, 8, 8, 1) and chain.x.dtype == np.uint8
  np.testing.assert_array_equal(chain.x[-1], images)


def test_any_number_of_samples_and_independent_of_batch_size():
  config = tiny_config()
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  params = state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config)).ema_params
  fn = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
  a = sampling.generate(fn, params, key=jax.random.key(0), num_samples=7, batch_size=4, mesh=mesh)
  b = sampling.generate(fn, params, key=jax.random.key(0), num_samples=7, batch_size=8, mesh=mesh)
  assert a.shape == (7, 8, 8, 1) and a.dtype == np.uint8
  np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)  # same ids -> same noise


# ---------------------------------------------------------------------------- devices and processes


def _probe(workdir, out, *, devices, steps=3, extra=(), env=None):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {})
  )
  script = os.path.join(REPO, "tests", "train_probe.py")
  return subprocess.Popen(
    [sys.executable, script, str(workdir), str(out), str(steps), *map(str, extra)],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _two_processes(workdir, out, *, steps):
  port = _free_port()
  procs = [_probe(workdir, out, devices=2, steps=steps, extra=(i, 2, port)) for i in range(2)]
  for p in procs:
    _finish(p)


def _finish(proc, timeout=600):
  output, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, output[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _assert_alike(reference, other, name, *, atol=2e-5):
  ref, other = np.load(reference), np.load(other)
  keys = [k for k in ref.files if k not in ("devices", "processes")]
  assert keys == [k for k in other.files if k not in ("devices", "processes")]
  for k in keys:
    # Adam turns reduction-order differences into ~1e-5 changes of weights whose gradients are
    # near zero; a skipped, repeated or reordered batch moves weights by ~lr = 1e-3.
    np.testing.assert_allclose(other[k], ref[k], rtol=2e-4, atol=atol, err_msg=f"{name}: {k}")


def test_one_device_four_devices_and_two_processes_train_alike_and_resume_on_each_other(tmp_path):
  """Same run (dropout on) on 1 device, 4 host devices, and 2 processes x 2 devices: same params;
  then each is resumed on another topology (4 -> 1, 2 x 2 -> 1, 1 -> 2 x 2) and continues as an
  uninterrupted 1-device run does, to float32 rounding (the global batch and the data stream are
  the same; only the gradient's reduction order changes)."""
  out = lambda name: tmp_path / f"{name}.npz"
  _finish(_probe(tmp_path / "w1", out("one3"), devices=1))
  _finish(_probe(tmp_path / "w4", out("four3"), devices=4))
  _two_processes(tmp_path / "wm", out("multi3"), steps=3)
  for name in ("one3", "four3", "multi3"):
    assert int(np.load(out(name))["devices"]) == (1 if name == "one3" else 4)
  assert int(np.load(out("multi3"))["processes"]) == 2
  _assert_alike(out("one3"), out("four3"), "four3")
  _assert_alike(out("one3"), out("multi3"), "multi3")
  # On another topology, from step 3 to step 5.
  _finish(_probe(tmp_path / "ref", out("ref5"), devices=1, steps=5))
  _finish(_probe(tmp_path / "w4", out("four_then_one"), devices=1, steps=5))
  _finish(_probe(tmp_path / "wm", out("multi_then_one"), devices=1, steps=5))
  _two_processes(tmp_path / "w1", out("one_then_multi"), steps=5)
  assert int(np.load(out("one_then_multi"))["processes"]) == 2
  for name in ("four_then_one", "multi_then_one", "one_then_multi"):
    _assert_alike(out("ref5"), out(name), name, atol=1e-4)
  # A global batch that does not divide the new device count: one sentence, nothing written.
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.main",
      "--config=configs/digits.py",
      f"--workdir={tmp_path / 'ref'}",
      *config_flags(tiny_config(model__dropout=0.1), "data", "model", "diffusion", "training"),
      "--config.training.num_steps=7",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3"),
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert (
    "config.training.batch_size = 8 is not divisible by the number of devices (3)" in result.stderr
  )


def test_training_reads_a_tfds_dataset(tmp_path):
  """The TFDS path end to end (cifar10 layout), on tfds.testing.mock_data's generated examples."""
  tfds = data._import_tfds()
  config = tiny_config(
    data__dataset="cifar10",
    data__image_size=32,
    data__num_channels=3,
    data__random_flip=True,
    data__tfds_data_dir=str(tmp_path / "tfds"),
    model__attn_resolutions=(16,),
    training__num_steps=2,
    training__num_grid_samples=0,
  )
  with tfds.testing.mock_data(num_examples=32):
    state = _train(config, tmp_path / "w")
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in leaves(state.params))


def test_several_steps_per_dispatch_equal_one_at_a_time(tmp_path):
  one = _train(tiny_config(training__num_steps=4, training__num_grid_samples=0), tmp_path / "one")
  two = _train(
    tiny_config(
      training__num_steps=4, training__steps_per_dispatch=2, training__num_grid_samples=0
    ),
    tmp_path / "two",
  )
  assert int(two.step) == 4
  # Float order differs between the two programs; Adam turns that into ~1e-6 changes of near-zero
  # weights, while a skipped or repeated step moves weights by ~lr = 1e-3.
  for a, b in zip(leaves(one), leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_a_run_too_short_for_its_ema_warns_and_names_a_decay_that_would_do(caplog):
  """The EMA starts at the random initial weights (no bias correction, as in the paper): after
  600 steps at 0.999 it still holds 55% of them, and its samples are noise."""
  short = tiny_config(training__num_steps=600, training__ema_decay=0.999).training
  with caplog.at_level(logging.WARNING):
    train.warn_if_ema_too_slow(short)
  assert "keeps 55% of the initial random weights" in caplog.text
  assert "--config.training.ema_decay=0.9923" in caplog.text  # 0.9923 ** 600 < 1%
  caplog.clear()
  from ddpm_jax.configs import cifar10  # pylint: disable=g-import-not-at-top
  from ddpm_jax.configs import digits  # pylint: disable=g-import-not-at-top

  for config in (cifar10.get_config(), digits.get_config()):  # the paper's and the README's runs
    with caplog.at_level(logging.WARNING):
      train.warn_if_ema_too_slow(config.training)
  assert not caplog.text
