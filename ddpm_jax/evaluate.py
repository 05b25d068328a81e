"""Evaluation drivers over saved checkpoints: sample dumps (.npz + PNG grid + denoising chains)."""

import os

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath

from ddpm_jax import checkpoint
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError


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


def dump_samples(config, workdir: str) -> str | None:
  """Writes config.sampling.num_samples EMA samples of a checkpoint as samples.npz (uint8 NHWC, key
  `arr_0`), a PNG grid, and the progressive pictures (x_t chain and predicted x_0). Returns the folder."""
  c = config.sampling
  if c.num_samples < 1:
    raise ConfigError(f"config.sampling.num_samples must be >= 1, got {c.num_samples}.")
  parallel.check_batch_size(c.batch_size, what="config.sampling.batch_size")
  d, model, tx, _ = state_lib.build(config)
  record_every = sampling.record_interval(d.num_timesteps, c.progressive_every)
  mesh = parallel.make_mesh()
  params, step = restore_ema_params(config, workdir, model=model, tx=tx, mesh=mesh, step=c.checkpoint_step)
  shape = state_lib.image_shape(config)
  key = jax.random.fold_in(jax.random.key(config.seed), 3)
  logging.info("Sampling %d images from the EMA parameters of step %d (T = %d).", c.num_samples, step,
               d.num_timesteps)

  sample_fn = sampling.make_sampler(model, d, mesh, image_shape=shape, clip_denoised=c.clip_denoised)
  samples = sampling.generate(sample_fn, params, key=key, num_samples=c.num_samples, batch_size=c.batch_size,
                              mesh=mesh, progress=_progress_bar(c.num_samples))
  chain = None
  if c.num_progressive > 0:
    n = c.num_progressive
    chain_batch = parallel.round_up_to_devices(n)
    chain_fn = sampling.make_sampler(model, d, mesh, image_shape=shape, clip_denoised=c.clip_denoised,
                                     record_every=record_every)
    _, chain = chain_fn(params, key, sampling.sample_ids(0, chain_batch, mesh))
    chain = jax.tree.map(lambda a: parallel.to_host(a)[:, :n] if a.ndim > 1 else a, chain)

  if jax.process_index() != 0:
    return None
  out = _fresh_dir(os.path.join(workdir, "samples", f"ckpt_{step}_n{c.num_samples}_seed{config.seed}"))
  epath.Path(out).mkdir(parents=True)
  with epath.Path(out, "samples.npz").open("wb") as f:  # WORKDIR may be a gs:// URL
    np.savez(f, arr_0=samples)
  images.save_png(os.path.join(out, "grid.png"), images.make_grid(samples[:256]))
  if chain is not None:
    images.save_png(os.path.join(out, "progressive_x0.png"), images.chain_grid(chain.pred_xstart))
    images.save_png(os.path.join(out, "chain_xt.png"), images.chain_grid(chain.x))
    epath.Path(out, "chain_timesteps.txt").write_text(" ".join(map(str, chain.timesteps.tolist())) + "\n")
  logging.info("Wrote %d samples to %s (samples.npz, grid.png%s).", c.num_samples, out,
               ", progressive_x0.png, chain_xt.png" if chain is not None else "")
  return out
