"""Evaluation drivers over saved checkpoints: sample dumps, the NLL bound (bits/dim), FID/IS, and a
worker that evaluates every new checkpoint of a training run.

Everything long is resumable: the bound is stored per batch and samples per chunk under
WORKDIR/eval, each written atomically (tmp file + os.replace), and the randomness of example /
sample i is a function of the seed and i only, so a resumed run gives the numbers of an
uninterrupted one.
"""

import hashlib
import json
import os
import time

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import plots
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError

IS_SPLITS = 10  # the Inception Score's splits, as in the paper and every reference implementation
WATCH_MODES = ("bpd", "fid")
_SAMPLE_KEY, _BPD_KEY = 3, 4  # fold_in constants of config.seed (2 is the training grid)


# ----------------------------------------------------------------------------- shared pieces


def restore_ema_params(config, workdir: str, *, model, tx, mesh, step: int = -1):
  """The EMA parameters of a checkpoint in `workdir` (newest when step = -1), and that step."""
  manager = checkpoint.make_manager(workdir, keep=1, read_only=True)
  step = checkpoint.resolve_step(manager, workdir, step)
  saved = checkpoint.read_config(workdir)
  if saved is not None:
    checkpoint.check_compatible(saved, config, source=f"the checkpoint in {workdir}")
  abstract = state_lib.abstract_state(model, tx, shape=state_lib.image_shape(config), mesh=mesh)
  state = checkpoint.restore(manager, abstract_state=abstract, step=step)
  return state.ema_params, step


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir` now (a fresh read-only listing, no
  locks)."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return []
  return sorted(checkpoint.make_manager(workdir, keep=1, read_only=True).all_steps())


def _make_eval_sampler(config, built, mesh):
  """The sampler FID draws with (the one place that chooses it): uint8 samples of global ids."""
  return sampling.make_sampler(
    built.model,
    built.diffusion,
    mesh,
    image_shape=state_lib.image_shape(config),
    clip_denoised=config.sampling.clip_denoised,
    **sampling.sampler_options(config.sampling, built.diffusion.num_timesteps),
  )


def _sampler_record(config) -> dict:
  """What result files record about the sampler (and what names sample folders): method, steps, and
  the spacing (when not every step is kept) and eta (DDIM) that change the samples."""
  record = sampling.describe(config.sampling, int(config.diffusion.num_timesteps))
  if record["num_steps"] == int(config.diffusion.num_timesteps):
    record.pop("spacing")  # every step kept: the spacing is moot
  return {k: v for k, v in record.items() if v is not None}


def _sampler_tag(record: dict) -> str:
  """'ancestral1000' (+ '_eta0.0'-style suffixes for any further settings): a folder-name-safe
  label."""
  extra = "".join(f"_{k}{v}" for k, v in sorted(record.items()) if k not in ("method", "num_steps"))
  return f"{record['method']}{record['num_steps']}{extra}".replace("/", "-").replace(" ", "")


def _sample_key(config):
  """The base key of sampling: sample i is drawn from fold_in(this, i), the same in every mode."""
  return jax.random.fold_in(jax.random.key(config.seed), _SAMPLE_KEY)


def _fresh_dir(path: str) -> str:
  """`path`, or `path_1`, `path_2`, ...: earlier sample dumps are never overwritten."""
  candidate, i = path, 0
  while epath.Path(candidate).exists():
    i += 1
    candidate = f"{path}_{i}"
  return candidate


def _progress_bar(total: int):
  bar = tqdm.tqdm(total=total, unit="img", desc="sampling", disable=jax.process_index() != 0)

  def update(done, _total, _seconds):
    bar.update(done - bar.n)
    if done >= total:
      bar.close()

  return update


def _write_json(path: str, value) -> str:
  """Writes JSON atomically: readers (and a resumed run) never see half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def _save_npz(path: str, **arrays) -> str:
  """np.savez, atomically (a killed run leaves at most a stray .tmp file, never a truncated
  .npz)."""
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **arrays)
  os.replace(path + ".tmp", path)
  return path


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _result_path(eval_dir: str, stem: str, settings: dict) -> str:
  """eval_dir/stem.json, or stem_1.json, ...: a result computed with other settings is never
  overwritten (the same settings give the same numbers, so that file is simply rewritten)."""
  for i in range(1000):
    path = os.path.join(eval_dir, f"{stem}{'' if i == 0 else f'_{i}'}.json")
    if not os.path.exists(path) or _read_json(path).get("settings") == settings:
      return path
  raise ConfigError(f"{eval_dir} holds 1000 results named {stem}_*.json; move some away.")


def _check_parts_dir(path: str, settings: dict, *, what: str) -> None:
  """Creates a folder of resumable parts with settings.json, or checks that an existing one
  matches."""
  meta = os.path.join(path, "settings.json")
  if os.path.exists(meta):
    saved = _read_json(meta)
    if saved != settings:
      diffs = ", ".join(
        f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now"
        for k in sorted(set(saved) | set(settings))
        if saved.get(k) != settings.get(k)
      )
      raise ConfigError(
        f"{path} holds {what} computed with other settings ({diffs}); move it away to "
        "start afresh, or evaluate with its settings."
      )
    return
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    _write_json(meta, settings)


def _mean_and_stderr(values) -> dict:
  """Mean and standard error of the mean (std with ddof 1 / sqrt(n); null for one value),
  float64."""
  values = np.asarray(values, np.float64)
  stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
  return {"mean": float(values.mean()), "stderr": stderr}


def _summary_writer(log_dir: str):
  """TensorBoard events in `log_dir` (process 0); None elsewhere."""
  if jax.process_index() != 0:
    return None
  from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top

  return tensorboard.SummaryWriter(log_dir)


def _local_rows(batch: np.ndarray) -> np.ndarray:
  """This process's block of a global batch (process p holds rows p*L .. (p+1)*L - 1)."""
  local = len(batch) // jax.process_count()
  return batch[jax.process_index() * local : (jax.process_index() + 1) * local]


# ----------------------------------------------------------------------------- sample dumps


def dump_samples(config, workdir: str) -> str | None:
  """Writes config.sampling.num_samples EMA samples of a checkpoint as samples.npz (uint8 NHWC, key
  `arr_0`), a PNG grid, and the progressive pictures (x_t chain and predicted x_0). Returns the
  folder."""
  c = config.sampling
  if c.num_samples < 1:
    raise ConfigError(f"config.sampling.num_samples must be >= 1, got {c.num_samples}.")
  parallel.check_batch_size(c.batch_size, what="config.sampling.batch_size")
  d, model, tx, _ = state_lib.build(config)
  record_every = sampling.record_interval(d.num_timesteps, c.progressive_every)
  mesh = parallel.make_mesh()
  params, step = restore_ema_params(
    config, workdir, model=model, tx=tx, mesh=mesh, step=c.checkpoint_step
  )
  shape = state_lib.image_shape(config)
  key = _sample_key(config)
  logging.info(
    "Sampling %d images from the EMA parameters of step %d (T = %d).",
    c.num_samples,
    step,
    d.num_timesteps,
  )

  sample_fn = sampling.make_sampler(
    model,
    d,
    mesh,
    image_shape=shape,
    clip_denoised=c.clip_denoised,
    **sampling.sampler_options(c, d.num_timesteps),
  )
  samples = sampling.generate(
    sample_fn,
    params,
    key=key,
    num_samples=c.num_samples,
    batch_size=c.batch_size,
    mesh=mesh,
    progress=_progress_bar(c.num_samples),
  )
  chain = None
  if c.num_progressive > 0:
    n = c.num_progressive
    chain_batch = parallel.round_up_to_devices(n)
    chain_fn = sampling.make_sampler(
      model,
      d,
      mesh,
      image_shape=shape,
      clip_denoised=c.clip_denoised,
      record_every=record_every,
      **sampling.sampler_options(c, d.num_timesteps),
    )
    _, chain = chain_fn(params, key, sampling.sample_ids(0, chain_batch, mesh))
    chain = jax.tree.map(lambda a: parallel.to_host(a)[:, :n] if a.ndim > 1 else a, chain)

  if jax.process_index() != 0:
    return None
  out = _fresh_dir(
    os.path.join(workdir, "samples", f"ckpt_{step}_n{c.num_samples}_seed{config.seed}")
  )
  epath.Path(out).mkdir(parents=True)
  with epath.Path(out, "samples.npz").open("wb") as f:  # WORKDIR may be a gs:// URL
    np.savez(f, arr_0=samples)
  images.save_png(os.path.join(out, "grid.png"), images.make_grid(samples[:256]))
  if chain is not None:
    images.save_png(os.path.join(out, "progressive_x0.png"), images.chain_grid(chain.pred_xstart))
    images.save_png(os.path.join(out, "chain_xt.png"), images.chain_grid(chain.x))
    epath.Path(out, "chain_timesteps.txt").write_text(
      " ".join(map(str, chain.timesteps.tolist())) + "\n"
    )
  logging.info(
    "Wrote %d samples to %s (samples.npz, grid.png%s).",
    c.num_samples,
    out,
    ", progressive_x0.png, chain_xt.png" if chain is not None else "",
  )
  return out


# ------------------------------------------------------------------------- the NLL bound (bits/dim)


def make_bpd_fn(d: dm.Diffusion, model, mesh, *, clip_denoised: bool):
  """Returns `bpd(params, key, images_uint8, ids) -> (terms [B, T], prior [B], mse [B, T])`,
  sharded.

  One compiled `calc_bpd_loop` (a scan over t) per batch; example i draws its noise from
  fold_in(key, i), so its terms do not depend on the batch it is in, the batch size or the number of
  devices.
  """

  def per_device(params, key, images_uint8, ids):
    model_fn = lambda x_t, t: model.apply(params, x_t, t, train=False)

    def one(x, i):
      r = dm.calc_bpd_loop(
        d, model_fn, x_start=x[None], key=jax.random.fold_in(key, i), clip_denoised=clip_denoised
      )
      return r.terms_bpd[0], r.prior_bpd[0], r.mse[0]

    return jax.vmap(one)(images.to_model_input(images_uint8), ids)

  batch = P(parallel.AXIS)
  return parallel.data_parallel(
    per_device, mesh, in_specs=(P(), P(), batch, batch), out_specs=(batch,) * 3
  )


def _bpd_part(bpd_fn, params, key, batch_uint8, *, start: int, batch_size: int, mesh) -> dict:
  """The bound of one batch (padded to batch_size, the padding dropped): per-example and per-t
  sums."""
  n = len(batch_uint8)
  padded = np.zeros((batch_size,) + batch_uint8.shape[1:], np.uint8)
  padded[:n] = batch_uint8
  ids = sampling.sample_ids(start, batch_size, mesh)
  terms, prior, mse = (
    parallel.to_host(a)[:n].astype(np.float64)
    for a in bpd_fn(params, key, parallel.global_batch(_local_rows(padded), mesh), ids)
  )
  return dict(
    total=terms.sum(axis=1) + prior,
    prior=prior,
    decoder=terms[:, 0],
    terms_sum=terms.sum(axis=0),
    mse_sum=mse.sum(axis=0),
  )


def _bpd_settings(config, step: int) -> dict:
  ev = config.evaluation
  return {
    "step": step,
    "split": ev.split,
    "num_examples": int(ev.num_examples),
    "seed": int(config.seed),
    "clip_denoised": bool(ev.clip_denoised),
    "dataset": config.data.dataset,
    "image_size": int(config.data.image_size),
    "num_timesteps": int(config.diffusion.num_timesteps),
  }


def _bpd_summary(parts: list[dict], *, settings: dict) -> dict:
  """The result record from the per-batch parts (all float64; every identity holds exactly)."""
  cat = lambda k: np.concatenate([p[k] for p in parts])
  n = sum(len(p["total"]) for p in parts)
  terms = np.sum([p["terms_sum"] for p in parts], axis=0) / n
  mse = np.sum([p["mse_sum"] for p in parts], axis=0) / n
  total, prior, decoder = cat("total"), cat("prior"), cat("decoder")
  return {
    "step": settings["step"],
    "split": settings["split"],
    "dataset": settings["dataset"],
    "num_examples": n,
    "num_timesteps": len(terms),
    "settings": settings,
    "bits_per_dim": _mean_and_stderr(total),
    "prior_bpd": _mean_and_stderr(prior),
    "decoder_bpd_L0": _mean_and_stderr(decoder),
    "rate_bpd": _mean_and_stderr(total - decoder),  # sum of the t >= 1 terms + prior
    "distortion_bpd": _mean_and_stderr(decoder),  # L0
    "distortion_rmse_0_255": float(
      np.sqrt(mse[0]) * 127.5
    ),  # RMSE of the t = 0 x0 prediction, 0..255
    "terms_bpd": terms.tolist(),  # mean over images of the term of each t (t = 0: L0)
    # mean over images of the MSE of the predicted x0 ([-1, 1] scale)
    "mse_pred_xstart": mse.tolist(),
  }


def _inception_score_record(logits) -> dict:
  """{"inception_score": {mean, std, splits}} of IS logits, or None and a note saying why not."""
  from ddpm_jax.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top

  if logits is None:
    return {
      "inception_score": None,
      "inception_score_note": "unavailable: the Inception weights have no "
      "classifier (pool3 only); convert a file with logits (pytorch-fid / torch-fidelity .pth)",
    }
  if len(logits) < IS_SPLITS:
    return {
      "inception_score": None,
      "inception_score_note": (
        f"unavailable: fewer samples ({len(logits)}) than splits ({IS_SPLITS})"
      ),
    }
  mean, std = fid_lib.inception_score(logits, IS_SPLITS)
  return {"inception_score": {"mean": mean, "std": std, "splits": IS_SPLITS}}


class Evaluator:
  """One model and device mesh; compiles each evaluation once and runs it on any checkpoint's EMA
  params."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.built = state_lib.build(config)
    self.mesh = parallel.make_mesh()
    self.eval_dir = os.path.join(workdir, "eval")
    self._bpd_fn = self._sample_fn = self._inception = self._writer = None

  def restore(self, step: int = -1):
    """(EMA params, step) of a checkpoint; the newest for step = -1."""
    return restore_ema_params(
      self.config, self.workdir, model=self.built.model, tx=self.built.tx, mesh=self.mesh, step=step
    )

  def run(self, mode: str, params, step: int) -> str:
    return {"bpd": self.bpd, "fid": self.fid}[mode](params, step)

  def _write_scalars(self, scalars: dict, step: int) -> None:
    """TensorBoard scalars in WORKDIR/eval (process 0; one event file per Evaluator)."""
    if self._writer is None:
      self._writer = _summary_writer(self.eval_dir)
    if self._writer is None:
      return
    for name, value in scalars.items():
      if value is not None:
        self._writer.scalar(name, value, step)
    self._writer.flush()

  # --- bits/dim

  def check_bpd_config(self) -> None:
    ev = self.config.evaluation
    parallel.check_batch_size(ev.batch_size, what="config.evaluation.batch_size")
    if ev.num_examples < 1:
      raise ConfigError(f"config.evaluation.num_examples must be >= 1, got {ev.num_examples}.")
    data.load_images(
      self.config.data, split=ev.split
    )  # an unknown split fails here, before any work

  def bpd(self, params, step: int) -> str:
    """Writes eval/bpd_<step>_<split>.json (+ .png) and TensorBoard scalars; returns the JSON
    path."""
    ev = self.config.evaluation
    self.check_bpd_config()
    settings = _bpd_settings(self.config, step)
    parts_dir = os.path.join(self.eval_dir, f"bpd_{step}_{ev.split}_seed{self.config.seed}_parts")
    _check_parts_dir(parts_dir, settings, what="per-batch bits/dim")
    if self._bpd_fn is None:
      self._bpd_fn = make_bpd_fn(
        self.built.diffusion, self.built.model, self.mesh, clip_denoised=ev.clip_denoised
      )
    key = jax.random.fold_in(jax.random.key(self.config.seed), _BPD_KEY)
    batches = data.eval_batches(
      self.config.data, split=ev.split, batch_size=ev.batch_size, num_examples=ev.num_examples
    )
    parts, start, resumed = [], 0, 0
    logging.info(
      "Bits/dim of step %d on %d images of split %r (T = %d).",
      step,
      ev.num_examples,
      ev.split,
      self.built.diffusion.num_timesteps,
    )
    with tqdm.tqdm(
      total=ev.num_examples, unit="img", desc="bits/dim", disable=jax.process_index() != 0
    ) as bar:
      for batch in batches:
        path = os.path.join(parts_dir, f"examples_{start:07d}_{start + len(batch):07d}.npz")
        if os.path.exists(path):
          with np.load(path) as f:
            part = {k: f[k] for k in f.files}
          resumed += len(batch)
        else:
          part = _bpd_part(
            self._bpd_fn, params, key, batch, start=start, batch_size=ev.batch_size, mesh=self.mesh
          )
          if jax.process_index() == 0:
            _save_npz(path, **part)
        parts.append(part)
        start += len(batch)
        bar.update(len(batch))
        bar.set_postfix(bpd=f"{np.concatenate([p['total'] for p in parts]).mean():.4f}")
    if resumed:
      logging.info("Resumed: %d of %d images were already done in %s.", resumed, start, parts_dir)
    result = _bpd_summary(parts, settings=settings)
    return self._write_bpd(result, step=step, parts_dir=parts_dir)

  def _write_bpd(self, result: dict, *, step: int, parts_dir: str) -> str:
    if jax.process_index() != 0:
      return ""
    path = _result_path(self.eval_dir, f"bpd_{step}_{result['split']}", result["settings"])
    plot = path[: -len(".json")] + ".png"
    T = result["num_timesteps"]
    plots.line_plot(
      plot,
      np.arange(T),
      {"L_t (t = 0: decoder L0)": result["terms_bpd"]},
      log_y=True,
      title=f"Bound terms per timestep: step {step}, {result['split']} split, "
      f"{result['num_examples']} images, total {result['bits_per_dim']['mean']:.3f} bits/dim",
      x_label="timestep t",
      y_label="bits/dim (mean over images)",
    )
    result = dict(
      result, plot=os.path.basename(plot), parts_dir=os.path.relpath(parts_dir, self.eval_dir)
    )
    _write_json(path, result)
    split = result["split"]
    self._write_scalars(
      {
        f"bpd_{split}/total": result["bits_per_dim"]["mean"],
        f"bpd_{split}/prior": result["prior_bpd"]["mean"],
        f"bpd_{split}/rate": result["rate_bpd"]["mean"],
        f"bpd_{split}/distortion": result["distortion_bpd"]["mean"],
      },
      step,
    )
    logging.info(
      "Step %d, %s split: %.4f +- %.4f bits/dim (rate %.4f, distortion %.4f, prior %.2g); wrote %s",
      step,
      split,
      result["bits_per_dim"]["mean"],
      result["bits_per_dim"]["stderr"] or 0.0,
      result["rate_bpd"]["mean"],
      result["distortion_bpd"]["mean"],
      result["prior_bpd"]["mean"],
      path,
    )
    return path

  # --- FID and IS

  def check_fid_config(self) -> None:
    """Every FID setting, checked before any sampling (an hour of samples must not end in a
    typo)."""
    ev, c = self.config.evaluation, self.config.sampling
    if ev.num_fid_samples < 2:
      raise ConfigError(
        f"config.evaluation.num_fid_samples must be >= 2 (FID needs a covariance), "
        f"got {ev.num_fid_samples}."
      )
    if ev.sample_chunk_size < 1:
      raise ConfigError(
        f"config.evaluation.sample_chunk_size must be >= 1, got {ev.sample_chunk_size}."
      )
    if ev.fid_resize not in ("tf", "pytorch"):
      raise ConfigError(
        f"config.evaluation.fid_resize must be 'tf' (the paper's TF graph) or 'pytorch' "
        f"(pytorch-fid), got {ev.fid_resize!r}."
      )
    if not ev.fid_reference_splits:
      raise ConfigError(
        "config.evaluation.fid_reference_splits is empty; name at least one split, e.g. ('train',)."
      )
    if ev.num_fid_reference < 0:
      raise ConfigError(
        f"config.evaluation.num_fid_reference must be >= 0 (0: the whole split), "
        f"got {ev.num_fid_reference}."
      )
    parallel.check_batch_size(c.batch_size, what="config.sampling.batch_size")
    parallel.check_batch_size(ev.batch_size, what="config.evaluation.batch_size")
    if jax.process_count() > 1 and (
      ev.sample_chunk_size % jax.process_count() or ev.num_fid_samples % jax.process_count()
    ):
      raise ConfigError(
        f"With {jax.process_count()} processes, config.evaluation.sample_chunk_size and "
        "num_fid_samples must be multiples of the process count."
      )
    for split in ev.fid_reference_splits:
      self._reference_count(split)  # an unknown split fails here
    self._load_inception()

  def _load_inception(self):
    """(InceptionParams, feature_fn), loaded once; a missing weights file is one sentence."""
    if self._inception is not None:
      return self._inception
    ev = self.config.evaluation
    how = (
      "get the standard weights file (see the README section 'Evaluation') and convert it once "
      "with `python -m ddpm_jax.metrics.convert_inception SRC OUT.npz`"
    )
    if not ev.inception_weights:
      raise ConfigError(
        "FID needs the Inception weights: set --config.evaluation.inception_weights=PATH.npz; "
        f"{how}."
      )
    if not os.path.isfile(ev.inception_weights):
      raise ConfigError(
        f"config.evaluation.inception_weights = {ev.inception_weights!r} does not exist; {how}."
      )
    from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top

    try:
      params = inception.load_params(ev.inception_weights)
    except ValueError as e:
      raise ConfigError(f"config.evaluation.inception_weights: {e}") from None
    feature_fn = inception.make_feature_fn(
      params, resize=ev.fid_resize, mesh=self.mesh, batch_size=ev.batch_size
    )
    self._inception = (params, feature_fn)
    return self._inception

  def _stats_dir(self) -> str:
    ev = self.config.evaluation
    return ev.stats_dir or os.path.join(os.path.dirname(os.path.abspath(self.workdir)), "fid_stats")

  def _reference_count(self, split: str) -> int:
    ev = self.config.evaluation
    size = len(data.load_images(self.config.data, split=split))
    if ev.num_fid_reference > size:
      raise ConfigError(
        f"config.evaluation.num_fid_reference = {ev.num_fid_reference} exceeds the {size} images "
        f"of split {split!r} of {self.config.data.dataset!r}."
      )
    count = ev.num_fid_reference or size
    if count % jax.process_count():
      raise ConfigError(
        f"{count} reference images of split {split!r} do not split evenly over "
        f"{jax.process_count()} processes; set config.evaluation.num_fid_reference to a multiple."
      )
    return count

  def _dataset_id(self) -> str:
    c = self.config.data
    if c.dataset == "image_folder":
      digest = hashlib.sha256(os.path.abspath(c.image_folder).encode()).hexdigest()[:10]
      return f"folder-{digest}"
    return c.dataset.replace("/", "-")

  def reference_stats(self, split: str):
    """The pool3 statistics of a dataset split: read from the cache, or computed once and cached.

    The cache file's name and its recorded metadata both carry the convention (dataset, split, image
    count, image size, weights hash, resize); a file whose metadata differs from what is needed is
    an error.
    """
    from ddpm_jax.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top

    params, feature_fn = self._load_inception()
    ev, c = self.config.evaluation, self.config.data
    count = self._reference_count(split)
    meta = {
      "dataset": self._dataset_id(),
      "split": split,
      "count": count,
      "image_size": int(c.image_size),
      "num_channels": int(c.num_channels),
      "weights_hash": params.weights_hash,
      "resize": ev.fid_resize,
    }
    if c.dataset == "image_folder":
      meta["image_folder"] = os.path.abspath(c.image_folder)
    path = os.path.join(
      self._stats_dir(),
      f"{meta['dataset']}_{split}_{c.image_size}px_n{count}_"
      f"{ev.fid_resize}_{params.weights_hash}.npz",
    )
    if os.path.exists(path):
      try:
        stats = fid_lib.load_stats(path)
      except ValueError as e:
        raise ConfigError(
          f"Cached reference statistics {path}: {e} Move the file away to recompute it."
        ) from None
      diffs = [
        f"{k} = {stats.meta.get(k)!r} (needed: {v!r})"
        for k, v in meta.items()
        if stats.meta.get(k) != v
      ]
      if diffs:
        raise ConfigError(
          f"Cached reference statistics {path} record {', '.join(diffs)}; they are not used "
          "silently: move the file away to recompute it, or set config.evaluation.stats_dir "
          "elsewhere."
        )
      logging.info(
        "Reference statistics of %s/%s (%d images) from the cache %s.",
        c.dataset,
        split,
        count,
        path,
      )
      return stats, path
    logging.info(
      "Computing reference statistics of %s/%s (%d images, once; cached in %s).",
      c.dataset,
      split,
      count,
      path,
    )
    batches = (
      _local_rows(b) if jax.process_count() > 1 else b
      for b in data.eval_batches(c, split=split, batch_size=ev.batch_size, num_examples=count)
    )
    stats, _ = fid_lib.stats_and_logits(
      feature_fn, batches, meta=meta, total=count, progress=jax.process_index() == 0
    )
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fid_lib.save_stats(path + ".tmp.npz", stats)
      os.replace(path + ".tmp.npz", path)
    return stats, path

  def sample_chunks(self, params, step: int) -> tuple[str, list[str]]:
    """Draws the FID samples into eval/fid_<step>_<sampler>_seed<seed>/chunk_<first>_<end>.npz,
    keeping every chunk already on disk (never re-drawn). Returns the folder and the chunk paths in
    order."""
    ev, c = self.config.evaluation, self.config.sampling
    record = _sampler_record(self.config)
    out = os.path.join(self.eval_dir, f"fid_{step}_{_sampler_tag(record)}_seed{self.config.seed}")
    _check_parts_dir(
      out,
      {
        "step": step,
        "seed": int(self.config.seed),
        "sampler": record,
        "clip_denoised": bool(c.clip_denoised),
        "image_shape": list(state_lib.image_shape(self.config)),
      },
      what="samples",
    )
    n, size = int(ev.num_fid_samples), int(ev.sample_chunk_size)
    ranges = [(start, min(start + size, n)) for start in range(0, n, size)]
    paths = [os.path.join(out, f"chunk_{a:07d}_{b:07d}.npz") for a, b in ranges]
    missing = np.array([not os.path.exists(p) for p in paths])
    if (
      jax.process_count() > 1
    ):  # every process must draw the same chunks (process 0's view decides)
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    todo = int(sum(b - a for (a, b), m in zip(ranges, missing) if m))
    logging.info(
      "FID samples of step %d in %s: %d of %d to draw (%d chunks kept).",
      step,
      out,
      todo,
      n,
      int((~missing).sum()),
    )
    if todo:
      if self._sample_fn is None:
        self._sample_fn = _make_eval_sampler(self.config, self.built, self.mesh)
      with tqdm.tqdm(
        total=todo, unit="img", desc="sampling", disable=jax.process_index() != 0
      ) as bar:
        for (first, end), path, draw in zip(ranges, paths, missing):
          if draw:
            chunk = self._draw(params, first, end, progress=bar.update)
            if jax.process_index() == 0:
              _save_npz(path, arr_0=chunk, first_id=np.array(first))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("fid sample chunks written")
    return out, paths

  def _draw(self, params, first: int, end: int, *, progress) -> np.ndarray:
    """Samples first .. end-1 (uint8 NHWC), in batches of config.sampling.batch_size (the last one
    cut)."""
    batch_size, key = self.config.sampling.batch_size, _sample_key(self.config)
    out = []
    for start in range(first, end, batch_size):
      ids = sampling.sample_ids(start, batch_size, self.mesh)
      out.append(parallel.to_host(self._sample_fn(params, key, ids))[: end - start])
      progress(len(out[-1]))
    return np.concatenate(out)

  def fid(self, params, step: int) -> str:
    """Writes eval/fid_<step>_<sampler>.json (FID vs each reference split, IS), a grid and
    TensorBoard scalars."""
    from ddpm_jax.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top

    self.check_fid_config()
    ev = self.config.evaluation
    inception_params, feature_fn = self._load_inception()
    references = {split: self.reference_stats(split) for split in ev.fid_reference_splits}
    samples_dir, paths = self.sample_chunks(params, step)

    grid = []

    def chunks():
      for path in paths:
        with np.load(path) as f:
          chunk = f["arr_0"]
        if len(grid) < 100:
          grid.extend(chunk[: 100 - len(grid)])
        yield _local_rows(chunk) if jax.process_count() > 1 else chunk

    record = _sampler_record(self.config)
    meta = {
      "dataset": "samples",
      "step": step,
      "sampler": record,
      "weights_hash": inception_params.weights_hash,
      "resize": ev.fid_resize,
    }
    stats, logits = fid_lib.stats_and_logits(
      feature_fn,
      chunks(),
      meta=meta,
      total=int(ev.num_fid_samples),
      progress=jax.process_index() == 0,
    )
    try:
      fids = {split: fid_lib.fid_from_stats(stats, ref) for split, (ref, _) in references.items()}
    except ValueError as e:
      raise ConfigError(f"FID of step {step}: {e}") from None
    result = {
      "step": step,
      "num_samples": stats.count,
      "sampler": record,
      "seed": int(self.config.seed),
      "clip_denoised": bool(self.config.sampling.clip_denoised),
      "inception": {
        "weights": os.path.abspath(ev.inception_weights),
        "weights_hash": inception_params.weights_hash,
        "resize": ev.fid_resize,
        "has_logits": inception_params.has_logits,
      },
      "fid": fids,
      "reference": {
        split: {
          "path": path,
          "count": ref.count,
          "dataset": ref.meta.get("dataset"),
          "split": split,
        }
        for split, (ref, path) in references.items()
      },
      "samples_dir": os.path.relpath(samples_dir, self.eval_dir),
    }
    result.update(_inception_score_record(logits))
    result["settings"] = {
      k: result[k] for k in ("step", "num_samples", "sampler", "seed", "clip_denoised")
    }
    result["settings"].update(
      weights_hash=inception_params.weights_hash,
      resize=ev.fid_resize,
      reference={s: r["path"] for s, r in result["reference"].items()},
    )
    if jax.process_index() != 0:
      return ""
    path = _result_path(self.eval_dir, f"fid_{step}_{_sampler_tag(record)}", result["settings"])
    grid_path = images.save_png(
      path[: -len(".json")] + "_samples.png", images.make_grid(np.stack(grid))
    )
    result["grid"] = os.path.basename(grid_path)
    _write_json(path, result)
    scalars = {f"fid/vs_{split}": value for split, value in fids.items()}
    scalars["fid/inception_score"] = (result["inception_score"] or {}).get("mean")
    self._write_scalars(scalars, step)
    logging.info(
      "Step %d: FID %s over %d samples (%s, resize %s), IS %s; wrote %s",
      step,
      ", ".join(f"{v:.3f} vs {s}" for s, v in fids.items()),
      stats.count,
      _sampler_tag(record),
      ev.fid_resize,
      "n/a" if result["inception_score"] is None else f"{result['inception_score']['mean']:.3f}",
      path,
    )
    return path


# ----------------------------------------------------------------------------- the modes


def evaluate_bpd(config, workdir: str) -> str:
  """`--mode=bpd`: the NLL bound of config.evaluation.checkpoint_step's EMA params."""
  evaluator = Evaluator(config, workdir)
  evaluator.check_bpd_config()
  params, step = evaluator.restore(config.evaluation.checkpoint_step)
  return evaluator.bpd(params, step)


def evaluate_fid(config, workdir: str) -> str:
  """`--mode=fid`: FID (vs every reference split) and IS of samples of
  config.evaluation.checkpoint_step."""
  evaluator = Evaluator(config, workdir)
  evaluator.check_fid_config()
  params, step = evaluator.restore(config.evaluation.checkpoint_step)
  return evaluator.fid(params, step)


def _done_path(workdir: str) -> str:
  return os.path.join(workdir, "eval", "done.json")


def read_done(workdir: str) -> dict:
  """{"<step>": {"<mode>": result path relative to WORKDIR/eval}} of the evaluation worker."""
  path = _done_path(workdir)
  return _read_json(path) if os.path.exists(path) else {}


def _check_watch_config(config) -> tuple[str, ...]:
  ev = config.evaluation
  modes = tuple(ev.watch_modes)
  unknown = [m for m in modes if m not in WATCH_MODES]
  if not modes or unknown:
    raise ConfigError(
      f"config.evaluation.watch_modes = {modes!r} must name one or more of "
      f"{', '.join(WATCH_MODES)}."
    )
  if ev.watch_poll_secs <= 0 or ev.watch_timeout_secs < 0:
    raise ConfigError(
      f"config.evaluation.watch_poll_secs must be > 0 and watch_timeout_secs >= 0, got "
      f"{ev.watch_poll_secs} and {ev.watch_timeout_secs}."
    )
  return modes


def watch(config, workdir: str, *, sleep=time.sleep, clock=time.monotonic) -> dict:
  """`--mode=evaluate_watch`: evaluates every new checkpoint of a (running) training workdir once.

  Polls the checkpoint folder every watch_poll_secs with a read-only listing (no lock the trainer
  needs), runs config.evaluation.watch_modes on each unevaluated step in increasing order, and
  records what is done in WORKDIR/eval/done.json (atomically, so a restarted worker skips it). A
  checkpoint that the trainer deletes while it is read is logged and skipped. Stops once the step
  config.training.num_steps is evaluated, or after watch_timeout_secs (> 0) without a new
  checkpoint. Returns the done record.
  """
  modes = _check_watch_config(config)
  ev = config.evaluation
  evaluator = Evaluator(config, workdir)
  for mode in modes:  # settings errors now, not after the first checkpoint appears
    {"bpd": evaluator.check_bpd_config, "fid": evaluator.check_fid_config}[mode]()
  done = read_done(workdir)
  final = int(config.training.num_steps)
  last_progress = clock()
  logging.info(
    "Watching %s for checkpoints: %s of each, until step %d is done.",
    checkpoint.checkpoint_dir(workdir),
    " and ".join(modes),
    final,
  )
  while True:
    for step in checkpoint_steps(workdir):
      pending = [m for m in modes if m not in done.get(str(step), {})]
      if not pending:
        continue
      try:
        params, _ = evaluator.restore(step)
      except Exception:  # pylint: disable=broad-except
        if step in checkpoint_steps(workdir):
          raise
        logging.warning(
          "The checkpoint of step %d was deleted while it was read (the trainer keeps only the "
          "newest); skipping it.",
          step,
        )
        continue
      for mode in pending:
        path = evaluator.run(mode, params, step)
        done.setdefault(str(step), {})[mode] = (
          os.path.relpath(path, evaluator.eval_dir) if path else ""
        )
        if jax.process_index() == 0:
          _write_json(_done_path(workdir), done)
      last_progress = clock()
    if all(m in done.get(str(final), {}) for m in modes):
      logging.info("Step %d (config.training.num_steps) is evaluated; the worker stops.", final)
      return done
    if ev.watch_timeout_secs and clock() - last_progress > ev.watch_timeout_secs:
      logging.info(
        "No new checkpoint for %d s (config.evaluation.watch_timeout_secs); the worker stops.",
        ev.watch_timeout_secs,
      )
      return done
    sleep(ev.watch_poll_secs)
