"""--mode=bpd: the variational bound on the NLL in bits/dim (the paper's Table 2) of a checkpoint's
EMA parameters, over the first `num_examples` images of a split (for a class-conditional model, of
p(x | y) at each image's true label y).

Resumable: each batch's terms are stored as a part under WORKDIR/eval, and example i's noise is a
function of the seed and i only, so a resumed run gives the numbers of an uninterrupted one.
"""

import jax
import numpy as np
import tqdm
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import plots
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import streams
from ddpm_jax import validation
from ddpm_jax.evaluation import results
from ddpm_jax.models import unet


def make_bpd_fn(d: dm.Diffusion, model, mesh, *, clip_denoised: bool):
  """Returns `bpd(params, key, batch, ids) -> (terms [B, T], prior [B], mse [B, T])`, sharded;
  batch is uint8 images, or for a conditional model {"image", "label"}: the bound of p(x | y) at
  the true label y.

  One compiled `calc_bpd_loop` (a scan over t) per batch; example i draws its noise from
  fold_in(key, i), so its terms do not depend on the batch it is in, the batch size or the number of
  devices.
  """

  def per_device(params, key, batch, ids):
    images_uint8, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch, None)

    def one(x, i, label):
      label = None if label is None else label[None]
      model_fn = lambda x_t, t: model.apply(params, x_t, t, label, train=False)
      r = dm.calc_bpd_loop(
        d, model_fn, x_start=x[None], key=jax.random.fold_in(key, i), clip_denoised=clip_denoised
      )
      return r.terms_bpd[0], r.prior_bpd[0], r.mse[0]

    return jax.vmap(one)(images.to_model_input(images_uint8), ids, y)

  batch = P(parallel.AXIS)
  return parallel.data_parallel(
    per_device, mesh, in_specs=(P(), P(), batch, batch), out_specs=(batch,) * 3
  )


def _pad(array: np.ndarray, size: int) -> np.ndarray:
  padded = np.zeros((size,) + array.shape[1:], array.dtype)
  padded[: len(array)] = array
  return padded


def _part(bpd_fn, params, key, batch, *, start: int, batch_size: int, mesh) -> dict:
  """The bound of one batch (uint8 images, or {"image", "label"}; padded to batch_size, the
  padding dropped): per-example and per-t sums."""
  n = len(jax.tree.leaves(batch)[0])
  device_batch = jax.tree.map(
    lambda a: parallel.global_batch(parallel.process_rows(_pad(a, batch_size)), mesh), batch
  )
  ids = sampling.sample_ids(start, batch_size, mesh)
  terms, prior, mse = (
    parallel.to_host(a)[:n].astype(np.float64) for a in bpd_fn(params, key, device_batch, ids)
  )
  return dict(
    total=terms.sum(axis=1) + prior,
    prior=prior,
    decoder=terms[:, 0],
    terms_sum=terms.sum(axis=0),
    mse_sum=mse.sum(axis=0),
  )


def settings(config, step: int) -> dict:
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
  } | ({"conditional_on": "true labels"} if unet.num_classes(config.model) else {})


def summary(parts: list[dict], *, settings: dict) -> dict:  # pylint: disable=redefined-outer-name
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
    "bits_per_dim": results.mean_and_stderr(total),
    "prior_bpd": results.mean_and_stderr(prior),
    "decoder_bpd_L0": results.mean_and_stderr(decoder),
    "rate_bpd": results.mean_and_stderr(total - decoder),  # sum of the t >= 1 terms + prior
    "distortion_bpd": results.mean_and_stderr(decoder),  # L0
    # RMSE of the t = 0 x0 prediction, 0..255
    "distortion_rmse_0_255": float(np.sqrt(mse[0]) * 127.5),
    "terms_bpd": terms.tolist(),  # mean over images of the term of each t (t = 0: L0)
    # mean over images of the MSE of the predicted x0 ([-1, 1] scale)
    "mse_pred_xstart": mse.tolist(),
  }


class BpdEvaluator:
  """The bound of any checkpoint's EMA params, compiled once (the watcher reuses it)."""

  def __init__(self, config, workdir: str, *, built, mesh, scalars: results.Scalars):
    self.config, self.workdir, self.built, self.mesh, self.scalars = (
      config,
      workdir,
      built,
      mesh,
      scalars,
    )
    self._fn = None

  def prepare(self) -> None:
    """Reads the split's size now: an unknown split fails before any checkpoint is read."""
    data.load_images(
      self.config.data,
      split=self.config.evaluation.split,
      num_classes=self.built.model.num_classes,
    )

  def run(self, params, step: int) -> str:
    """Writes eval/bpd_<step>_<split>.json (+ .png) and TensorBoard scalars; returns the JSON
    path (on process 0; "" elsewhere)."""
    ev = self.config.evaluation
    folder = results.eval_dir(self.workdir)
    record = settings(self.config, step)
    parts_dir = storage.join(folder, f"bpd_{step}_{ev.split}_seed{self.config.seed}_parts")
    results.check_parts_dir(parts_dir, record, what="per-batch bits/dim")
    if self._fn is None:
      self._fn = make_bpd_fn(
        self.built.diffusion, self.built.model, self.mesh, clip_denoised=ev.clip_denoised
      )
    logging.info(
      "Bits/dim of step %d on %d images of split %r (T = %d).",
      step,
      ev.num_examples,
      ev.split,
      self.built.diffusion.num_timesteps,
    )
    parts = self._parts(params, parts_dir)
    return self._write(summary(parts, settings=record), step=step, parts_dir=parts_dir)

  def _parts(self, params, parts_dir: str) -> list[dict]:
    """Every batch's part: read from parts_dir when a run before computed it, else computed."""
    ev = self.config.evaluation
    key = streams.key(self.config.seed, streams.BPD)
    batches = data.eval_batches(
      self.config.data,
      split=ev.split,
      batch_size=ev.batch_size,
      num_examples=ev.num_examples,
      num_classes=self.built.model.num_classes,
    )
    parts, start, resumed = [], 0, 0
    with tqdm.tqdm(
      total=ev.num_examples, unit="img", desc="bits/dim", disable=jax.process_index() != 0
    ) as bar:
      for batch in batches:
        size = len(jax.tree.leaves(batch)[0])
        path = storage.join(parts_dir, f"examples_{start:07d}_{start + size:07d}.npz")
        if storage.exists(path):
          part = storage.load_npz(path)
          resumed += size
        else:
          part = _part(
            self._fn, params, key, batch, start=start, batch_size=ev.batch_size, mesh=self.mesh
          )
          if jax.process_index() == 0:
            storage.save_npz(path, **part)
        parts.append(part)
        start += size
        bar.update(size)
        bar.set_postfix(bpd=f"{np.concatenate([p['total'] for p in parts]).mean():.4f}")
    if resumed:
      logging.info("Resumed: %d of %d images were already done in %s.", resumed, start, parts_dir)
    return parts

  def _write(self, result: dict, *, step: int, parts_dir: str) -> str:
    if jax.process_index() != 0:
      return ""
    folder = results.eval_dir(self.workdir)
    path = results.result_path(folder, f"bpd_{step}_{result['split']}", result["settings"])
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
    result = dict(result, plot=storage.name(plot), parts_dir=storage.name(parts_dir))
    storage.write_json(path, result)
    split = result["split"]
    self.scalars.write(
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


def evaluate(config, workdir: str) -> str:
  """--mode=bpd: the bound of config.evaluation.checkpoint_step's EMA params; the result's path."""
  validation.check(config, mode="bpd")
  built, mesh = state_lib.build(config), parallel.make_mesh()
  evaluator = BpdEvaluator(
    config, workdir, built=built, mesh=mesh, scalars=results.Scalars(workdir)
  )
  evaluator.prepare()
  params, step = checkpoint.restore_ema_params(
    config, workdir, built=built, mesh=mesh, step=config.evaluation.checkpoint_step
  )
  return evaluator.run(params, step)
