"""diffusers' DDPMScheduler config <-> `config.diffusion` (and `sampling.clip_denoised`).

Only settings with the same meaning on both sides are mapped; anything else is refused by name.
diffusers' `variance_type='learned'` reads the network's extra channels as a variance, the official
code as a log-variance, so it has no counterpart here; `learned_range` means the same on both sides.
"""

import math

import numpy as np

from ddpm_jax import diffusion as dm
from ddpm_jax.errors import ConfigError

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
_VARIANCE_TYPES = {
  "fixed_small": "fixedsmall",
  "fixed_large": "fixedlarge",
  "learned_range": "learned_range",
}
_PREDICTION_TYPES = {"epsilon": "eps", "sample": "xstart"}
_DEFAULTS = {
  "num_train_timesteps": 1000,
  "beta_start": 1e-4,
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "trained_betas": None,
  "variance_type": "fixed_small",
  "clip_sample": True,
  "clip_sample_range": 1.0,
  "prediction_type": "epsilon",
  "thresholding": False,
  "rescale_betas_zero_snr": False,
}


def _lookup(table, value, *, key, path):
  if value not in table:
    raise ConfigError(
      f"{path} has {key}={value!r}, which this package does not implement "
      f"(supported: {', '.join(map(repr, table))})."
    )
  return table[value]


def settings_from_scheduler(scheduler: dict, *, path: str) -> dict:
  """{dotted config key: value} that a DDPMScheduler config implies (diffusers' defaults for absent
  keys)."""
  s = dict(_DEFAULTS, **scheduler)
  if (
    "num_train_timesteps" not in scheduler and "timesteps" in scheduler
  ):  # the Hub's first scheduler files
    s["num_train_timesteps"] = scheduler["timesteps"]
  for key in ("thresholding", "rescale_betas_zero_snr"):
    if s[key]:
      raise ConfigError(f"{path} has {key}=true, which the official sampler does not do.")
  if s["clip_sample"] and not math.isclose(s["clip_sample_range"], 1.0):
    raise ConfigError(
      f"{path} has clip_sample_range={s['clip_sample_range']!r}; the official sampler clips "
      "to [-1, 1]."
    )
  settings = {
    "diffusion.num_timesteps": int(s["num_train_timesteps"]),
    "diffusion.var_type": _lookup(
      _VARIANCE_TYPES, s["variance_type"], key="variance_type", path=path
    ),
    "diffusion.mean_type": _lookup(
      _PREDICTION_TYPES, s["prediction_type"], key="prediction_type", path=path
    ),
    "sampling.clip_denoised": bool(s["clip_sample"]),
  }
  if s["trained_betas"] is not None:
    settings["diffusion.betas"] = np.asarray(s["trained_betas"], np.float64)
  else:
    settings["diffusion.beta_schedule"] = _lookup(
      _BETA_SCHEDULES, s["beta_schedule"], key="beta_schedule", path=path
    )
    if settings["diffusion.beta_schedule"] != "cosine":  # the cosine schedule has no start and end
      settings["diffusion.beta_start"] = float(s["beta_start"])
      settings["diffusion.beta_end"] = float(s["beta_end"])
  return settings


def _config_value(config, dotted):
  section, key = dotted.split(".")
  return config[section][key]


def check_scheduler(scheduler: dict, config, *, path: str) -> None:
  """Raises ConfigError naming every config key that disagrees with a DDPMScheduler config."""
  diffs = []
  for key, value in settings_from_scheduler(scheduler, path=path).items():
    if key == "diffusion.betas":
      c = config.diffusion
      betas = dm.get_beta_schedule(
        c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end, num_timesteps=c.num_timesteps
      )
      if betas.shape != value.shape or not np.allclose(betas, value, rtol=1e-5, atol=1e-8):
        diffs.append(
          f"diffusion.beta_schedule (the scheduler's trained_betas differ from the config's "
          f"{c.beta_schedule!r} schedule)"
        )
      continue
    wanted = _config_value(config, key)
    same = (
      math.isclose(value, wanted, rel_tol=1e-6) if isinstance(value, float) else value == wanted
    )
    if not same:
      diffs.append(f"{key} (scheduler {value!r}, config {wanted!r})")
  if diffs:
    raise ConfigError(
      f"{path} differs from the config in {'; '.join(diffs)}; pass the matching --config "
      "file or --config.<key>=<value> overrides."
    )


def _inverse(table, value, *, key):
  for theirs, ours in table.items():
    if ours == value:
      return theirs
  raise ConfigError(f"config.{key}={value!r} has no diffusers DDPMScheduler equivalent.")


def scheduler_config(config) -> dict:
  """A DDPMScheduler config for `config.diffusion` (schedules diffusers lacks become
  `trained_betas`)."""
  c = config.diffusion
  out = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": int(c.num_timesteps),
    "beta_start": float(c.beta_start),
    "beta_end": float(c.beta_end),
    "trained_betas": None,
    "variance_type": _inverse(_VARIANCE_TYPES, c.var_type, key="diffusion.var_type"),
    "prediction_type": _inverse(_PREDICTION_TYPES, c.mean_type, key="diffusion.mean_type"),
    "clip_sample": bool(config.sampling.clip_denoised),
    "clip_sample_range": 1.0,
  }
  if c.beta_schedule in _BETA_SCHEDULES.values():
    out["beta_schedule"] = _inverse(_BETA_SCHEDULES, c.beta_schedule, key="diffusion.beta_schedule")
  else:
    out["beta_schedule"] = "linear"  # ignored by diffusers when trained_betas is given
    out["trained_betas"] = dm.get_beta_schedule(
      c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end, num_timesteps=c.num_timesteps
    ).tolist()
  return out
