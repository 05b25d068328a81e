"""Ancestral sampling (Algorithm 2): all T reverse steps in one jitted `lax.fori_loop`.

The batch is sharded over the `data` mesh axis and the parameters are an argument of the
compiled function (never closed over), so one compilation serves every checkpoint. Every
sample's randomness comes from `fold_in(key, sample_id)`: the images do not depend on the
batch size or the number of devices, and sample i of a 50k dump is reproducible alone.
"""

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax.errors import ConfigError


class Chain(NamedTuple):
  """Progressive sampling records, taken after the reverse steps at t = ..., 2k, k, 0."""
  timesteps: np.ndarray  # [R] the t (a multiple of record_every) whose reverse step made each record
  x: jax.Array  # [R, B, H, W, C] x_{t-1} after that step
  pred_xstart: jax.Array  # [R, B, H, W, C] the model's x_0 prediction at that step


def record_timesteps(num_timesteps: int, record_every: int) -> np.ndarray:
  """The timesteps recorded by a progressive run, in sampling order (descending, ending at 0)."""
  return np.arange(0, num_timesteps, record_every)[::-1]


def record_interval(num_timesteps: int, every: int = 0, *, frames: int = 10) -> int:
  """`every`, or when it is 0 the interval that gives about `frames` pictures of a T-step chain."""
  if every < 0:
    raise ConfigError(f"config.sampling.progressive_every must be >= 0 (0: about {frames} frames), got {every}.")
  return every or max(1, num_timesteps // frames)


def make_sampler(model, d: dm.Diffusion, mesh, *, image_shape, clip_denoised: bool = True,
                 record_every: int = 0):
  """Returns `sample(params, key, ids) -> uint8 images` (and a `Chain` when record_every > 0).

  `ids` [B] are global sample ids, sharded over devices; B must divide by the device count.
  """
  T = d.num_timesteps
  recorded = record_timesteps(T, record_every) if record_every else np.zeros((0,), np.int32)
  shape = tuple(image_shape)

  def per_device(params, key, ids):
    sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    draw = lambda t: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(sample_keys)
    x = draw(T)  # x_{T-1} ~ N(0, I)
    records = jnp.zeros((len(recorded), 2, ids.shape[0]) + shape, jnp.float32)

    def body(i, carry):
      x, records = carry
      t_scalar = T - 1 - i
      t = jnp.full((ids.shape[0],), t_scalar, jnp.int32)
      out = model.apply(params, x, t, train=False)
      x, pred_xstart = dm.p_sample(d, out, x, t, noise=draw(t_scalar), clip_denoised=clip_denoised)
      if record_every:
        slot = (len(recorded) - 1) - t_scalar // record_every
        records = jax.lax.cond(t_scalar % record_every == 0,
                               lambda r: r.at[slot].set(jnp.stack([x, pred_xstart])),
                               lambda r: r, records)
      return x, records

    x, records = jax.lax.fori_loop(0, T, body, (x, records))
    return images.to_uint8(x), images.to_uint8(records)

  spec = P(None, None, parallel.AXIS)
  sample = parallel.data_parallel(per_device, mesh, in_specs=(P(), P(), P(parallel.AXIS)),
                                  out_specs=(P(parallel.AXIS), spec))
  if not record_every:
    return lambda params, key, ids: sample(params, key, ids)[0]

  def sample_with_chain(params, key, ids):
    samples, records = sample(params, key, ids)
    return samples, Chain(timesteps=recorded, x=records[:, 0], pred_xstart=records[:, 1])

  return sample_with_chain


def sample_ids(start: int, batch_size: int, mesh):
  """Global sample ids start .. start+batch_size-1, sharded over devices (each process gives its block)."""
  local = batch_size // jax.process_count()
  first = start + jax.process_index() * local
  return parallel.global_batch(np.arange(first, first + local, dtype=np.int32), mesh)


def generate(sample_fn, params, *, key, num_samples: int, batch_size: int, mesh, progress=None) -> np.ndarray:
  """`num_samples` uint8 images [N, H, W, C] in batches of `batch_size` (any N; the last batch is cut).

  `progress(done, total, seconds)` is called after every batch.
  """
  out, start_time = [], time.time()
  for start in range(0, num_samples, batch_size):
    batch = parallel.to_host(sample_fn(params, key, sample_ids(start, batch_size, mesh)))
    out.append(batch[:num_samples - start])
    if progress is not None:
      progress(min(start + batch_size, num_samples), num_samples, time.time() - start_time)
  return np.concatenate(out, axis=0)
