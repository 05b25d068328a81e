"""--mode=sample: EMA samples of a checkpoint as samples.npz, a grid, and the paper's progressive
pictures (Figure 6), in a new folder that names the checkpoint, the count, the seed and the sampler
(for a conditional model also the labels and the guidance scale w).
"""

import jax
import numpy as np
from absl import logging

from ddpm_jax import checkpoint
from ddpm_jax import images
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import streams
from ddpm_jax import validation
from ddpm_jax.models import unet


def sample_key(config) -> jax.Array:
  """The base key of sampling: sample i is drawn from fold_in(this, i), the same in every mode."""
  return streams.key(config.seed, streams.SAMPLES)


def folder_name(config, step: int) -> str:
  """ckpt_<step>_n<N>_seed<seed>_<sampler>, e.g. ckpt_3000_n1000_seed0_ancestral200."""
  c = config.sampling
  return f"ckpt_{step}_n{c.num_samples}_seed{config.seed}_{sampling.tag(sampling.record(config))}"


def dump_samples(config, workdir: str) -> str | None:
  """Writes config.sampling.num_samples EMA samples of a checkpoint as samples.npz (uint8 NHWC under
  `arr_0`; a conditional model's labels under `arr_1`), grid.png, the progressive pictures (x_t
  chain and predicted x_0) and sampler.json. Returns the folder (on process 0; None elsewhere)."""
  validation.check(config, mode="sample")
  c = config.sampling
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  params, step = checkpoint.restore_ema_params(
    config, workdir, built=built, mesh=mesh, step=c.checkpoint_step
  )
  # A batch is never larger than the samples asked for (rounded up to the devices).
  batch_size = min(c.batch_size, parallel.round_up_to_devices(c.num_samples))
  logging.info(
    "Sampling %d images from the EMA parameters of step %d (%s, T = %d).",
    c.num_samples,
    step,
    sampling.tag(sampling.record(config)),
    built.diffusion.num_timesteps,
  )
  progress = sampling.Progress(c.num_samples)
  sample_fn = sampling.from_config(config, built, mesh, on_step=progress.on_step)
  samples = sampling.generate(
    sample_fn,
    params,
    key=sample_key(config),
    num_samples=c.num_samples,
    batch_size=batch_size,
    mesh=mesh,
    progress=progress,
  )
  chain = _chain(config, built, mesh, params) if c.num_progressive > 0 else None
  if jax.process_index() != 0:
    return None
  out = storage.fresh_path(storage.join(workdir, "samples", folder_name(config, step)))
  table = sampling.config_label_table(config)
  if table is None:
    storage.save_npz(storage.join(out, "samples.npz"), arr_0=samples)
  else:  # the requested labels as arr_1 (guided-diffusion's convention)
    storage.save_npz(
      storage.join(out, "samples.npz"),
      arr_0=samples,
      arr_1=labels_lib.of_ids(table, np.arange(c.num_samples)),
    )
  storage.write_json(
    storage.join(out, "sampler.json"),
    dict(sampling.record(config), step=step, num_samples=c.num_samples, seed=int(config.seed)),
  )
  images.save_png(
    storage.join(out, "grid.png"), grid_picture(samples, num_classes=_grid_classes(config))
  )
  if chain is not None:
    images.save_png(storage.join(out, "progressive_x0.png"), images.chain_grid(chain.pred_xstart))
    images.save_png(storage.join(out, "chain_xt.png"), images.chain_grid(chain.x))
    storage.write_text(
      storage.join(out, "chain_timesteps.txt"), " ".join(map(str, chain.timesteps.tolist())) + "\n"
    )
  logging.info(
    "Wrote %d samples to %s (samples.npz, grid.png%s).",
    c.num_samples,
    out,
    ", progressive_x0.png, chain_xt.png" if chain is not None else "",
  )
  return out


def grid_picture(samples: np.ndarray, *, num_classes: int = 0) -> np.ndarray:
  """grid.png: the first 256 samples in a square grid, or with num_classes > 0 (labels = 'grid') a
  class grid of at most 256 images, row k = class k (see `labels.grid_picture_ids`)."""
  if not num_classes:
    return images.make_grid(samples[:256])
  ids, ncols = labels_lib.grid_picture_ids(num_classes, len(samples))
  return images.make_grid(samples[ids], ncols=ncols)


def _grid_classes(config) -> int:
  """K when grid.png is a class grid (a conditional model, config.sampling.labels = 'grid'), else
  0."""
  num_classes = unet.num_classes(config.model)
  if not num_classes or str(config.sampling.get("labels", "all")).strip() != "grid":
    return 0
  return num_classes


def _chain(config, built, mesh, params) -> sampling.Chain:
  """The progressive records of the first config.sampling.num_progressive samples."""
  n = config.sampling.num_progressive
  every = sampling.record_interval(built.diffusion.num_timesteps, config.sampling.progressive_every)
  chain_fn = sampling.from_config(config, built, mesh, record_every=every)
  ids = sampling.sample_ids(0, parallel.round_up_to_devices(n), mesh)
  _, chain = chain_fn(params, sample_key(config), ids)
  return jax.tree.map(lambda a: parallel.to_host(a)[:, :n] if a.ndim > 1 else a, chain)
