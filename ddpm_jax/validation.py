"""Every config setting is checked here, once, for the mode being run, before anything heavy starts.

`validate(config, mode=...)` raises one ConfigError naming the first bad key and its value; it needs
no device, no dataset and no checkpoint. Each config section has one small check function in
SECTION_CHECKS; a new section adds one. `check_topology` adds what needs the device and process
counts (each global batch divisible by them), and `check` runs both: every entry point of a mode
calls it first. What only reading a file can tell (a dataset's splits, a checkpoint's contents)
stays with the code that reads it.
"""

import math
import numbers

import jax

from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import repaint
from ddpm_jax import sampling
from ddpm_jax import storage
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet


def _fail(path: str, value, rule: str):
  raise ConfigError(f"config.{path} = {value!r} {rule}.")


def _int(section, path: str, name: str, *, minimum: int):
  """An integer (not a bool) >= minimum."""
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    _fail(f"{path}.{name}", value, f"must be an integer >= {minimum}")


def _real(section, path: str, name: str, *, above=None, at_least=None, below=None):
  """A finite number in the given bounds (above: strict lower, at_least: inclusive lower, below:
  strict upper)."""
  value = section[name]
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  bounds = []
  if above is not None:
    ok, bounds = ok and value > above, bounds + [f"> {above}"]
  if at_least is not None:
    ok, bounds = ok and value >= at_least, bounds + [f">= {at_least}"]
  if below is not None:
    ok, bounds = ok and value < below, bounds + [f"< {below}"]
  if not ok:
    _fail(
      f"{path}.{name}",
      value,
      "must be a finite number" + (" " + " and ".join(bounds) if bounds else ""),
    )


def _unit_interval(section, path: str, name: str):
  """A decay rate or momentum: a number in [0, 1)."""
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
    _fail(f"{path}.{name}", value, "must be in [0, 1)")


def _choice(section, path: str, name: str, allowed):
  value = section[name]
  if value not in allowed:
    _fail(f"{path}.{name}", value, "is not one of " + ", ".join(map(repr, allowed)))


def _bool(section, path: str, name: str):
  if not isinstance(section[name], bool):
    _fail(f"{path}.{name}", section[name], "must be True or False")


def _path(section, path: str, name: str):
  """A path that is local or a gs:// URL this installation can reach ("" is allowed)."""
  if section[name]:
    storage.check_supported(section[name], what=f"config.{path}.{name}")


def _string(section, path: str, name: str, *, empty_ok: bool = True):
  value = section[name]
  if not isinstance(value, str) or (not empty_ok and not value):
    _fail(
      f"{path}.{name}", value, "must be a non-empty string" if not empty_ok else "must be a string"
    )


# ------------------------------------------------------------------------- one function per section


def check_seed(config, mode: str):
  del mode
  value = config.seed
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    _fail("seed", value, "must be an integer >= 0")


def check_data(config, mode: str):
  del mode
  c, p = config.data, "data"
  if c.dataset not in ("digits", "image_folder"):
    try:
      data._tfds_name(c.dataset)  # pylint: disable=protected-access  (the dataset names live in data.py)
    except ConfigError:
      _fail(f"{p}.dataset", c.dataset, "is not a known dataset; known: " + ", ".join(data._KNOWN))  # pylint: disable=protected-access
  _string(c, p, "split", empty_ok=False)
  _int(c, p, "image_size", minimum=1)
  _choice(c, p, "num_channels", (1, 3))
  _bool(c, p, "random_flip")
  _string(c, p, "tfds_data_dir")
  _path(c, p, "tfds_data_dir")
  _string(c, p, "image_folder")
  _path(c, p, "image_folder")
  _int(c, p, "num_workers", minimum=0)


def check_diffusion(config, mode: str):
  del mode
  c, p = config.diffusion, "diffusion"
  _choice(c, p, "beta_schedule", dm.BETA_SCHEDULES)
  _choice(c, p, "mean_type", dm.MEAN_TYPES)
  _choice(c, p, "var_type", dm.VAR_TYPES)
  _choice(c, p, "loss_type", dm.LOSS_TYPES)
  _int(c, p, "num_timesteps", minimum=1)
  _real(c, p, "beta_start", above=0)
  _real(c, p, "beta_end", above=0)
  _real(c, p, "hybrid_lambda", at_least=0)
  try:
    dm.check_types(mean_type=c.mean_type, var_type=c.var_type, loss_type=c.loss_type)
  except ConfigError as e:
    raise ConfigError(f"config.diffusion: {e}") from None
  try:
    dm.get_beta_schedule(
      c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end, num_timesteps=c.num_timesteps
    )  # NumPy only: every beta in (0, 1]
  except ConfigError as e:
    raise ConfigError(
      f"config.diffusion.beta_start = {c.beta_start!r}, beta_end = {c.beta_end!r}: {e}"
    ) from None


def check_model(config, mode: str):
  """The U-Net's own checks (levels, channels vs GroupNorm, image size, attention resolutions)."""
  _bool(config.model, "model", "resamp_with_conv")
  if "remat" in config.model:
    _bool(config.model, "model", "remat")
  if "num_classes" in config.model:  # (keys added later are optional in a saved config.json)
    _int(config.model, "model", "num_classes", minimum=0)
    if {"train", "bpd"} & set(_modes(config, mode)):  # the modes that read the dataset's labels
      _check_labeled_dataset(config)
  unet.create_model(
    config.model,
    image_size=config.data.image_size,
    num_channels=config.data.num_channels,
    learned_variance=config.diffusion.var_type in dm.LEARNED_VAR_TYPES,
  )


def _check_labeled_dataset(config):
  """A conditional model needs labels: the digits and cifar10 have 10 classes, an image folder one
  per sub-folder (checked when it is read), the other datasets none."""
  num_classes, dataset = config.model.num_classes, config.data.dataset
  if not num_classes or dataset == "image_folder":
    return
  found = data.NUM_CLASSES.get(dataset)
  if found is None:
    raise ConfigError(
      f"config.model.num_classes = {num_classes} needs class labels, but config.data.dataset = "
      f"{dataset!r} has none (labeled: {', '.join(data.NUM_CLASSES)}, or an image_folder with one "
      "sub-folder per class); use num_classes = 0."
    )
  if num_classes != found:
    _fail("model.num_classes", num_classes, f"must be {found}, the classes of {dataset!r}")


def check_training(config, mode: str):
  del mode
  c, p = config.training, "training"
  _int(c, p, "batch_size", minimum=1)
  _int(c, p, "num_steps", minimum=0)
  _real(c, p, "learning_rate", above=0)
  _int(c, p, "warmup_steps", minimum=0)
  _unit_interval(c, p, "adam_b1")
  _unit_interval(c, p, "adam_b2")
  _real(c, p, "adam_eps", above=0)
  _real(c, p, "grad_clip", above=0)
  _unit_interval(c, p, "ema_decay")
  _int(c, p, "steps_per_dispatch", minimum=1)
  for name in ("log_every", "checkpoint_every", "sample_every"):
    _int(c, p, name, minimum=0)
    if c[name] % c.steps_per_dispatch:
      _fail(
        f"{p}.{name}",
        c[name],
        f"must be a multiple of training.steps_per_dispatch = {c.steps_per_dispatch}",
      )
  _int(c, p, "num_grid_samples", minimum=0)
  _int(c, p, "keep_checkpoints", minimum=1)
  if "label_dropout" in c:
    _unit_interval(c, p, "label_dropout")
  if "init_from" in c:  # (keys added later are optional in a saved config.json)
    # only its form: it is read when a run starts, and a resumed run may have lost it
    _string(c, p, "init_from")
    _path(c, p, "init_from")


def check_sampling(config, mode: str):
  c, p = config.sampling, "sampling"
  _int(c, p, "batch_size", minimum=1)
  _int(c, p, "num_samples", minimum=1 if mode == "sample" else 0)
  _bool(c, p, "clip_denoised")
  _int(c, p, "progressive_every", minimum=0)
  _int(c, p, "num_progressive", minimum=0)
  _int(c, p, "checkpoint_step", minimum=-1)
  # method, num_steps, spacing and eta (respace/sampling own those rules; NumPy only, no devices)
  sampling.sampler_options(c, config.diffusion.num_timesteps, mean_type=config.diffusion.mean_type)
  if "guidance_scale" in c:
    _real(c, p, "guidance_scale", at_least=0)
    num_classes = unet.num_classes(config.model)
    if c.guidance_scale and not num_classes:
      _fail(
        f"{p}.guidance_scale", c.guidance_scale, "needs a conditional model (model.num_classes)"
      )
    if num_classes:
      labels_lib.parse(c.labels, num_classes=num_classes)


def check_evaluation(config, mode: str):
  c, p = config.evaluation, "evaluation"
  _int(c, p, "checkpoint_step", minimum=-1)
  _string(c, p, "split", empty_ok=False)
  _int(c, p, "batch_size", minimum=1)
  _int(c, p, "num_examples", minimum=1)
  _int(c, p, "num_fid_samples", minimum=2 if mode in ("fid", "evaluate_watch") else 1)
  _bool(c, p, "clip_denoised")
  if "sample_chunk_size" not in c:  # a config.json saved before the evaluation modes existed
    return
  _int(c, p, "sample_chunk_size", minimum=1)
  _string(c, p, "inception_weights")
  _path(c, p, "inception_weights")
  _choice(c, p, "fid_resize", ("tf", "pytorch"))
  if "fid_input" in c:  # (keys added later are optional in a saved config.json)
    _choice(c, p, "fid_input", ("uint8", "float"))
    _int(c, p, "is_splits", minimum=1)
  if not c.fid_reference_splits or not all(
    isinstance(s, str) and s for s in c.fid_reference_splits
  ):
    _fail(
      f"{p}.fid_reference_splits",
      c.fid_reference_splits,
      "must name one or more splits, e.g. ('train',)",
    )
  _int(c, p, "num_fid_reference", minimum=0)
  _string(c, p, "stats_dir")
  _path(c, p, "stats_dir")
  if not c.watch_modes or any(m not in ("bpd", "fid") for m in c.watch_modes):
    _fail(f"{p}.watch_modes", c.watch_modes, "must name one or more of bpd, fid")
  _real(c, p, "watch_poll_secs", above=0)
  _real(c, p, "watch_timeout_secs", at_least=0)


def check_interpolation(config, mode: str):
  """The interpolation keys (only --mode=interpolate reads the section)."""
  if mode != "interpolate":
    return
  c, p, T = config.interpolation, "interpolation", config.diffusion.num_timesteps
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
    _path(c, p, name)
    if c[name] and not storage.is_file(c[name]):
      raise ConfigError(f"config.interpolation.{name} = {c[name]!r} is not a file.")
  num_pairs = 1 if c.image1 else c.num_pairs
  if num_pairs < 1:
    raise ConfigError(f"config.interpolation.num_pairs = {c.num_pairs} must be >= 1.")
  if not 0 <= c.figure9_pair < num_pairs:
    raise ConfigError(
      f"config.interpolation.figure9_pair = {c.figure9_pair} is not one of the {num_pairs} "
      "pairs (0-indexed)."
    )


def check_inpaint(config, mode: str):
  """The inpainting keys (only --mode=inpaint reads the section); the mask's and images' contents
  are checked when they are read."""
  if mode != "inpaint":
    return
  c, p = config.inpaint, "inpaint"
  _string(c, p, "image")
  _path(c, p, "image")
  if c.image and not storage.exists(c.image):
    _fail(f"{p}.image", c.image, "does not exist (give an image file or a folder of images)")
  if not c.image:
    _string(c, p, "split", empty_ok=False)
    _int(c, p, "num_images", minimum=1)
  _string(c, p, "mask")
  if not c.mask:
    _fail(
      f"{p}.mask",
      c.mask,
      "is empty; give a PNG (white = keep, black = fill in) or a region to fill in, one of "
      + ", ".join(repaint.MASK_REGIONS),
    )
  if c.mask not in repaint.MASK_REGIONS:
    _path(c, p, "mask")
    if not storage.is_file(c.mask):
      _fail(
        f"{p}.mask",
        c.mask,
        "is neither a file nor one of the regions " + ", ".join(repaint.MASK_REGIONS),
      )
  _int(c, p, "num_samples", minimum=1)
  _int(c, p, "jump_length", minimum=1)
  _int(c, p, "num_resamplings", minimum=1)
  steps = sampling.record(config)["num_steps"]
  if c.num_resamplings > 1 and c.jump_length >= steps:
    _fail(
      f"{p}.jump_length",
      c.jump_length,
      f"must be smaller than the {steps} reverse steps of config.sampling for resampling to happen "
      "(or set inpaint.num_resamplings = 1)",
    )


def check_distributed(config, mode: str):
  del mode
  c, p = config.distributed, "distributed"
  _choice(c, p, "initialize", ("auto", "on", "off"))
  _string(c, p, "coordinator_address")
  _int(c, p, "num_processes", minimum=0)
  _int(c, p, "process_id", minimum=-1)


# In order: later checks may rely on earlier sections being valid (the model on data and diffusion).
SECTION_CHECKS = {
  "seed": check_seed,
  "data": check_data,
  "diffusion": check_diffusion,
  "model": check_model,
  "training": check_training,
  "sampling": check_sampling,
  "evaluation": check_evaluation,
  "interpolation": check_interpolation,
  "inpaint": check_inpaint,
  "distributed": check_distributed,
}


def validate(config, *, mode: str) -> None:
  """Raises ConfigError naming the first key whose value cannot work in `mode`; returns None if all
  can. Touches no device, and no file but the existence of the config's own paths."""
  for name, check in SECTION_CHECKS.items():
    if name in config:
      check(config, mode)


def _batch_sizes(config, mode: str) -> dict:
  """The global batch sizes `mode` splits over the devices, by config key."""
  ev = config.evaluation
  sizes = {
    "train": {"training.batch_size": config.training.batch_size},
    "sample": {"sampling.batch_size": config.sampling.batch_size},
    "interpolate": {"sampling.batch_size": config.sampling.batch_size},
    "inpaint": {"sampling.batch_size": config.sampling.batch_size},
    "bpd": {"evaluation.batch_size": ev.batch_size},
    "fid": {
      "sampling.batch_size": config.sampling.batch_size,
      "evaluation.batch_size": ev.batch_size,
    },
  }
  if mode == "evaluate_watch":
    return {k: v for m in ev.watch_modes for k, v in sizes[m].items()}
  return sizes.get(mode, {})


def check_topology(config, *, mode: str) -> None:
  """The checks that need the device and process counts (after jax.distributed has started): each
  global batch `mode` uses splits evenly over the devices of all processes."""
  for key, size in _batch_sizes(config, mode).items():
    parallel.check_batch_size(size, what=f"config.{key}")
  processes = jax.process_count()
  ev = config.evaluation
  if mode in ("fid", "evaluate_watch") and "fid" in _modes(config, mode) and processes > 1:
    if ev.sample_chunk_size % processes or ev.num_fid_samples % processes:
      raise ConfigError(
        f"With {processes} processes, config.evaluation.sample_chunk_size and "
        "num_fid_samples must be multiples of the process count."
      )


def _modes(config, mode: str) -> tuple[str, ...]:
  return tuple(config.evaluation.watch_modes) if mode == "evaluate_watch" else (mode,)


def check_init_from(config, workdir: str) -> None:
  """A fine-tuning run starts in a workdir of its own: its source is another run's."""
  src = config.training.get("init_from", "")
  if src and storage.resolve(src).rstrip("/") == storage.resolve(workdir).rstrip("/"):
    raise ConfigError(
      f"config.training.init_from = {src!r} is this run's own --workdir; fine-tune into a new "
      "workdir (the source run stays as it is)."
    )


def check(config, *, mode: str) -> None:
  """`validate` and `check_topology`: what every entry point of a mode runs first."""
  validate(config, mode=mode)
  check_topology(config, mode=mode)
