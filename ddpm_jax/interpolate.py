"""The paper's interpolation in latent space (Section 4.4, Figures 8 and 9; REFERENCE.md §6).

Two source images are diffused to the same step t with q_sample, mixed linearly,
x_t = (1 - lambda) x_t + lambda x'_t, and decoded by the reverse process from t down to 0. The two
sources get independent noise (as the official code); both that noise and the reverse process's
noise depend only on the pair, never on lambda or t, so along a row only lambda changes (the paper
fixes the noise the same way). The decoding is one jitted `lax.fori_loop` whose length t is an
argument, so every t runs the same compiled program.

Configured t follow the paper's numbering: t in [1, T] is the number of noising steps, i.e. the
0-indexed timestep t - 1 of this package; the paper's t = 1000 of T = 1000 is t = T here.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import evaluate
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError


def make_interpolator(model, d: dm.Diffusion, mesh, *, image_shape, clip_denoised: bool = True):
  """Returns `interpolate(params, key, ids, x1, x2, lam, t) -> uint8 images [B, H, W, C]`.

  ids [B]: pair ids (all randomness is keyed by them); x1, x2 [B, H, W, C] the sources in [-1, 1];
  lam [B] the mixing weights; t: scalar int, the 0-indexed timestep to diffuse to and decode from.
  Arrays with a batch axis are sharded over devices; B must divide by the device count.
  """
  shape = tuple(image_shape)

  def per_device(params, key, ids, x1, x2, lam, t):
    batch = ids.shape[0]
    normal_per_pair = lambda base, i: jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, i), shape)
    )(jax.vmap(jax.random.fold_in, (None, 0))(base, ids))
    q_key, p_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    t_batch = jnp.full((batch,), t, jnp.int32)
    x_t = dm.q_sample(d, x1, t_batch, normal_per_pair(q_key, 1))
    x_t_prime = dm.q_sample(d, x2, t_batch, normal_per_pair(q_key, 2))
    lam = lam.reshape((batch,) + (1,) * len(shape))
    x = (1.0 - lam) * x_t + lam * x_t_prime

    def body(i, x):
      t_now = t - i
      out = model.apply(params, x, jnp.full((batch,), t_now, jnp.int32), train=False)
      x, _ = dm.p_sample(
        d,
        out,
        x,
        jnp.full((batch,), t_now, jnp.int32),
        noise=normal_per_pair(p_key, t_now),
        clip_denoised=clip_denoised,
      )
      return x

    return images.to_uint8(jax.lax.fori_loop(0, t + 1, body, x))

  batch_spec = P(parallel.AXIS)
  return parallel.data_parallel(
    per_device,
    mesh,
    in_specs=(P(), P(), batch_spec, batch_spec, batch_spec, batch_spec, P()),
    out_specs=batch_spec,
  )


# -------------------------------------------------------------------- the --mode=interpolate driver


def check_config(interpolation_config, num_timesteps: int):
  """ConfigError (naming the key) for any unusable `config.interpolation` value."""
  c, T = interpolation_config, num_timesteps
  if not c.timesteps:
    raise ConfigError("config.interpolation.timesteps is empty; give at least one t in [1, T].")
  for t in c.timesteps:
    if int(t) != t or not 1 <= t <= T:
      raise ConfigError(
        f"config.interpolation.timesteps contains t = {t}, outside [1, T = {T}] "
        f"(t counts noising steps: the paper's t = 1000 of T = 1000 is t = {T} here)."
      )
  if not c.lambdas or any(not 0.0 <= lam <= 1.0 for lam in c.lambdas):
    raise ConfigError(
      f"config.interpolation.lambdas = {tuple(c.lambdas)} must be a non-empty list of "
      "numbers in [0, 1]."
    )
  if bool(c.image1) != bool(c.image2):
    raise ConfigError(
      "config.interpolation.image1 and image2 must be given together (or both left empty), "
      f"got {c.image1!r} and {c.image2!r}."
    )
  for name in ("image1", "image2"):
    if c[name] and not os.path.isfile(c[name]):
      raise ConfigError(f"config.interpolation.{name} = {c[name]!r} is not a file.")
  num_pairs = 1 if c.image1 else c.num_pairs
  if num_pairs < 1:
    raise ConfigError(f"config.interpolation.num_pairs = {c.num_pairs} must be >= 1.")
  if not 0 <= c.figure9_pair < num_pairs:
    raise ConfigError(
      f"config.interpolation.figure9_pair = {c.figure9_pair} is not one of the {num_pairs} "
      "pairs (0-indexed)."
    )


def load_sources(config):
  """The uint8 source pairs [P, H, W, C] x 2: the two image files, or images (0, 1), (2, 3), ... of
  the split."""
  c = config.interpolation
  if c.image1:
    files = data.ImageFolderSource(
      [c.image1, c.image2], image_size=config.data.image_size, num_channels=config.data.num_channels
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


def _process_block(rows: np.ndarray, mesh) -> jax.Array:
  """The global batch `rows` (identical on every process), each process giving its own block."""
  local = rows.shape[0] // jax.process_count()
  return parallel.global_batch(
    rows[jax.process_index() * local : (jax.process_index() + 1) * local], mesh
  )


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
      chunk = [_process_block(a[start : start + batch_size], mesh) for a in (pair_ids, x1, x2, lam)]
      decoded.append(parallel.to_host(fn(params, key, *chunk, jnp.int32(int(t) - 1))))
    out.append(
      np.concatenate(decoded)[:rows].reshape((num_pairs, num_lambdas) + sources1.shape[1:])
    )
  return np.stack(out)


def rows_picture(decoded: np.ndarray, sources1: np.ndarray, sources2: np.ndarray) -> np.ndarray:
  """The paper's layout: one row per entry of `decoded` [R, L, H, W, C], columns [source 1,
  lambdas.., source 2]."""
  strip = np.concatenate([sources1[:, None], decoded, sources2[:, None]], axis=1)
  return images.make_grid(strip.reshape((-1,) + strip.shape[2:]), ncols=strip.shape[1])


def run(config, workdir: str) -> str | None:
  """--mode=interpolate: writes t<t>.png per t, coarse_to_fine.png and interpolations.npz to a new
  folder."""
  c = config.interpolation
  built = state_lib.build(config)
  check_config(c, built.diffusion.num_timesteps)
  parallel.check_batch_size(config.sampling.batch_size, what="config.sampling.batch_size")
  sources1, sources2 = load_sources(config)
  mesh = parallel.make_mesh()
  params, step = evaluate.restore_ema_params(
    config, workdir, model=built.model, tx=built.tx, mesh=mesh, step=config.sampling.checkpoint_step
  )
  fn = make_interpolator(
    built.model,
    built.diffusion,
    mesh,
    image_shape=state_lib.image_shape(config),
    clip_denoised=config.sampling.clip_denoised,
  )
  timesteps = [int(t) for t in c.timesteps]
  logging.info(
    "Interpolating %d pairs at t = %s, %d lambdas, with the EMA parameters of step %d.",
    len(sources1),
    timesteps,
    len(c.lambdas),
    step,
  )
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  decoded = interpolations(
    fn,
    params,
    key=key,
    sources1=sources1,
    sources2=sources2,
    lambdas=list(c.lambdas),
    timesteps=timesteps,
    batch_size=config.sampling.batch_size,
    mesh=mesh,
  )
  if jax.process_index() != 0:
    return None
  fresh_dir = evaluate._fresh_dir  # pylint: disable=protected-access (never overwrite earlier results)
  out = fresh_dir(os.path.join(workdir, "interpolations", f"ckpt_{step}_seed{config.seed}"))
  os.makedirs(out)
  np.savez(
    os.path.join(out, "interpolations.npz"),
    images=decoded,
    sources1=sources1,
    sources2=sources2,
    timesteps=np.asarray(timesteps, np.int32),
    lambdas=np.asarray(c.lambdas, np.float32),
  )
  for t, per_t in zip(timesteps, decoded):
    images.save_png(os.path.join(out, f"t{t}.png"), rows_picture(per_t, sources1, sources2))
  pair = c.figure9_pair
  images.save_png(
    os.path.join(out, "coarse_to_fine.png"),
    rows_picture(
      decoded[:, pair],
      np.repeat(sources1[pair : pair + 1], len(timesteps), axis=0),
      np.repeat(sources2[pair : pair + 1], len(timesteps), axis=0),
    ),
  )
  with open(os.path.join(out, "timesteps_and_lambdas.txt"), "w") as f:
    f.write(
      f"rows of t<t>.png: pairs; columns: source 1, lambda = {list(c.lambdas)}, source 2\n"
      f"rows of coarse_to_fine.png: pair {pair} at t = {timesteps}\n"
    )
  logging.info("Wrote %s (t<t>.png per t, coarse_to_fine.png, interpolations.npz).", out)
  return out
