"""Format-independent half of the importers: weights of a foreign checkpoint -> this U-Net's params.

A `Source` says how each of our parameter paths (e.g. ('down_1_block_0', 'conv1', 'kernel')) is
named in a foreign checkpoint and how its array is laid out there; from it the model's shape is
inferred, checked against a config (naming every disagreeing key), and the params are collected with
missing, extra and misshapen weights reported by their foreign names.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.errors import CheckpointError
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet as unet_lib

_LISTED = 5  # how many names an error message lists


class Source(NamedTuple):
  """The weights of a foreign checkpoint and how our parameter paths map onto them."""

  description: str  # what the weights are, for messages: "the TF checkpoint /x/model.ckpt-10"
  arrays: dict  # foreign name -> numpy array in the foreign layout
  name_of: Callable[[tuple, int], str]  # (our param path, number of U-Net levels) -> foreign name
  # (foreign array, rank of our param, its leaf name e.g. "kernel" or "embedding"; optional, for
  # callers that pass two) -> our layout
  to_flax: Callable[[np.ndarray, int, str], np.ndarray]


class ModelShape(NamedTuple):
  """What the weights themselves say about the U-Net that produced them."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[int, ...]
  num_channels: int  # image channels in
  out_channels: int  # C, or 2C for learned variances
  resamp_with_conv: bool
  num_classes: int = 0  # class embeddings less the null label; 0: unconditional


def _capitalized(text: str) -> str:
  return text[:1].upper() + text[1:]


def _plural(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "s")


def _names_list(names) -> str:
  names = list(names)
  shown = ", ".join(repr(n) for n in names[:_LISTED])
  return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _get(source: Source, path, *, rank: int, num_levels: int = 1):
  """The array at one of our param paths in our layout, or None when the source lacks it."""
  value = source.arrays.get(source.name_of(path, num_levels))
  return None if value is None else source.to_flax(value, rank, path[-1])


def _count(exists) -> int:
  """The number of consecutive indices 0, 1, ... for which exists(i) holds."""
  n = 0
  while exists(n):
    n += 1
  return n


def infer_shape(source: Source) -> ModelShape:
  """Reads ch, ch_mult, blocks per level, attention levels and channel counts off the weights."""
  conv_in = _get(source, ("conv_in", "kernel"), rank=4)
  conv_out = _get(source, ("conv_out", "kernel"), rank=4)
  for name, value in (("conv_in", conv_in), ("conv_out", conv_out)):
    if value is None:
      raise CheckpointError(
        f"{_capitalized(source.description)} has no {source.name_of((name, 'kernel'), 1)!r}; "
        "is it a DDPM U-Net?"
      )
  ch = conv_in.shape[-1]
  level_width = lambda level: _get(source, (f"down_{level}_block_0", "conv1", "kernel"), rank=4)
  num_levels = _count(lambda level: level_width(level) is not None)
  num_res_blocks = _count(
    lambda i: _get(source, (f"down_0_block_{i}", "conv1", "kernel"), rank=4) is not None
  )
  if not num_levels:
    raise CheckpointError(
      f"{_capitalized(source.description)} has no "
      f"{source.name_of(('down_0_block_0', 'conv1', 'kernel'), 1)!r}; "
      "is it a DDPM U-Net?"
    )
  widths = [level_width(level).shape[-1] for level in range(num_levels)]
  if any(w % ch for w in widths):
    raise CheckpointError(
      f"{_capitalized(source.description)} has level widths {widths}, which are not multiples of "
      f"its {ch} base channels."
    )
  attention = tuple(
    level
    for level in range(num_levels)
    if _get(source, (f"down_{level}_attn_0", "norm", "scale"), rank=1) is not None
  )
  with_conv = (
    num_levels == 1 or _get(source, ("down_0_downsample", "conv", "kernel"), rank=4) is not None
  )
  class_embed = _get(source, ("class_embed", "embedding"), rank=2)
  return ModelShape(
    num_classes=0 if class_embed is None else class_embed.shape[0] - 1,
    ch=ch,
    ch_mult=tuple(w // ch for w in widths),
    num_res_blocks=num_res_blocks,
    attention_levels=attention,
    num_channels=conv_in.shape[-2],
    out_channels=conv_out.shape[-1],
    resamp_with_conv=with_conv,
  )


def _config_attention_resolutions(config) -> tuple[int, ...]:
  """The resolutions at which the config's U-Net really has attention."""
  size, num_levels = config.data.image_size, len(config.model.ch_mult)
  levels = unet_lib.attention_levels(
    image_size=size, num_levels=num_levels, attn_resolutions=tuple(config.model.attn_resolutions)
  )
  return tuple(size // 2**level for level in levels)


def check_against_config(
  shape: ModelShape, config, *, description: str, image_size: int | None = None
):
  """Raises ConfigError naming every config key that disagrees with the weights (and the image size,
  if known)."""
  c = shape.num_channels
  if shape.out_channels not in (c, 2 * c):
    raise CheckpointError(
      f"{_capitalized(description)} outputs {shape.out_channels} channels for {c} input channels; "
      f"a DDPM U-Net outputs {c} (or {2 * c} with learned variances)."
    )
  size = image_size or config.data.image_size
  found = {
    "model.ch": shape.ch,
    "model.ch_mult": shape.ch_mult,
    "model.num_res_blocks": shape.num_res_blocks,
    "model.attn_resolutions": tuple(size // 2**level for level in shape.attention_levels),
    "model.resamp_with_conv": shape.resamp_with_conv,
    "data.num_channels": c,
    "model.num_classes": shape.num_classes,
  }
  wanted = {
    "model.ch": config.model.ch,
    "model.ch_mult": tuple(config.model.ch_mult),
    "model.num_res_blocks": config.model.num_res_blocks,
    "model.attn_resolutions": _config_attention_resolutions(config),
    "model.resamp_with_conv": bool(config.model.resamp_with_conv),
    "data.num_channels": config.data.num_channels,
    "model.num_classes": unet_lib.num_classes(config.model),
  }
  if image_size is not None:
    found["data.image_size"], wanted["data.image_size"] = image_size, config.data.image_size
  diffs = [
    f"{key} (checkpoint {found[key]!r}, config {wanted[key]!r})"
    for key in found
    if found[key] != wanted[key]
  ]
  learned = shape.out_channels == 2 * c
  if learned != config.diffusion.var_type.startswith("learned"):
    kind = "learned" if learned else "fixed"
    diffs.append(
      f"diffusion.var_type (checkpoint: {kind} variances, out_channels={shape.out_channels}; "
      f"config {config.diffusion.var_type!r})"
    )
  if diffs:
    raise ConfigError(
      f"The model in {description} differs from the config in {'; '.join(diffs)}; pass the "
      "matching --config file or --config.<key>=<value> overrides."
    )


def _image_size_for(levels, model) -> int:
  """An image size at which `model` puts attention exactly at `levels` (the param tree depends on
  it)."""
  num_levels = len(model.ch_mult)
  no_attention = 2 ** (num_levels - 1) * (max(model.attn_resolutions, default=0) + 1)
  candidates = [r * 2**level for r in model.attn_resolutions for level in range(num_levels)] + [
    no_attention
  ]
  for size in candidates:
    if (
      size % 2 ** (num_levels - 1) == 0
      and unet_lib.attention_levels(
        image_size=size, num_levels=num_levels, attn_resolutions=model.attn_resolutions
      )
      == levels
    ):
      return size
  raise ConfigError(
    f"The weights have attention at levels {levels}, which a U-Net with "
    f"attn_resolutions={model.attn_resolutions} and {num_levels} levels never has."
  )


def expected_params(model, *, attention_levels, num_channels) -> dict:
  """Flat {path: ShapeDtypeStruct} of the model's params with attention at `attention_levels`
  (nothing is materialised)."""
  size = _image_size_for(tuple(attention_levels), model)
  x = jnp.zeros((1, size, size, num_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
  return traverse_util.flatten_dict(shapes)


def params_from_source(source: Source, *, model) -> dict:
  """`{'params': ...}` for `model` (float32, our layout) from a source; every foreign weight must be
  used."""
  shape = infer_shape(source)
  num_levels = len(model.ch_mult)
  expected = expected_params(
    model, attention_levels=shape.attention_levels, num_channels=shape.num_channels
  )
  names = {path: source.name_of(path, num_levels) for path in expected}
  missing = [name for name in names.values() if name not in source.arrays]
  if missing:
    raise CheckpointError(
      f"{_capitalized(source.description)} lacks {len(missing)} of the model's "
      f"{len(names)} weights: "
      f"{_names_list(missing)}."
    )
  unused = sorted(set(source.arrays) - set(names.values()))
  if unused:
    raise CheckpointError(
      f"{_plural(len(unused), 'weight')} in {source.description} "
      f"{'has' if len(unused) == 1 else 'have'} no place in the model: "
      f"{_names_list(unused)}."
    )
  params, misfits = {}, []
  for path, leaf in expected.items():
    value = source.to_flax(source.arrays[names[path]], len(leaf.shape), path[-1])
    if value.shape != leaf.shape:
      misfits.append(
        f"{names[path]!r} has shape {source.arrays[names[path]].shape}, which does not fit the "
        f"model's {'/'.join(path)} of shape {leaf.shape}"
      )
    params[path] = np.asarray(value, np.float32)
  if misfits:
    raise CheckpointError(
      f"{_plural(len(misfits), 'weight')} of {source.description} "
      f"{'has' if len(misfits) == 1 else 'have'} the wrong shape: "
      f"{'; '.join(misfits[:3])}{'; ...' if len(misfits) > 3 else ''}."
    )
  return {"params": traverse_util.unflatten_dict(params)}
