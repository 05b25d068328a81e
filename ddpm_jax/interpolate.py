"""The paper's interpolation in latent space (Section 4.4, Figures 8 and 9).

Two source images are diffused to the same step t with q_sample, mixed linearly,
x_t = (1 - lambda) x_t + lambda x'_t, and decoded by the reverse process from t down to 0. The
two sources get independent noise (as the official code); both that noise and the reverse
process's noise depend only on the pair, never on lambda or t, so along a row only lambda changes
(the paper fixes the noise the same way).

A conditional model is interpolated unconditionally: the decoder gives the network the null label
(no class; Ho & Salimans 2022) and no guidance, whatever config.sampling.labels and guidance_scale
say, and the results' record and folder name say labels "null" and no w.

The decoder is config.sampling's sampler (the paper's: ancestral over every step): with fewer steps
(respacing or DDIM) it takes the kept steps below t, plus t itself. Each t is one compiled
`lax.fori_loop`.

Configured t follow the paper's numbering: t in [1, T] is the number of noising steps, i.e. the
0-indexed timestep t - 1 of this package; the paper's t = 1000 of T = 1000 is t = T here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import streams
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError


def decoding_steps(kept, t: int) -> np.ndarray:
  """The steps decoding from 0-indexed step t takes: the kept steps below t, and t itself."""
  kept = np.asarray(kept)
  return np.union1d(kept[kept < t], [t]).astype(np.int32)


def make_interpolator(
  model,
  d: dm.Diffusion,
  mesh,
  *,
  image_shape,
  clip_denoised: bool = True,
  method: str = "ancestral",
  timesteps=None,
  eta: float = 0.0,
):
  """Returns `interpolate(params, key, ids, x1, x2, lam, t) -> uint8 images [B, H, W, C]`.

  ids [B]: pair ids (all randomness is keyed by them); x1, x2 [B, H, W, C] the sources in [-1, 1];
  lam [B] the mixing weights; t: the 0-indexed timestep (a Python int) to diffuse to and decode
  from. `method`, `timesteps` (the kept steps; None: all T) and `eta` as in
  `sampling.make_sampler`. Arrays with a batch axis are sharded over devices; B must divide by the
  device count. One program is compiled per t.
  """
  shape = tuple(image_shape)
  kept_all = np.arange(d.num_timesteps) if timesteps is None else np.asarray(timesteps)
  compiled = {}

  def build(t: int):
    kept = decoding_steps(kept_all, t)
    step_fn = sampling.reverse_step_fn(
      model, respace.respace(d, kept), kept, method=method, eta=eta, clip_denoised=clip_denoised
    )

    def per_device(params, key, ids, x1, x2, lam):
      pair_keys = lambda base: jax.vmap(jax.random.fold_in, (None, 0))(base, ids)
      q_keys = pair_keys(jax.random.fold_in(key, streams.INTERPOLATION_FORWARD))
      p_keys = pair_keys(jax.random.fold_in(key, streams.INTERPOLATION_REVERSE))
      t_batch = jnp.full((ids.shape[0],), t, jnp.int32)
      x_t = dm.q_sample(d, x1, t_batch, sampling.draw_normal(q_keys, 1, shape))
      x_t_prime = dm.q_sample(d, x2, t_batch, sampling.draw_normal(q_keys, 2, shape))
      lam = lam.reshape((ids.shape[0],) + (1,) * len(shape))
      x = (1.0 - lam) * x_t + lam * x_t_prime
      # y = None: a conditional model sees the null label (unguided)
      body = lambda i, x: step_fn(params, x, len(kept) - 1 - i, p_keys)[0]
      return images.to_uint8(jax.lax.fori_loop(0, len(kept), body, x))

    batch = P(parallel.AXIS)
    return parallel.data_parallel(
      per_device, mesh, in_specs=(P(), P(), batch, batch, batch, batch), out_specs=batch
    )

  def interpolate(params, key, ids, x1, x2, lam, t: int):
    t = int(t)
    if t not in compiled:
      compiled[t] = build(t)
    return compiled[t](params, key, ids, x1, x2, lam)

  return interpolate


# ------------------------------------------------------------------- the --mode=interpolate driver


def load_sources(config):
  """The uint8 source pairs [P, H, W, C] x 2: the two image files, or images (0, 1), (2, 3), ... of
  the split."""
  c = config.interpolation
  if c.image1:
    files = data.ImageFolderSource(
      [c.image1, c.image2],
      image_size=config.data.image_size,
      num_channels=config.data.num_channels,
    )
    try:
      return files[0][None], files[1][None]
    except OSError as e:
      raise ConfigError(
        f"config.interpolation.image1/image2: cannot read {c.image1!r} or {c.image2!r} "
        f"as images ({e})."
      ) from None
  source = data.load_images(config.data, split=c.split)
  if 2 * c.num_pairs > len(source):
    raise ConfigError(
      f"config.interpolation.num_pairs = {c.num_pairs} needs {2 * c.num_pairs} images, but split "
      f"{c.split!r} of {config.data.dataset!r} has {len(source)}."
    )
  pairs = np.stack([source[i] for i in range(2 * c.num_pairs)])
  return pairs[0::2], pairs[1::2]


def interpolations(
  fn, params, *, key, sources1, sources2, lambdas, timesteps, batch_size: int, mesh
):
  """uint8 decodings [len(timesteps), P, L, H, W, C] of every pair, lambda and (1-based) t, in
  batches."""
  num_pairs, num_lambdas = len(sources1), len(lambdas)
  pair_ids = np.repeat(np.arange(num_pairs, dtype=np.int32), num_lambdas)
  lam = np.tile(np.asarray(lambdas, np.float32), num_pairs)
  x1 = images.to_model_input(sources1)[pair_ids]
  x2 = images.to_model_input(sources2)[pair_ids]
  rows = len(pair_ids)
  batch_size = min(batch_size, parallel.round_up_to_devices(rows))
  padded = -(-rows // batch_size) * batch_size
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - rows, axis=0)])
  pair_ids, lam, x1, x2 = map(pad, (pair_ids, lam, x1, x2))
  out = []
  for t in tqdm.tqdm(timesteps, desc="interpolating", unit="t", disable=jax.process_index() != 0):
    decoded = []
    for start in range(0, padded, batch_size):
      chunk = [
        parallel.global_batch(parallel.process_rows(a[start : start + batch_size]), mesh)
        for a in (pair_ids, x1, x2, lam)
      ]
      decoded.append(parallel.to_host(fn(params, key, *chunk, int(t) - 1)))
    out.append(
      np.concatenate(decoded)[:rows].reshape((num_pairs, num_lambdas) + sources1.shape[1:])
    )
  return np.stack(out)


def rows_picture(decoded: np.ndarray, sources1: np.ndarray, sources2: np.ndarray) -> np.ndarray:
  """The paper's layout: one row per entry of `decoded` [R, L, H, W, C], columns [source 1,
  lambdas.., source 2]."""
  strip = np.concatenate([sources1[:, None], decoded, sources2[:, None]], axis=1)
  return images.make_grid(strip.reshape((-1,) + strip.shape[2:]), ncols=strip.shape[1])


def decoder_record(config) -> dict:
  """`sampling.record` of the decoder: for a conditional model labels "null" and no guidance scale
  (the decoder uses neither config.sampling.labels nor guidance_scale)."""
  out = sampling.record(config, labels="null")
  out.pop("guidance_scale", None)
  return out


def run(config, workdir: str) -> str | None:
  """--mode=interpolate: writes t<t>.png per t, coarse_to_fine.png and interpolations.npz to a new
  folder named after the checkpoint, the seed and the sampler."""
  validation.check(config, mode="interpolate")
  c = config.interpolation
  built = state_lib.build(config)
  sources1, sources2 = load_sources(config)
  mesh = parallel.make_mesh()
  params, step = checkpoint.restore_ema_params(
    config, workdir, built=built, mesh=mesh, step=config.sampling.checkpoint_step
  )
  options = sampling.sampler_options(
    config.sampling, built.diffusion.num_timesteps, mean_type=config.diffusion.mean_type
  )
  fn = make_interpolator(
    built.model,
    built.diffusion,
    mesh,
    image_shape=state_lib.image_shape(config),
    clip_denoised=config.sampling.clip_denoised,
    **options,
  )
  timesteps = [int(t) for t in c.timesteps]
  record = decoder_record(config)
  tag = sampling.tag(record)
  if built.model.num_classes:
    logging.info(
      "The conditional model is interpolated with the null label (unconditional); "
      "config.sampling.guidance_scale = %g is not used.",
      float(config.sampling.get("guidance_scale", 0.0)),
    )
  logging.info(
    "Interpolating %d pairs at t = %s, %d lambdas, with the EMA parameters of step %d (%s).",
    len(sources1),
    timesteps,
    len(c.lambdas),
    step,
    tag,
  )
  decoded = interpolations(
    fn,
    params,
    key=streams.key(config.seed, streams.INTERPOLATION),
    sources1=sources1,
    sources2=sources2,
    lambdas=list(c.lambdas),
    timesteps=timesteps,
    batch_size=config.sampling.batch_size,
    mesh=mesh,
  )
  if jax.process_index() != 0:
    return None
  out = storage.fresh_path(
    storage.join(workdir, "interpolations", f"ckpt_{step}_seed{config.seed}_{tag}")
  )
  storage.save_npz(
    storage.join(out, "interpolations.npz"),
    images=decoded,
    sources1=sources1,
    sources2=sources2,
    timesteps=np.asarray(timesteps, np.int32),
    lambdas=np.asarray(c.lambdas, np.float32),
  )
  for t, per_t in zip(timesteps, decoded):
    images.save_png(storage.join(out, f"t{t}.png"), rows_picture(per_t, sources1, sources2))
  pair = c.figure9_pair
  repeat = lambda s: np.repeat(s[pair : pair + 1], len(timesteps), axis=0)
  images.save_png(
    storage.join(out, "coarse_to_fine.png"),
    rows_picture(decoded[:, pair], repeat(sources1), repeat(sources2)),
  )
  storage.write_text(
    storage.join(out, "timesteps_and_lambdas.txt"),
    f"rows of t<t>.png: pairs; columns: source 1, lambda = {list(c.lambdas)}, source 2\n"
    f"rows of coarse_to_fine.png: pair {pair} at t = {timesteps}\n"
    f"decoded with: {record}\n",
  )
  logging.info("Wrote %s (t<t>.png per t, coarse_to_fine.png, interpolations.npz).", out)
  return out
