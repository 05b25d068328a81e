"""Fine-tuning: the first weights of a run from config.training.init_from instead of the paper's
random initialisation.

The source is a workdir of this project (the EMA weights of its newest intact checkpoint, trained or
imported), a diffusers model directory or an official TF checkpoint (its EMA weights, read with
`convert`'s readers). The run then starts as any other: params = EMA = those weights, a fresh
optimizer state, step 0, and its own key from config.seed. Training calls this only when the run has
no checkpoint yet, so a resumed fine-tuning run never reads the source again.

A class-conditional model (Ho & Salimans 2022) may start from an unconditional one: its class
embedding, which the source lacks, starts at zero, so at step 0 the model gives the source's outputs
for every label and the null label alike.
"""

from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax.convert import diffusers_format
from ddpm_jax.convert import params as params_lib
from ddpm_jax.convert import tf_format
from ddpm_jax.convert import workdir as workdir_lib
from ddpm_jax.errors import CheckpointError
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet as unet_lib

KEY = "config.training.init_from"
# The params a source may lack, started at zero: a conditional model's class embedding (added to the
# timestep embedding, so zero rows leave the unconditional network's outputs unchanged).
ZERO_IF_MISSING = (("class_embed", "embedding"),)


class Filled(NamedTuple):
  """The params for the config's model and which of them the source did not have."""

  params: dict  # {'params': ...}, NumPy float32
  zeroed: tuple  # paths (e.g. ('class_embed', 'embedding')) the source lacks, started at zero


def is_workdir(src: str) -> bool:
  """Whether `src` is a workdir of this project: it has a checkpoints folder (a diffusers directory
  has a config.json too)."""
  return storage.is_dir(checkpoint.checkpoint_dir(src))


def _workdir_source(src: str, *, mesh) -> params_lib.Source:
  """The EMA weights of the newest intact checkpoint of a workdir, under our own param names."""
  saved = checkpoint.read_config(src)
  if saved is None:
    raise CheckpointError(f"{KEY} = {src!r} has checkpoints but no config.json to build them with.")
  source_config = ml_collections.ConfigDict(saved)
  try:
    ema, step = checkpoint.restore_ema_params(
      source_config, src, built=state_lib.build(source_config), mesh=mesh
    )
  except CheckpointError as e:
    raise CheckpointError(f"{KEY} = {src!r}: {e}") from None
  arrays = {
    "/".join(path): np.asarray(value)
    for path, value in traverse_util.flatten_dict(jax.device_get(ema)["params"]).items()
  }
  return params_lib.Source(
    description=f"the EMA weights of step {step} of the run in {storage.resolve(src)}",
    arrays=arrays,
    name_of=lambda path, _num_levels: "/".join(path),
    to_flax=lambda value, _rank, _leaf: value,
  )


def read_source(src: str, *, mesh) -> params_lib.Source:
  """The weights `src` holds (a workdir, a diffusers model directory or a TF checkpoint)."""
  if is_workdir(src):
    return _workdir_source(src, mesh=mesh)
  try:
    kind, path = workdir_lib.detect_format(src)
  except CheckpointError:
    raise CheckpointError(
      f"{KEY} = {src!r} is neither a workdir of this project (config.json + checkpoints/), a "
      f"diffusers model directory ({diffusers_format.CONFIG_NAME} + "
      f"{diffusers_format.WEIGHTS_NAME}) nor an official TF checkpoint (model.ckpt-N.index + "
      ".data-*)" + ("" if storage.exists(src) else "; it does not exist") + "."
    ) from None
  if kind == workdir_lib.TF:
    data.hide_accelerators_from_tensorflow()  # TensorFlow only reads the file; JAX keeps devices
    return tf_format.read_checkpoint(path, raw=False)[0]
  return diffusers_format.read_model_dir(path).source


def _shape(value) -> str:
  return "x".join(map(str, value.shape)) or "scalar"


def fit_params(source: params_lib.Source, expected: dict, *, num_levels: int, zero_if_missing=()):
  """`Filled` params for a model whose flat param shapes are `expected` ({path: ShapeDtypeStruct}),
  taken from `source`; a ConfigError naming the first tensors that disagree.

  The paths in `zero_if_missing` that the source lacks start at zero instead of being refused.
  """
  params, zeroed, used = {}, [], set()
  advice = "set config.model (and data.num_channels, diffusion.var_type) to the source's model"
  for path, leaf in expected.items():
    name = source.name_of(path, num_levels)
    ours = f"the config's {'/'.join(path)} ({_shape(leaf)})"
    if name not in source.arrays:
      if path not in zero_if_missing:
        raise ConfigError(
          f"The weights in {source.description} do not fit the config's model: it has no {name!r} "
          f"for {ours}; {advice}."
        )
      params[path] = np.zeros(leaf.shape, np.float32)
      zeroed.append(path)
      continue
    used.add(name)
    value = source.to_flax(source.arrays[name], len(leaf.shape), path[-1])
    if tuple(value.shape) != tuple(leaf.shape):
      raise ConfigError(
        f"The weights in {source.description} do not fit the config's model: the first that "
        f"disagree are {name!r} ({_shape(value)}) and {ours}; {advice}."
      )
    params[path] = np.asarray(value, np.float32)
  unused = [n for n in sorted(source.arrays) if n not in used]
  if unused:
    raise ConfigError(
      f"The weights in {source.description} do not fit the config's model: {len(unused)} of them "
      f"have no place in it, the first {unused[0]!r} ({_shape(source.arrays[unused[0]])}); "
      f"{advice}."
    )
  return Filled({"params": traverse_util.unflatten_dict(params)}, tuple(zeroed))


def expected_params(config, built, *, mesh) -> dict:
  """Flat {path: ShapeDtypeStruct} of the params of the model `config` describes."""
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(config), mesh=mesh
  )
  return traverse_util.flatten_dict(abstract.params["params"])


def _zeroed_text(zeroed) -> str:
  """What the log says about the params the source lacked."""
  if not zeroed:
    return ""
  if tuple(zeroed) == ZERO_IF_MISSING:
    return (
      "; the source is unconditional, so the class embedding starts at zero and the model gives "
      "the source's outputs for every label until it learns them"
    )
  return "; started at zero as the source lacks them: " + ", ".join("/".join(p) for p in zeroed)


def initial_state(config, *, built, mesh) -> state_lib.TrainState:
  """The step-0 train state of a fine-tuning run: params = EMA = the weights of
  config.training.init_from, a fresh optimizer state, the run's own key; replicated on `mesh`."""
  source = read_source(config.training.init_from, mesh=mesh)
  fitted = fit_params(
    source,
    expected_params(config, built, mesh=mesh),
    num_levels=len(config.model.ch_mult),
    zero_if_missing=ZERO_IF_MISSING,
  )
  state = jax.jit(
    lambda p: state_lib.state_from_params(p, built.tx, seed=config.seed),
    out_shardings=parallel.replicated(mesh),
  )(fitted.params)
  logging.info(
    "Fine-tuning from %s (%s parameters): params and EMA start there, with a fresh optimizer at "
    "step 0%s.",
    source.description,
    f"{unet_lib.count_params(state.params):,}",
    _zeroed_text(fitted.zeroed),
  )
  return state
