"""Timestep respacing (Nichol & Dhariwal 2021, Section 4): sample with a subset of the T steps.

Which steps are kept follows improved-diffusion's `space_timesteps` (sections with near-equal
strides, or `ddimN`) or diffusers' DDIMScheduler "leading" spacing. The respaced `Diffusion` has
betas recomputed from the kept alphas_cumprod, so every formula of `diffusion.py` applies to it
unchanged; its index k stands for the original timestep `timesteps[k]`, which is what the network
must see.
"""

import dataclasses

import jax
import numpy as np

from ddpm_jax import diffusion as dm
from ddpm_jax.errors import ConfigError

SPACINGS = ("uniform", "ddim", "leading")  # or "ddimN", or section counts "a,b,c"


def space_timesteps(num_timesteps: int, section_counts) -> np.ndarray:
  """The kept steps, ascending int32, by improved-diffusion's rule.

  `section_counts` is "ddimN" (range(0, T, stride) for the smallest stride giving exactly N steps),
  or counts [c_1, ..., c_k] (or "c_1,...,c_k"): 0..T-1 split into k near-equal sections (the first T
  mod k one longer), section i keeping c_i steps at start + round(j * (size - 1) / (c_i - 1)),
  Python rounding.
  """
  T = int(num_timesteps)
  if isinstance(section_counts, str) and section_counts.startswith("ddim"):
    wanted = _parse_int(section_counts[len("ddim") :], section_counts)
    for stride in range(1, T):  # (as improved-diffusion: so ddim1 has no stride)
      if len(range(0, T, stride)) == wanted:
        return np.arange(0, T, stride, dtype=np.int32)
    raise ConfigError(
      f"no integer stride keeps exactly {wanted} of the {T} steps; choose another count or "
      "spacing 'uniform'."
    )
  if isinstance(section_counts, str):
    section_counts = [_parse_int(c, section_counts) for c in section_counts.split(",")]
  counts = [int(c) for c in section_counts]
  if not counts or min(counts) < 0 or sum(counts) < 1:
    raise ConfigError(f"section counts {counts} must be non-negative with a positive sum.")
  size_per, extra = divmod(T, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ConfigError(
        f"section {i} of steps {start}..{start + size - 1} has {size} steps, fewer than the "
        f"{count} asked for in section counts {counts}."
      )
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return np.asarray(sorted(set(kept)), dtype=np.int32)


def leading_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """diffusers' DDIMScheduler "leading" spacing: 0, s, 2s, ..., (N-1)s with s = T // N,
  ascending."""
  return np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps)


def _parse_int(text: str, whole: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"{text!r} in {whole!r} is not a whole number.") from None


def kept_timesteps(*, spacing: str, num_steps: int, num_timesteps: int) -> np.ndarray:
  """The steps a `config.sampling` (spacing, num_steps) keeps; num_steps = -1 means all T.
  Validated."""
  T = int(num_timesteps)
  if num_steps != -1 and not 1 <= num_steps <= T:
    raise ConfigError(
      f"config.sampling.num_steps = {num_steps} must lie in [1, T = {T}] (or be -1 for all T)."
    )
  spacing = str(spacing).strip()
  n = T if num_steps == -1 else int(num_steps)
  section_counts = {"uniform": [n], "ddim": f"ddim{n}"}.get(spacing, spacing)
  if spacing == "leading":
    return leading_timesteps(T, n)
  if not (
    spacing in SPACINGS
    or spacing.startswith("ddim")
    or spacing.replace(",", "").replace(" ", "").isdigit()
  ):
    raise ConfigError(
      f"config.sampling.spacing = {spacing!r} is not 'uniform', 'ddim', 'leading', 'ddimN' or "
      "comma-separated section counts like '10,15,20'."
    )
  try:
    kept = space_timesteps(T, section_counts)
  except ConfigError as e:
    raise ConfigError(f"config.sampling.spacing = {spacing!r}: {e}") from None
  if num_steps not in (-1, len(kept)):
    raise ConfigError(
      f"config.sampling.spacing = {spacing!r} keeps {len(kept)} steps but "
      f"config.sampling.num_steps = {num_steps}; set num_steps to -1 or {len(kept)}."
    )
  return kept


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
  """`timesteps` as ascending unique int32 in [0, T), non-empty; ConfigError otherwise."""
  kept = np.asarray(timesteps)
  if (
    kept.ndim != 1
    or kept.size == 0
    or not np.issubdtype(kept.dtype, np.integer)
    or kept.min() < 0
    or kept.max() >= num_timesteps
    or np.any(np.diff(kept) <= 0)
  ):
    raise ConfigError(
      f"timesteps {kept.tolist()} must be a non-empty ascending list of distinct integers "
      f"in [0, {num_timesteps})."
    )
  return kept.astype(np.int32)


def respaced_betas(alphas_cumprod: np.ndarray, timesteps) -> np.ndarray:
  """beta'_k = 1 - abar[s_k] / abar[s_{k-1}] (abar before the first kept step = 1), float64."""
  abar = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
  return 1.0 - abar / np.append(1.0, abar[:-1])


def respace(d: dm.Diffusion, timesteps) -> dm.Diffusion:
  """The diffusion over the kept steps only (index k = original step timesteps[k]); `d` itself when
  all T are kept, and its arrays' first n entries when the first n steps are kept (interpolation
  decodes from step t down), so that the original schedule stays bit-identical."""
  kept = check_timesteps(timesteps, d.num_timesteps)
  if len(kept) == d.num_timesteps:
    return d
  if kept[-1] == len(kept) - 1:  # the first n steps: the same process, stopped early
    names = [f.name for f in dataclasses.fields(d) if isinstance(getattr(d, f.name), jax.Array)]
    return dataclasses.replace(d, **{name: getattr(d, name)[: len(kept)] for name in names})
  # abar in float64 from the stored float32 betas: ratios of it lose nothing beyond float32's
  # precision.
  abar = np.cumprod(1.0 - np.asarray(d.betas, np.float64))
  return dm.make_diffusion(
    respaced_betas(abar, kept),
    mean_type=d.mean_type,
    var_type=d.var_type,
    loss_type=d.loss_type,
    hybrid_lambda=d.hybrid_lambda,
  )
