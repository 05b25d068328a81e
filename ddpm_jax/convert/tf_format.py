"""The official TensorFlow checkpoints (hojonathanho/diffusion, `model.ckpt-N.{index,data-*}`).

Variables live under `model/` with the scopes of the official `unet.model`
(`model/down_1/block_0/conv1/W`, `model/mid/attn_1/q/b`, `model/norm_out/gamma`, ...). Conv kernels
are [kh, kw, in, out], dense and 1x1 ("nin") kernels [in, out] — Flax's layouts, so arrays are taken
as they are. Each variable's EMA copy is `<name>/ExponentialMovingAverage`; Adam slots (`/Adam`,
`/Adam_1`) and bookkeeping outside `model/` are ignored, except `global_step`, which gives the step.
"""

import glob
import os
import re

from ddpm_jax.convert import params as params_lib
from ddpm_jax.errors import CheckpointError

EMA_SUFFIX = "/ExponentialMovingAverage"
_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
_TOP_LEVEL_SCOPES = {
  "conv_in": "conv_in",
  "temb_dense0": "temb/dense0",
  "temb_dense1": "temb/dense1",
  "norm_out": "norm_out",
  "conv_out": "conv_out",
  "mid_block_1": "mid/block_1",
  "mid_attn": "mid/attn_1",
  "mid_block_2": "mid/block_2",
  # a conditional model's class embedding: the official (unconditional) models have none, so no
  # checkpoint holds this name and their shape reads as num_classes = 0
  "class_embed": "class_embed",
}
_LEVEL_MODULE = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$")


def tf_name(path) -> str:
  """The official name of one of our param paths: ('up_1_attn_0', 'q', 'kernel') ->
  model/up_1/attn_0/q/W."""
  module, *inner, leaf = path
  if module in _TOP_LEVEL_SCOPES:
    scope = _TOP_LEVEL_SCOPES[module]
  else:
    match = _LEVEL_MODULE.match(module)
    assert match, module
    direction, level, kind, index = match.groups()
    scope = f"{direction}_{level}/{kind}" + (f"_{index}" if index is not None else "")
  layer = inner[-1] if inner else module
  is_norm = layer.startswith("norm")  # GroupNorm: gamma/beta; dense, conv and nin: W/b
  name = {"kernel": "W", "scale": "gamma", "bias": "beta" if is_norm else "b", "embedding": "emb"}[
    leaf
  ]
  return "/".join(["model", scope, *inner, name])


def checkpoint_prefix(path: str) -> str | None:
  """The checkpoint prefix (`.../model.ckpt-N`) that `path` names, or None when it names no TF
  checkpoint.

  `path` may be the prefix, one of its files, or a folder holding exactly one checkpoint.
  """
  path = re.sub(r"(\.index|\.meta|\.data-\d+-of-\d+)$", "", path.rstrip("/"))
  if os.path.isfile(path + ".index"):
    return path
  if os.path.isdir(path):
    prefixes = sorted(name[: -len(".index")] for name in glob.glob(os.path.join(path, "*.index")))
    if len(prefixes) > 1:
      names = ", ".join(map(os.path.basename, prefixes))
      raise CheckpointError(
        f"{path} holds {len(prefixes)} TF checkpoints ({names}); name one, e.g. {prefixes[-1]}."
      )
    if prefixes:
      return prefixes[0]
  return None


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def read_checkpoint(prefix: str, *, raw: bool = False):
  """(Source over the EMA weights, or the raw ones when `raw`; the step from `global_step`, or
  None)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # TF's reader raises OpErrors, or IndexError ("Read less bytes than requested") for a short data
  # file.
  unreadable = (tf.errors.OpError, ValueError, IndexError)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  except unreadable as e:
    raise CheckpointError(
      f"Cannot read the TF checkpoint {prefix} (truncated or not a checkpoint?): {_first_line(e)}."
    ) from e
  weights = {n for n in shapes if n.startswith("model/") and not n.endswith(_SLOT_SUFFIXES)}
  ema = {n[: -len(EMA_SUFFIX)] for n in weights if n.endswith(EMA_SUFFIX)}
  plain = {n for n in weights if not n.endswith(EMA_SUFFIX)}
  if raw:
    if not plain:
      raise CheckpointError(f"The TF checkpoint {prefix} has no raw variables under model/.")
    selected = sorted(plain)
  else:
    if not ema:
      raise CheckpointError(
        f"The TF checkpoint {prefix} holds no {EMA_SUFFIX} copies of its model/ variables; "
        "pass --raw to import the raw weights."
      )
    if plain and ema != plain:
      odd = sorted(ema ^ plain)
      raise CheckpointError(
        f"The TF checkpoint {prefix} has {len(odd)} variable(s) under model/ with a raw copy "
        f"but no EMA copy or the reverse, e.g. {', '.join(odd[:5])}."
      )
    selected = sorted(n + EMA_SUFFIX for n in ema)
  arrays = {}
  for name in selected:
    try:
      arrays[name] = reader.get_tensor(name)
    except unreadable as e:
      raise CheckpointError(
        f"Cannot read {name} from the TF checkpoint {prefix} (truncated data file?): "
        f"{_first_line(e)}."
      ) from e
  step = None
  if "global_step" in shapes:
    step = int(reader.get_tensor("global_step"))
  suffix = "" if raw else EMA_SUFFIX
  source = params_lib.Source(
    description=f"the TF checkpoint {prefix}",
    arrays=arrays,
    name_of=lambda path, _num_levels: tf_name(path) + suffix,
    to_flax=lambda value, _rank, _leaf=None: value,
  )
  return source, step
