"""Samplers, each one jitted `lax.fori_loop` over its reverse steps: ancestral (Algorithm 2) over
all T steps or a respaced subset of them, and DDIM (REFERENCE.md §6).

The batch is sharded over the `data` mesh axis and the parameters are an argument of the
compiled function (never closed over), so one compilation serves every checkpoint. Every
sample's randomness comes from `fold_in(key, sample_id)` and, within it, from the original
timestep t: the images do not depend on the batch size or the number of devices, sample i of a
50k dump is reproducible alone, and keeping all T steps gives exactly Algorithm 2's samples.
"""

import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax.errors import ConfigError

METHODS = ("ancestral", "ddim")


class Chain(NamedTuple):
  """Progressive sampling records, taken after the reverse steps at t = ..., 2k, k, 0 (see
  `record_steps`)."""

  timesteps: np.ndarray  # [R] the original t whose reverse step made each record, descending
  x: jax.Array  # [R, B, H, W, C] x_{t-1} after that step
  pred_xstart: jax.Array  # [R, B, H, W, C] the model's x_0 prediction at that step


def record_timesteps(num_timesteps: int, record_every: int) -> np.ndarray:
  """The timesteps recorded by a progressive run over all T steps, in sampling order (descending,
  ending at 0)."""
  return np.arange(0, num_timesteps, record_every)[::-1]


def record_interval(num_timesteps: int, every: int = 0, *, frames: int = 10) -> int:
  """`every`, or when it is 0 the interval that gives about `frames` pictures of a T-step chain."""
  if every < 0:
    raise ConfigError(
      f"config.sampling.progressive_every must be >= 0 (0: about {frames} frames), got {every}."
    )
  return every or max(1, num_timesteps // frames)


def record_steps(timesteps, record_every: int) -> np.ndarray:
  """Indices k (descending) into the kept `timesteps` after whose reverse step a record is taken:
  the last step, and each step from t = timesteps[k] for which (timesteps[k - 1], t] holds a
  multiple of `record_every` (with every step kept, the recorded t are those of
  `record_timesteps`)."""
  kept = np.asarray(timesteps)
  previous = np.append(-1, kept[:-1])
  return np.flatnonzero(kept // record_every > previous // record_every)[::-1]


def _check_method(method: str, eta: float):
  if method not in METHODS:
    raise ConfigError(f"config.sampling.method = {method!r} is not one of {', '.join(METHODS)}.")
  if not (math.isfinite(eta) and eta >= 0):
    raise ConfigError(f"config.sampling.eta = {eta} must be a finite number >= 0.")
  if method == "ancestral" and eta != 0:
    raise ConfigError(
      f"config.sampling.eta = {eta} applies only to method 'ddim' (method is 'ancestral')."
    )


def sampler_options(sampling_config, num_timesteps: int) -> dict:
  """The `make_sampler` keyword options a `config.sampling` section asks for (method, timesteps,
  eta), validated; configs saved before these keys existed mean ancestral sampling over all T
  steps."""
  c = sampling_config
  method, eta = c.get("method", "ancestral"), float(c.get("eta", 0.0))
  _check_method(method, eta)
  timesteps = respace.kept_timesteps(
    spacing=c.get("spacing", "uniform"),
    num_steps=c.get("num_steps", -1),
    num_timesteps=num_timesteps,
  )
  return {"method": method, "timesteps": timesteps, "eta": eta}


def describe(sampling_config, num_timesteps: int) -> dict:
  """What a result file records about how its samples were drawn: method, number of steps, spacing,
  eta."""
  options = sampler_options(sampling_config, num_timesteps)
  return {
    "method": options["method"],
    "num_steps": int(len(options["timesteps"])),
    "spacing": str(sampling_config.get("spacing", "uniform")),
    "eta": options["eta"] if options["method"] == "ddim" else None,
  }


def make_sampler(
  model,
  d: dm.Diffusion,
  mesh,
  *,
  image_shape,
  clip_denoised: bool = True,
  record_every: int = 0,
  method: str = "ancestral",
  timesteps=None,
  eta: float = 0.0,
  as_uint8: bool = True,
):
  """Returns `sample(params, key, ids) -> uint8 images` (and a `Chain` when record_every > 0).

  `ids` [B] are global sample ids, sharded over devices; B must divide by the device count.
  `timesteps`: the kept steps, ascending (None: all T); the network sees these original indices, the
  update uses the schedule respaced to them. `method`: "ancestral" (p_sample) or "ddim" with `eta`.
  x_T and the noise of the step from t are drawn from `fold_in(fold_in(key, id), T or t)` whatever
  is kept. `as_uint8=False` returns the float32 images (and records) unclipped instead, for
  comparisons with other code.
  """
  _check_method(method, eta)
  T = d.num_timesteps
  kept = respace.check_timesteps(np.arange(T) if timesteps is None else timesteps, T)
  spaced = respace.respace(d, kept)
  num_steps = len(kept)
  recorded = record_steps(kept, record_every) if record_every else np.zeros((0,), np.int64)
  slot_of_step = np.full((num_steps,), -1, np.int32)
  slot_of_step[recorded] = np.arange(len(recorded))
  shape = tuple(image_shape)

  def reverse_step(out, x, k, noise):
    if method == "ancestral":
      return dm.p_sample(spaced, out, x, k, noise=noise, clip_denoised=clip_denoised)
    return dm.ddim_sample(spaced, out, x, k, eta=eta, noise=noise, clip_denoised=clip_denoised)

  def per_device(params, key, ids):
    sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    draw = lambda t: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(
      sample_keys
    )
    x = draw(T)  # x_{T-1} ~ N(0, I)
    records = jnp.zeros((len(recorded), 2, ids.shape[0]) + shape, jnp.float32)
    batch = ids.shape[0]

    def body(i, carry):
      x, records = carry
      k = num_steps - 1 - i  # index into the kept steps
      t_scalar = jnp.asarray(kept)[k]  # the original timestep
      out = model.apply(params, x, jnp.full((batch,), t_scalar, jnp.int32), train=False)
      noise = draw(t_scalar) if method == "ancestral" or eta > 0 else None
      x, pred_xstart = reverse_step(out, x, jnp.full((batch,), k, jnp.int32), noise)
      if record_every:
        slot = jnp.asarray(slot_of_step)[k]
        records = jax.lax.cond(
          slot >= 0, lambda r: r.at[slot].set(jnp.stack([x, pred_xstart])), lambda r: r, records
        )
      return x, records

    x, records = jax.lax.fori_loop(0, num_steps, body, (x, records))
    return (images.to_uint8(x), images.to_uint8(records)) if as_uint8 else (x, records)

  spec = P(None, None, parallel.AXIS)
  sample = parallel.data_parallel(
    per_device, mesh, in_specs=(P(), P(), P(parallel.AXIS)), out_specs=(P(parallel.AXIS), spec)
  )
  if not record_every:
    return lambda params, key, ids: sample(params, key, ids)[0]

  def sample_with_chain(params, key, ids):
    samples, records = sample(params, key, ids)
    return samples, Chain(timesteps=kept[recorded], x=records[:, 0], pred_xstart=records[:, 1])

  return sample_with_chain


def sample_ids(start: int, batch_size: int, mesh):
  """Global sample ids start .. start+batch_size-1, sharded over devices (each process gives its
  block)."""
  local = batch_size // jax.process_count()
  first = start + jax.process_index() * local
  return parallel.global_batch(np.arange(first, first + local, dtype=np.int32), mesh)


def generate(
  sample_fn, params, *, key, num_samples: int, batch_size: int, mesh, progress=None
) -> np.ndarray:
  """`num_samples` uint8 images [N, H, W, C] in batches of `batch_size` (any N; the last batch is
  cut).

  `progress(done, total, seconds)` is called after every batch.
  """
  out, start_time = [], time.time()
  for start in range(0, num_samples, batch_size):
    batch = parallel.to_host(sample_fn(params, key, sample_ids(start, batch_size, mesh)))
    out.append(batch[: num_samples - start])
    if progress is not None:
      progress(min(start + batch_size, num_samples), num_samples, time.time() - start_time)
  return np.concatenate(out, axis=0)
