"""Samplers, each one jitted `lax.fori_loop` over its reverse steps: ancestral (Algorithm 2) over
all T steps or a respaced subset of them (Nichol & Dhariwal 2021), and DDIM (Song et al. 2021).

The batch is sharded over the `data` mesh axis and the parameters are an argument of the
compiled function (never closed over), so one compilation serves every checkpoint. Every
sample's randomness comes from `fold_in(key, sample_id)` and, within it, from the original
timestep t: the images do not depend on the batch size or the number of devices, sample i of a
50k dump is reproducible alone, and keeping all T steps gives exactly Algorithm 2's samples.

A class-conditional model samples sample i with the label `labels.of_ids(table, i)` and, with
guidance scale w != 0, classifier-free guidance (Ho & Salimans 2022, Eq. 6): one batched forward
of the conditional and the null-label inputs inside the same loop (`guided_model_fn`).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet

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


def sampler_options(sampling_config, num_timesteps: int, *, mean_type: str = "eps") -> dict:
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
  _check_mean_type(mean_type, timesteps, num_timesteps)
  return {"method": method, "timesteps": timesteps, "eta": eta}


def _check_mean_type(mean_type: str, timesteps, num_timesteps: int):
  """A model that predicts x_{t-1} predicts it for the original step t - 1, which a respaced step
  from t does not go to: such samples would be wrong (improved-diffusion respaces eps and x0 models
  only)."""
  if mean_type == "xprev" and len(timesteps) < num_timesteps:
    raise ConfigError(
      f"config.sampling keeps {len(timesteps)} of the {num_timesteps} steps, but a model with "
      "config.diffusion.mean_type = 'xprev' predicts x_(t-1) for the original steps only: sample "
      "it with all T steps (config.sampling.num_steps = -1)."
    )


def record(config, *, labels=None) -> dict:
  """What results record about a config's sampler, and what names their folders: method, number of
  steps, and the spacing (when not every step is kept) and eta (DDIM) that change the samples; for
  a conditional model the labels (`labels`, else config.sampling.labels) and guidance scale."""
  T = int(config.diffusion.num_timesteps)
  options = sampler_options(config.sampling, T, mean_type=config.diffusion.mean_type)
  out = {"method": options["method"], "num_steps": int(len(options["timesteps"]))}
  if out["num_steps"] < T:
    out["spacing"] = str(config.sampling.get("spacing", "uniform"))
  if options["method"] == "ddim":
    out["eta"] = options["eta"]
  if unet.num_classes(config.model):
    spec = config.sampling.get("labels", "all") if labels is None else labels
    out["labels"] = labels_lib.describe(spec)
    out["guidance_scale"] = float(config.sampling.get("guidance_scale", 0.0))
  return out


def tag(sampler_record: dict) -> str:
  """'ancestral1000' (+ '_eta0.0'-style suffixes for further settings): a folder-name-safe label."""
  short = {"guidance_scale": "w"}
  extra = "".join(
    f"_{short.get(k, k)}{v}"
    for k, v in sorted(sampler_record.items())
    if k not in ("method", "num_steps")
  )
  label = f"{sampler_record['method']}{sampler_record['num_steps']}{extra}"
  return label.replace("/", "-").replace(" ", "")


def config_label_table(config, *, num_samples: int | None = None, spec=None):
  """The label table (see `labels`) of a conditional config's samples: `spec` or
  config.sampling.labels, for a dump of num_samples (default config.sampling.num_samples); None for
  an unconditional model."""
  num_classes = unet.num_classes(config.model)
  if not num_classes:
    return None
  return labels_lib.table(
    config.sampling.get("labels", "all") if spec is None else spec,
    num_classes=num_classes,
    num_samples=config.sampling.num_samples if num_samples is None else num_samples,
  )


def from_config(
  config, built, mesh, *, record_every: int = 0, on_step=None, as_uint8=True, label_table=None
):
  """The sampler `config.sampling` describes, for the model and diffusion `built` from `config`
  (see `make_sampler`): the one place a config turns into a sampler. A conditional model's labels
  come from `label_table`, or else from config.sampling.labels (`config_label_table`)."""
  T = built.diffusion.num_timesteps
  if label_table is None:
    label_table = config_label_table(config)
  return make_sampler(
    built.model,
    built.diffusion,
    mesh,
    image_shape=(config.data.image_size, config.data.image_size, config.data.num_channels),
    clip_denoised=config.sampling.clip_denoised,
    record_every=record_every,
    on_step=on_step,
    as_uint8=as_uint8,
    label_table=label_table,
    guidance_scale=float(config.sampling.get("guidance_scale", 0.0)),
    **sampler_options(config.sampling, T, mean_type=config.diffusion.mean_type),
  )


def draw_normal(sample_keys, t, shape):
  """N(0, I) noise [B, *shape] of each sample for (original) step t: fold_in(sample key, t)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(sample_keys)


def guided_model_fn(model, *, guidance_scale: float = 0.0):
  """Returns `apply(params, x, t, y) -> model output` for sampling (y None: unconditional).

  With labels y and w = guidance_scale != 0, classifier-free guidance (Ho & Salimans 2022, Eq. 6):
  the mean output (eps, or x0 / x_{t-1}, which are affine in eps with weights summing to 1) is
  (1 + w) out(x, y) - w out(x, null), from ONE forward of the batch [x, x] with labels [y, null];
  learned variances come from the conditional half. With w = 0 it is the plain conditional
  forward (no null pass), so the samples equal unguided conditional sampling bitwise.
  """

  def apply(params, x, t, y):
    if y is None:  # an unconditional model: the call of the paper's sampler, unchanged
      return model.apply(params, x, t, train=False)
    if guidance_scale == 0:
      return model.apply(params, x, t, y, train=False)
    null = jnp.full_like(y, model.num_classes)
    both = model.apply(
      params,
      jnp.concatenate([x, x]),
      jnp.concatenate([t, t]),
      jnp.concatenate([y, null]),
      train=False,
    )
    cond, uncond = jnp.split(both, 2)
    c = x.shape[-1]
    mean = (1.0 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
    return jnp.concatenate([mean, cond[..., c:]], axis=-1)

  return apply


def reverse_step_fn(
  model,
  spaced: dm.Diffusion,
  kept,
  *,
  method: str,
  eta: float,
  clip_denoised,
  guidance_scale: float = 0.0,
):
  """Returns `step(params, x, k, sample_keys, y) -> (x at the next kept step below, predicted
  x0)`: the reverse step from kept step k (original timestep kept[k]) of the respaced diffusion
  `spaced`; the network sees the original timestep (and labels y of a conditional model, guided by
  `guided_model_fn`), the noise comes from fold_in(sample key, kept[k])."""
  kept = jnp.asarray(kept)
  model_fn = guided_model_fn(model, guidance_scale=guidance_scale)

  def step(params, x, k, sample_keys, y=None):
    batch = x.shape[0]
    t = kept[k]
    out = model_fn(params, x, jnp.full((batch,), t, jnp.int32), y)
    noise = draw_normal(sample_keys, t, x.shape[1:]) if method == "ancestral" or eta > 0 else None
    k = jnp.full((batch,), k, jnp.int32)
    if method == "ancestral":
      return dm.p_sample(spaced, out, x, k, noise=noise, clip_denoised=clip_denoised)
    return dm.ddim_sample(spaced, out, x, k, eta=eta, noise=noise, clip_denoised=clip_denoised)

  return step


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
  on_step=None,
  label_table=None,
  guidance_scale: float = 0.0,
):
  """Returns `sample(params, key, ids) -> uint8 images` (and a `Chain` when record_every > 0).

  `ids` [B] are global sample ids, sharded over devices; B must divide by the device count.
  `timesteps`: the kept steps, ascending (None: all T); the network sees these original indices, the
  update uses the schedule respaced to them. `method`: "ancestral" (p_sample) or "ddim" with `eta`.
  x_T and the noise of the step from t are drawn from `fold_in(fold_in(key, id), T or t)` whatever
  is kept. `as_uint8=False` returns the float32 images (and records) unclipped instead, for
  comparisons with other code. `on_step(steps_done, num_steps)`, if given, is called on the host
  of the first device during the loop (about 50 times per batch), to show progress within a slow
  batch.
  A conditional model samples id i with label `labels.of_ids(label_table, i)`, guided with
  `guidance_scale` (see `guided_model_fn`).
  """
  _check_method(method, eta)
  assert (label_table is None) == (not getattr(model, "num_classes", 0)), "labels vs model"
  T = d.num_timesteps
  kept = respace.check_timesteps(np.arange(T) if timesteps is None else timesteps, T)
  _check_mean_type(d.mean_type, kept, T)
  step_fn = reverse_step_fn(
    model,
    respace.respace(d, kept),
    kept,
    method=method,
    eta=eta,
    clip_denoised=clip_denoised,
    guidance_scale=guidance_scale,
  )
  num_steps = len(kept)
  recorded = record_steps(kept, record_every) if record_every else np.zeros((0,), np.int64)
  slot_of_step = np.full((num_steps,), -1, np.int32)
  slot_of_step[recorded] = np.arange(len(recorded))
  shape = tuple(image_shape)

  def per_device(params, key, ids):
    sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    y = None if label_table is None else labels_lib.of_ids(jnp.asarray(label_table), ids)
    x = draw_normal(sample_keys, T, shape)  # x_{T-1} ~ N(0, I)
    records = jnp.zeros((len(recorded), 2, ids.shape[0]) + shape, jnp.float32)

    def body(i, carry):
      x, records = carry
      k = num_steps - 1 - i  # index into the kept steps
      x, pred_xstart = step_fn(params, x, k, sample_keys, y)
      if record_every:
        slot = jnp.asarray(slot_of_step)[k]
        records = jax.lax.cond(
          slot >= 0, lambda r: r.at[slot].set(jnp.stack([x, pred_xstart])), lambda r: r, records
        )
      if on_step is not None:
        report_step(i + 1, num_steps, on_step)
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


def report_step(done, num_steps: int, on_step):
  """Calls on_step(done, num_steps) from inside a loop, on the first device only, every ~2% of the
  steps (samplers and the inpainter show progress within a slow batch with it)."""
  every = max(1, num_steps // 50)
  due = ((done % every) == 0) & (jax.lax.axis_index(parallel.AXIS) == 0)
  jax.lax.cond(due, lambda: jax.debug.callback(on_step, done, num_steps), lambda: None)


def sample_ids(start: int, batch_size: int, mesh):
  """Global sample ids start .. start+batch_size-1, sharded over devices (each process gives its
  block)."""
  first, end = parallel.process_block(batch_size)
  return parallel.global_batch(np.arange(start + first, start + end, dtype=np.int32), mesh)


class Progress:
  """A bar over images (shown by process 0) that also moves within a batch, step by step, when it is
  handed to the sampler as `on_step` (a batch of 1000 steps on a slow machine takes minutes)."""

  def __init__(self, total: int, *, desc: str = "sampling"):
    self._bar = tqdm.tqdm(total=total, unit="img", desc=desc, disable=jax.process_index() != 0)
    self._batch = (0, 0)  # images done before the current batch, images in it

  def on_step(self, done, num_steps):
    before, size = self._batch
    self._bar.update(before + size * int(done) // int(num_steps) - self._bar.n)

  def begin(self, done: int, size: int):
    self._batch = (done, size)

  def end(self, done: int):
    self._bar.update(done - self._bar.n)
    if done >= self._bar.total:
      self._bar.close()


def generate(
  sample_fn, params, *, key, num_samples: int, batch_size: int, mesh, progress=None
) -> np.ndarray:
  """`num_samples` uint8 images [N, H, W, C] in batches of `batch_size` (any N; the last batch is
  cut). `progress`: a `Progress`, told where each batch begins and ends."""
  out = []
  for start in range(0, num_samples, batch_size):
    size = min(batch_size, num_samples - start)
    if progress is not None:
      progress.begin(start, size)
    batch = parallel.to_host(sample_fn(params, key, sample_ids(start, batch_size, mesh)))
    out.append(batch[:size])
    if progress is not None:
      progress.end(start + size)
  return np.concatenate(out, axis=0)
