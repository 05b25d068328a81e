"""Inpainting with an unconditional model: RePaint (Lugmayr et al. 2022, Algorithm 1 with the
resampling "jumps" of Section 4.2).

At every reverse step the known region of x_{t-1} is a forward-noised copy of the input,
x_{t-1} = m * q_sample(x_0, t-1) + (1 - m) * p_sample(x_t), so the model fills in the rest in
harmony with it; at the last step the known region is the input itself. Resampling: after every
`jump_length` reverse steps the chain goes forward again by `jump_length` steps with
q(x_{t+j} | x_t) = N(sqrt(abar_{t+j} / abar_t) x_t, (1 - abar_{t+j} / abar_t) I) and repeats the
stretch, `num_resamplings` passes in all. The whole schedule, a precomputed list of moves, runs as
one compiled `lax.fori_loop`.

The reverse step is config.sampling's sampler: ancestral over all T steps, or over a respaced subset
(RePaint's own runs keep 250 of 1000 steps), or DDIM; jumps and known regions then use the kept
steps' alphas_cumprod. The network is reached only through `apply_fn(params, x, t, extra)`, so a
different model call can replace it: a conditional model's is the classifier-free guided one
(Ho & Salimans 2022) with the per-row labels as `extra`.

Timesteps are 0-indexed as in `diffusion`: x at index t has t + 1 noising steps; index -1 is the
image.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import streams

# The regions config.inpaint.mask can name instead of a file: the part that is filled in.
MASK_REGIONS = ("bottom_half", "top_half", "left_half", "right_half", "center")


# ----------------------------------------------------------------------------- the schedule


def jump_schedule(num_steps: int, jump_length: int, num_resamplings: int) -> np.ndarray:
  """RePaint's time list ("get_schedule_jump" with n_sample = 1): the index of x after each move,
  from num_steps - 1 (x_T, pure noise) down to -1 (the image).

  Reverse steps go down by one; whenever the chain reaches a multiple of `jump_length` below
  num_steps - jump_length it goes up `jump_length` steps again, num_resamplings - 1 times per
  multiple.
  """
  jumps_left = {t: num_resamplings - 1 for t in range(0, num_steps - jump_length, jump_length)}
  t, times = num_steps - 1, [num_steps - 1]
  while t >= 0:
    t -= 1
    times.append(t)
    if jumps_left.get(t, 0) > 0:
      jumps_left[t] -= 1
      times += list(range(t + 1, t + jump_length + 1))
      t += jump_length
  return np.asarray(times, np.int32)


class Moves(NamedTuple):
  """The schedule as moves: a reverse step (to == start - 1) or a forward jump (to > start)."""

  start: np.ndarray  # int32 [M]: the index of x before the move
  to: np.ndarray  # int32 [M]: the index of x after it


def schedule_moves(times) -> Moves:
  """Consecutive upward steps of a time list merged into one jump each."""
  start, to = [], []
  for a, b in zip(times[:-1], times[1:]):
    a, b = int(a), int(b)
    if b == a - 1:
      start.append(a)
      to.append(b)
    elif b == a + 1 and to and to[-1] > start[-1]:  # continues a jump
      to[-1] = b
    elif b == a + 1:
      start.append(a)
      to.append(b)
    else:
      raise ValueError(f"times move by one at a time, got {a} -> {b}")
  return Moves(np.asarray(start, np.int32), np.asarray(to, np.int32))


def jump_coefficients(d: dm.Diffusion, moves: Moves):
  """Per move, the forward jump's sqrt(abar_to / abar_start) and sqrt(1 - abar_to / abar_start)
  (float32 [M], computed in float64; 0 for reverse steps)."""
  abar = np.asarray(d.alphas_cumprod, np.float64)
  forward = moves.to > moves.start
  ratio = np.where(forward, abar[moves.to] / abar[np.maximum(moves.start, 0)], 1.0)
  scale = np.where(forward, np.sqrt(ratio), 0.0).astype(np.float32)
  noise = np.where(forward, np.sqrt(1.0 - ratio), 0.0).astype(np.float32)
  return scale, noise


def num_model_calls(moves: Moves) -> int:
  """Network evaluations per image: the reverse steps of the schedule."""
  return int(np.sum(moves.to < moves.start))


# ----------------------------------------------------------------------------- the sampler


def model_apply(model) -> Callable:
  """The plain network call, `apply_fn(params, x, t, extra)` (extra unused), that samplers use."""
  return lambda params, x, t, extra: model.apply(params, x, t, train=False)


def row_noise(row_keys, kind: int, i, shape):
  """N(0, I) [B, *shape] of each row for sub-stream `kind` and move i:
  normal(fold_in(fold_in(row key, kind), i))."""
  draw = lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, kind), i), shape)
  return jax.vmap(draw)(row_keys)


def make_inpainter(
  apply_fn,
  d: dm.Diffusion,
  mesh,
  *,
  image_shape,
  jump_length: int,
  num_resamplings: int,
  clip_denoised: bool = True,
  method: str = "ancestral",
  timesteps=None,
  eta: float = 0.0,
  as_uint8: bool = True,
  on_step=None,
):
  """Returns `inpaint(params, key, ids, x0, keep, extra=None) -> images [B, H, W, C]`.

  ids [B]: global row ids (row r's randomness is fold_in(key, r)); x0 [B, H, W, C] the inputs in
  [-1, 1]; keep [B, H, W, 1] (or C) 1 where the input is kept, 0 where it is filled in; `extra`: a
  pytree of per-row arrays handed to `apply_fn(params, x, t, extra)`. Batch axes are sharded over
  devices. `method`, `timesteps` (the kept steps, ascending; None: all T) and `eta` as in
  `sampling.make_sampler`; jump_length counts kept steps. uint8 results unless `as_uint8=False`.
  `on_step(moves_done, num_moves)` is called on the host during the loop, as the samplers do.
  """
  T = d.num_timesteps
  kept = respace.check_timesteps(np.arange(T) if timesteps is None else timesteps, T)
  spaced = respace.respace(d, kept)
  moves = schedule_moves(jump_schedule(len(kept), jump_length, num_resamplings))
  jump_scale, jump_noise = jump_coefficients(spaced, moves)
  num_moves, shape = len(moves.start), tuple(image_shape)
  model_t = jnp.asarray(kept, jnp.int32)

  def per_device(params, key, ids, x0, keep, extra):
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    keep = keep > 0.5
    batch = ids.shape[0]
    x = row_noise(row_keys, streams.INPAINT_START, 0, shape)  # x_T ~ N(0, I)

    def reverse(i, x, k):
      """From kept index k to k - 1: the model fills in, the input's noised copy is kept."""
      k_batch = jnp.full((batch,), k, jnp.int32)
      out = apply_fn(params, x, jnp.full((batch,), model_t[k], jnp.int32), extra)
      noise = row_noise(row_keys, streams.INPAINT_REVERSE, i, shape)
      if method == "ancestral":
        unknown, _ = dm.p_sample(spaced, out, x, k_batch, noise=noise, clip_denoised=clip_denoised)
      else:
        unknown, _ = dm.ddim_sample(
          spaced, out, x, k_batch, eta=eta, noise=noise, clip_denoised=clip_denoised
        )
      to = jnp.maximum(k - 1, 0)
      noised = dm.q_sample(
        spaced,
        x0,
        jnp.full((batch,), to, jnp.int32),
        row_noise(row_keys, streams.INPAINT_KNOWN, i, shape),
      )
      known = jnp.where(k > 0, noised, x0)  # the last step keeps the input exactly
      return jnp.where(keep, known, unknown)

    def forward(i, x):
      """q(x_to | x_start): the jump back up, in one draw."""
      noise = row_noise(row_keys, streams.INPAINT_FORWARD, i, shape)
      return jnp.asarray(jump_scale)[i] * x + jnp.asarray(jump_noise)[i] * noise

    def body(i, x):
      start, to = jnp.asarray(moves.start)[i], jnp.asarray(moves.to)[i]
      x = jax.lax.cond(to < start, lambda x: reverse(i, x, start), lambda x: forward(i, x), x)
      if on_step is not None:
        sampling.report_step(i + 1, num_moves, on_step)
      return x

    x = jax.lax.fori_loop(0, num_moves, body, x)
    return images.to_uint8(x) if as_uint8 else x

  batch = P(parallel.AXIS)
  run = parallel.data_parallel(
    per_device, mesh, in_specs=(P(), P(), batch, batch, batch, batch), out_specs=batch
  )
  return lambda params, key, ids, x0, keep, extra=None: run(params, key, ids, x0, keep, extra)


def from_config(config, built, mesh, *, apply_fn=None, on_step=None, as_uint8=True):
  """The inpainter config.inpaint and config.sampling describe, for the model `built` from
  `config`; `apply_fn` replaces the network call. A conditional model is called with the per-row
  labels given as `extra`, guided with config.sampling.guidance_scale (`sampling.guided_model_fn`).
  """
  T = built.diffusion.num_timesteps
  if apply_fn is None and built.model.num_classes:
    apply_fn = sampling.guided_model_fn(
      built.model, guidance_scale=float(config.sampling.get("guidance_scale", 0.0))
    )
  return make_inpainter(
    apply_fn or model_apply(built.model),
    built.diffusion,
    mesh,
    image_shape=state_lib.image_shape(config),
    jump_length=config.inpaint.jump_length,
    num_resamplings=config.inpaint.num_resamplings,
    clip_denoised=config.sampling.clip_denoised,
    on_step=on_step,
    as_uint8=as_uint8,
    **sampling.sampler_options(config.sampling, T, mean_type=config.diffusion.mean_type),
  )


def region_mask(region: str, size: int) -> np.ndarray:
  """A named region to fill in as a keep-mask bool [size, size] (True = keep)."""
  keep, half, quarter = np.ones((size, size), bool), size // 2, size // 4
  if region == "bottom_half":
    keep[size - half :] = False
  elif region == "top_half":
    keep[:half] = False
  elif region == "left_half":
    keep[:, :half] = False
  elif region == "right_half":
    keep[:, size - half :] = False
  else:  # center: the central square of half the side
    keep[quarter : size - quarter, quarter : size - quarter] = False
  return keep
