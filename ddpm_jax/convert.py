"""Import of published checkpoints into this package's U-Net.

Diffusers' `UNet2DModel` (the Hub's `google/ddpm-*` models are the official TF checkpoints converted to
it) maps one-to-one onto `ddpm_jax.models.unet.UNet`; this module translates names and layouts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet as unet_lib

# Our submodule names inside a block -> diffusers' names.
_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                 "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL_NAMES = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1",
                    "temb_dense1": "time_embedding.linear_2", "norm_out": "conv_norm_out",
                    "conv_out": "conv_out",
                    "mid_block_1": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0",
                    "mid_block_2": "mid_block.resnets.1"}
# The attention key names of older diffusers files (e.g. the Hub's google/ddpm-cifar10-32).
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEVEL_MODULE = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$")


def _to_numpy(value):
  """A numpy array from a numpy array or a torch tensor (torch itself is not imported here)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _modernize_attention_keys(arrays):
  """Renames legacy attention keys (query/key/value/proj_attn) to the current diffusers names."""
  renamed = {}
  for key, value in arrays.items():
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTN_NAMES:
      key = ".".join(parts[:-2] + [_LEGACY_ATTN_NAMES[parts[-2]], parts[-1]])
    if key in renamed:
      raise ConfigError(f"The state dict holds both the legacy and the current name of {key}.")
    renamed[key] = value
  return renamed


def _module_key(name, num_levels):
  """Diffusers' path of one of our top-level submodules, e.g. up_3_attn_1 -> up_blocks.0.attentions.1."""
  if name in _TOP_LEVEL_NAMES:
    return _TOP_LEVEL_NAMES[name]
  match = _LEVEL_MODULE.match(name)
  assert match, name
  path, level, kind, index = match.groups()
  block = f"down_blocks.{level}" if path == "down" else f"up_blocks.{num_levels - 1 - int(level)}"
  child = {"block": f"resnets.{index}", "attn": f"attentions.{index}", "downsample": "downsamplers.0",
           "upsample": "upsamplers.0"}[kind]
  return f"{block}.{child}"


def _diffusers_key(path, num_levels):
  """The diffusers state-dict key of one of our parameter paths, e.g. ('conv_in', 'kernel')."""
  module, *inner, leaf = path
  names = [_module_key(module, num_levels)]
  for name in inner:  # a layer inside a block
    table = _ATTN_NAMES if "attn" in module else _RESNET_NAMES if "block" in module else {"conv": "conv"}
    names.append(table[name])
  names.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(names)


def _to_flax_layout(value, shape):
  """Torch layout -> Flax layout: conv OIHW -> HWIO, linear (or 1x1 conv) [out, in] -> [in, out]."""
  if len(shape) == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if len(shape) == 2 and value.ndim in (2, 4) and value.shape[2:] in ((), (1, 1)):
    return value.reshape(value.shape[:2]).T
  return value


def _diffusers_attention_levels(keys, num_levels):
  """The levels at which a diffusers state dict has attention blocks (from down and up blocks)."""
  levels = set()
  for key in keys:
    if match := re.match(r"down_blocks\.(\d+)\.attentions\.", key):
      levels.add(int(match.group(1)))
    elif match := re.match(r"up_blocks\.(\d+)\.attentions\.", key):
      levels.add(num_levels - 1 - int(match.group(1)))
  return tuple(sorted(levels))


def _image_size_for(levels, model):
  """An image size at which `model` puts attention exactly at `levels` (the param tree depends on it)."""
  num_levels = len(model.ch_mult)
  no_attention = 2 ** (num_levels - 1) * (max(model.attn_resolutions, default=0) + 1)
  candidates = [r * 2**level for r in model.attn_resolutions for level in range(num_levels)] + [no_attention]
  for size in candidates:
    if size % 2 ** (num_levels - 1) == 0 and unet_lib.attention_levels(
        image_size=size, num_levels=num_levels, attn_resolutions=model.attn_resolutions) == levels:
      return size
  raise ConfigError(f"The state dict has attention at levels {levels}, which a U-Net with "
                   f"attn_resolutions={model.attn_resolutions} and {num_levels} levels never has.")


def _expected_params(model, *, levels, in_channels):
  """Shapes of the model's params when its attention is at `levels` (no arrays are materialised)."""
  size = _image_size_for(levels, model)
  x = jnp.zeros((1, size, size, in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]


def unet_params_from_diffusers(state_dict, *, model: unet_lib.UNet):
  """Maps a diffusers `UNet2DModel` state dict (numpy arrays or torch tensors) to model's `{'params': ...}`."""
  arrays = _modernize_attention_keys({key: _to_numpy(value) for key, value in state_dict.items()})
  if "conv_in.weight" not in arrays:
    raise ConfigError("The diffusers state dict has no 'conv_in.weight'; is it a UNet2DModel state dict?")
  num_levels = len(model.ch_mult)
  expected = _expected_params(model, levels=_diffusers_attention_levels(arrays, num_levels),
                              in_channels=arrays["conv_in.weight"].shape[1])
  expected = traverse_util.flatten_dict(expected)
  params = {}
  for path, leaf in expected.items():
    key = _diffusers_key(path, num_levels)
    if key not in arrays:
      raise ConfigError(f"The diffusers state dict has no {key!r}, needed for the model's {'/'.join(path)}.")
    value = _to_flax_layout(arrays[key], leaf.shape)
    if value.shape != leaf.shape:
      raise ConfigError(f"{key!r} has shape {arrays[key].shape}, which does not fit the model's "
                       f"{'/'.join(path)} of shape {leaf.shape}.")
    params[path] = value.astype(np.float32)
  used = {_diffusers_key(path, num_levels) for path in expected}
  unused = sorted(set(arrays) - used)
  if unused:
    raise ConfigError(f"{len(unused)} diffusers weights have no place in the model, e.g. {unused[:5]}.")
  return {"params": traverse_util.unflatten_dict(params)}


def diffusers_unet_config(model_config, *, image_size, num_channels, learned_variance) -> dict:
  """Keyword arguments for diffusers' `UNet2DModel` that build the same network as `create_model`."""
  model = unet_lib.create_model(model_config, image_size=image_size, num_channels=num_channels,
                                learned_variance=learned_variance)
  if not model.resamp_with_conv:
    raise ConfigError("model.resamp_with_conv=False has no diffusers UNet2DModel equivalent "
                     "(its down- and upsampling always use convolutions).")
  num_levels = len(model.ch_mult)
  attn = unet_lib.attention_levels(image_size=image_size, num_levels=num_levels,
                                   attn_resolutions=model.attn_resolutions)
  down = tuple("AttnDownBlock2D" if lvl in attn else "DownBlock2D" for lvl in range(num_levels))
  up = tuple("AttnUpBlock2D" if lvl in attn else "UpBlock2D" for lvl in reversed(range(num_levels)))
  return dict(
      sample_size=image_size, in_channels=num_channels, out_channels=model.out_ch,
      center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
      down_block_types=down, up_block_types=up,
      mid_block_type="UNetMidBlock2D", add_attention=True,
      block_out_channels=tuple(model.ch * m for m in model.ch_mult), layers_per_block=model.num_res_blocks,
      mid_block_scale_factor=1, downsample_padding=0, downsample_type="conv", upsample_type="conv",
      dropout=model.dropout, act_fn="silu", attention_head_dim=None,  # None: head dim = channels, one head
      norm_num_groups=unet_lib.NUM_GROUPS, norm_eps=unet_lib.NORM_EPS, resnet_time_scale_shift="default",
  )
