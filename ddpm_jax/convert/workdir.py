"""Published checkpoints into a workdir that `--mode=sample` and the evaluation modes read
unchanged, and a workdir's weights out to a diffusers model directory.

An imported workdir holds one orbax checkpoint (params = EMA params = the imported weights, a fresh
optimizer state, at the source's step when it is known, else 0) and the config as config.json.
Nothing is written until every check has passed, and existing checkpoints or folders are replaced
only when asked to.
"""

import uuid
from typing import NamedTuple

import jax
import ml_collections
from absl import logging

from ddpm_jax import checkpoint
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax.convert import diffusers_format
from ddpm_jax.convert import params as params_lib
from ddpm_jax.convert import scheduler as scheduler_lib
from ddpm_jax.convert import tf_format
from ddpm_jax.errors import CheckpointError
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet as unet_lib

DIFFUSERS, TF = "diffusers", "tf"


class Imported(NamedTuple):
  """What `import_checkpoint` wrote."""

  checkpoint_dir: str
  step: int
  num_params: int
  description: str  # where the weights came from


def detect_format(src: str) -> tuple[str, str]:
  """('diffusers', model folder) or ('tf', checkpoint prefix) for a path; CheckpointError for
  anything else."""
  if storage.is_dir(src) and diffusers_format.unet_dir(src):
    return DIFFUSERS, src
  prefix = tf_format.checkpoint_prefix(src)
  if prefix is not None:
    return TF, prefix
  if not storage.exists(src):
    raise CheckpointError(f"{src} does not exist.")
  raise CheckpointError(
    f"{src} is neither a diffusers model directory ({diffusers_format.CONFIG_NAME} + "
    f"{diffusers_format.WEIGHTS_NAME}) nor an official TF checkpoint "
    "(model.ckpt-N.index + .data-*)."
  )


def has_checkpoints(workdir: str) -> bool:
  return bool(storage.list_names(checkpoint.checkpoint_dir(workdir)))


def _read_source(src: str, *, config, raw: bool):
  """(Source, step or None, image size or None) of `src`, its scheduler config checked against
  `config`."""
  kind, path = detect_format(src)
  if kind == TF:
    source, step = tf_format.read_checkpoint(path, raw=raw)
    return source, step, None
  if raw:
    raise ConfigError(
      "--raw picks the raw weights of a TF checkpoint; a diffusers model directory holds only "
      "one set of weights."
    )
  model_dir = diffusers_format.read_model_dir(path)
  if model_dir.scheduler_config is not None:
    scheduler_lib.check_scheduler(model_dir.scheduler_config, config, path=model_dir.scheduler_path)
  return model_dir.source, None, model_dir.image_size


def _write_checkpoint(workdir: str, *, state, config) -> str:
  """Writes `state` as the only checkpoint of `workdir` (replacing any), then config.json; returns
  its folder. The checkpoint is written beside the target first, so a failed import leaves the
  workdir as it was."""
  staging = storage.join(workdir, f".import-{uuid.uuid4().hex[:8]}")
  try:
    manager = checkpoint.make_manager(staging, keep=1)
    checkpoint.save(manager, state=state, config=config, force=True)
    manager.wait_until_finished()
    manager.close()
    target = checkpoint.checkpoint_dir(workdir)
    if storage.exists(target):  # only reached with overwrite=True, after every check passed
      storage.move(target, storage.join(staging, "replaced"))
    storage.move(checkpoint.checkpoint_dir(staging), target)
  finally:
    storage.remove_tree(staging)
  checkpoint.write_config(workdir, config)
  return storage.join(target, str(int(state.step)))


def import_checkpoint(
  src: str,
  *,
  config: ml_collections.ConfigDict,
  workdir: str,
  raw: bool = False,
  overwrite: bool = False,
) -> Imported:
  """Imports a diffusers model directory or an official TF checkpoint into `workdir` under
  `config`."""
  if has_checkpoints(workdir) and not overwrite:
    raise CheckpointError(
      f"{checkpoint.checkpoint_dir(workdir)} already holds checkpoints; choose a new "
      "--workdir or pass --overwrite to replace them."
    )
  built = state_lib.build(config)  # validates the config before anything is read
  source, step, image_size = _read_source(src, config=config, raw=raw)
  shape = params_lib.infer_shape(source)
  params_lib.check_against_config(
    shape, config, description=source.description, image_size=image_size
  )
  params = params_lib.params_from_source(source, model=built.model)
  step = 0 if step is None else step
  logging.info("Writing the checkpoint of step %d to %s.", step, checkpoint.checkpoint_dir(workdir))
  # One jitted program: eagerly, the optimizer's zeros would compile one small program per
  # parameter.
  state = jax.jit(lambda p: state_lib.state_from_params(p, built.tx, seed=config.seed, step=step))(
    params
  )
  path = _write_checkpoint(workdir, state=state, config=config)
  return Imported(
    checkpoint_dir=path,
    step=step,
    num_params=unet_lib.count_params(params),
    description=source.description,
  )


def _check_new_folder(out: str, *, overwrite: bool) -> None:
  if storage.is_file(out):
    raise ConfigError(f"{out} is a file, not a folder.")
  if storage.list_names(out) and not overwrite:
    raise ConfigError(
      f"{out} already exists; choose a new folder or pass --overwrite to replace it."
    )


def export_diffusers(
  workdir: str, out: str, *, raw: bool = False, step: int = -1, overwrite: bool = False
):
  """Writes the EMA params (or raw ones) of a workdir's checkpoint as a diffusers model directory
  `out`.

  Returns (out, step). UNet2DModel.from_pretrained(out) and DDPMPipeline.from_pretrained(out) load
  it.
  """
  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"{workdir} has no config.json; is it a ddpm_jax workdir?")
  config = ml_collections.ConfigDict(saved)
  _check_new_folder(out, overwrite=overwrite)
  built = state_lib.build(config)
  unet_config = diffusers_format.diffusers_unet_config(
    config.model,
    image_size=config.data.image_size,
    num_channels=config.data.num_channels,
    learned_variance=built.diffusion.learned_variance,
  )
  scheduler_config = scheduler_lib.scheduler_config(config)
  manager = checkpoint.make_manager(workdir, keep=1, read_only=True)
  step = checkpoint.resolve_step(manager, workdir, step)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(config), mesh=parallel.make_mesh()
  )
  state = checkpoint.restore(manager, abstract_state=abstract, step=step)
  params = jax.device_get(state.params if raw else state.ema_params)
  state_dict = diffusers_format.unet_state_dict(params, num_levels=len(config.model.ch_mult))
  out = storage.resolve(out)
  # Written beside `out` first: a failed export leaves what was there.
  staging = storage.join(storage.parent(out), f".export-{uuid.uuid4().hex[:8]}")
  try:
    diffusers_format.write_model_dir(
      storage.join(staging, "model"),
      state_dict=state_dict,
      unet_config=unet_config,
      scheduler_config=scheduler_config,
    )
    if storage.exists(out):  # empty, or overwrite=True
      storage.move(out, storage.join(staging, "replaced"))
    storage.move(storage.join(staging, "model"), out)
  finally:
    storage.remove_tree(staging)
  return out, step
