"""diffusers' `UNet2DModel` <-> this package's U-Net: names, layouts, model directories.

The Hub's `google/ddpm-*` models are the official TF checkpoints converted to `UNet2DModel`, which
maps one-to-one onto `ddpm_jax.models.unet.UNet`. A model directory holds `config.json` and
`diffusion_pytorch_model.safetensors` (or `.bin`, which needs PyTorch to read); a pipeline snapshot
holds them under `unet/`, with the scheduler's config under `scheduler/`. Nothing here reaches the
network.
"""

import io
import json
import re
from typing import NamedTuple

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors import numpy as safetensors_numpy

from ddpm_jax import storage
from ddpm_jax.convert import params as params_lib
from ddpm_jax.errors import CheckpointError
from ddpm_jax.errors import ConfigError
from ddpm_jax.models import unet as unet_lib

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TORCH_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_NAME = "scheduler_config.json"

# Our submodule names inside a block -> diffusers' names.
_RESNET_NAMES = {
  "norm1": "norm1",
  "conv1": "conv1",
  "temb_proj": "time_emb_proj",
  "norm2": "norm2",
  "conv2": "conv2",
  "nin_shortcut": "conv_shortcut",
}
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL_NAMES = {
  "conv_in": "conv_in",
  "temb_dense0": "time_embedding.linear_1",
  "temb_dense1": "time_embedding.linear_2",
  "norm_out": "conv_norm_out",
  "conv_out": "conv_out",
  "mid_block_1": "mid_block.resnets.0",
  "mid_attn": "mid_block.attentions.0",
  "mid_block_2": "mid_block.resnets.1",
  "class_embed": "class_embedding",
}
# The attention key names of older diffusers files (e.g. the Hub's google/ddpm-cifar10-32).
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEVEL_MODULE = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$")
# UNet2DModel settings that the weights do not show, and the values the official U-Net needs.
# What diffusers' UNet2DModel takes for a key its config.json leaves out (diffusers 0.42; checked
# against the installed diffusers by the tests). Where these differ from the official U-Net's
# settings, a config without the key describes another model.
DIFFUSERS_DEFAULTS = {
  "act_fn": "silu",
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "time_embedding_type": "positional",
  "center_input_sample": False,
  "norm_num_groups": 32,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
  "attn_norm_num_groups": None,
  "mid_block_type": "UNetMidBlock2D",
  "attention_head_dim": 8,
}
_FIXED_UNET_SETTINGS = {
  "act_fn": "silu",
  "flip_sin_to_cos": False,
  "freq_shift": 1,
  "time_embedding_type": "positional",
  "center_input_sample": False,
  "norm_num_groups": unet_lib.NUM_GROUPS,
  "norm_eps": unet_lib.NORM_EPS,
  "resnet_time_scale_shift": "default",
  "mid_block_scale_factor": 1,
  "downsample_padding": 0,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
  "attn_norm_num_groups": None,
  "mid_block_type": "UNetMidBlock2D",
}


# ----------------------------------------------------------------------------- names and layouts


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
      raise CheckpointError(f"The state dict holds both the legacy and the current name of {key}.")
    renamed[key] = value
  return renamed


def _module_key(name, num_levels):
  """Diffusers' path of one of our top-level submodules, e.g. up_3_attn_1 ->
  up_blocks.0.attentions.1."""
  if name in _TOP_LEVEL_NAMES:
    return _TOP_LEVEL_NAMES[name]
  match = _LEVEL_MODULE.match(name)
  assert match, name
  path, level, kind, index = match.groups()
  block = f"down_blocks.{level}" if path == "down" else f"up_blocks.{num_levels - 1 - int(level)}"
  child = {
    "block": f"resnets.{index}",
    "attn": f"attentions.{index}",
    "downsample": "downsamplers.0",
    "upsample": "upsamplers.0",
  }[kind]
  return f"{block}.{child}"


def diffusers_key(path, num_levels) -> str:
  """The diffusers state-dict key of one of our parameter paths, e.g. ('conv_in', 'kernel') ->
  conv_in.weight."""
  module, *inner, leaf = path
  names = [_module_key(module, num_levels)]
  for name in inner:  # a layer inside a block
    table = (
      _ATTN_NAMES if "attn" in module else _RESNET_NAMES if "block" in module else {"conv": "conv"}
    )
    names.append(table[name])
  names.append({"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}[leaf])
  return ".".join(names)


def _to_flax_layout(value, rank, leaf=None):
  """Torch layout -> Flax layout: conv OIHW -> HWIO, linear (or 1x1 conv) [out, in] -> [in, out];
  an embedding table [classes, dim] is the same in both."""
  if leaf == "embedding":
    return value
  if rank == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if rank == 2 and value.ndim in (2, 4) and value.shape[2:] in ((), (1, 1)):
    return value.reshape(value.shape[:2]).T
  return value


def _to_torch_layout(path, value):
  """Flax layout -> torch layout; our 1x1 `nin_shortcut` is a 1x1 Conv2d in diffusers, other dense
  layers Linear."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if path[-1] == "embedding":  # nn.Embed and torch.nn.Embedding: both [classes, dim]
    return value
  if value.ndim == 2:
    return value.T[:, :, None, None] if path[-2] == "nin_shortcut" else value.T
  return value


def state_dict_source(state_dict, *, description="the diffusers state dict") -> params_lib.Source:
  """A `Source` over a `UNet2DModel` state dict (numpy arrays or torch tensors; legacy attention
  names too)."""
  arrays = _modernize_attention_keys({key: _to_numpy(value) for key, value in state_dict.items()})
  return params_lib.Source(
    description=description, arrays=arrays, name_of=diffusers_key, to_flax=_to_flax_layout
  )


def unet_params_from_diffusers(state_dict, *, model: unet_lib.UNet):
  """Maps a diffusers `UNet2DModel` state dict (numpy arrays or torch tensors) to model's
  `{'params': ...}`."""
  return params_lib.params_from_source(state_dict_source(state_dict), model=model)


def unet_state_dict(params, *, num_levels: int) -> dict:
  """Our `{'params': ...}` -> a `UNet2DModel` state dict of contiguous float32 numpy arrays."""
  flat = traverse_util.flatten_dict(params["params"])
  return {
    diffusers_key(path, num_levels): np.ascontiguousarray(
      _to_torch_layout(path, np.asarray(value, np.float32))
    )
    for path, value in flat.items()
  }


# ----------------------------------------------------------------------------- UNet2DModel config


def diffusers_unet_config(model_config, *, image_size, num_channels, learned_variance) -> dict:
  """Keyword arguments for diffusers' `UNet2DModel` that build the same network as
  `create_model`."""
  model = unet_lib.create_model(
    model_config,
    image_size=image_size,
    num_channels=num_channels,
    learned_variance=learned_variance,
  )
  if not model.resamp_with_conv:
    raise ConfigError(
      "model.resamp_with_conv=False has no diffusers UNet2DModel equivalent "
      "(its down- and upsampling always use convolutions)."
    )
  num_levels = len(model.ch_mult)
  attn = unet_lib.attention_levels(
    image_size=image_size, num_levels=num_levels, attn_resolutions=model.attn_resolutions
  )
  down = tuple("AttnDownBlock2D" if lvl in attn else "DownBlock2D" for lvl in range(num_levels))
  up = tuple("AttnUpBlock2D" if lvl in attn else "UpBlock2D" for lvl in reversed(range(num_levels)))
  # A conditional model's labels 0 .. K-1 and the null label K: K + 1 rows of class_embedding,
  # added to the timestep embedding after its MLP in both networks.
  classes = {"num_class_embeds": model.num_classes + 1} if model.num_classes else {}
  return dict(
    **classes,
    sample_size=image_size,
    in_channels=num_channels,
    out_channels=model.out_ch,
    center_input_sample=False,
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    down_block_types=down,
    up_block_types=up,
    mid_block_type="UNetMidBlock2D",
    add_attention=True,
    block_out_channels=tuple(model.ch * m for m in model.ch_mult),
    layers_per_block=model.num_res_blocks,
    mid_block_scale_factor=1,
    downsample_padding=0,
    downsample_type="conv",
    upsample_type="conv",
    dropout=model.dropout,
    act_fn="silu",
    attention_head_dim=None,  # None: head dim = channels, one head
    norm_num_groups=unet_lib.NUM_GROUPS,
    norm_eps=unet_lib.NORM_EPS,
    resnet_time_scale_shift="default",
  )


def check_unet_config(unet_config: dict, *, path: str) -> None:
  """Refuses a `UNet2DModel` config whose settings (beyond the weights' shapes) differ from the
  official U-Net."""
  if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ConfigError(f"{path} describes a {unet_config['_class_name']}, not a UNet2DModel.")
  settings = {
    key: unet_config.get(key, DIFFUSERS_DEFAULTS.get(key)) for key in _FIXED_UNET_SETTINGS
  }
  # a learned class embedding table (class_embed_type None) is this U-Net's model.num_classes
  if isinstance(settings["num_class_embeds"], int) and settings["class_embed_type"] is None:
    settings["num_class_embeds"] = None
  diffs = [
    f"{key}={settings[key]!r}{'' if key in unet_config else ' (absent: diffusers default)'} "
    f"(the official U-Net has {value!r})"
    for key, value in _FIXED_UNET_SETTINGS.items()
    if settings[key] != value
  ]
  # diffusers splits attention into channels // attention_head_dim heads (null: one head, as here).
  head_dim, widths = (
    unet_config.get("attention_head_dim", DIFFUSERS_DEFAULTS["attention_head_dim"]),
    list(unet_config.get("block_out_channels", ())),
  )
  attended = [
    w for w, kind in zip(widths, unet_config.get("down_block_types", ())) if kind.startswith("Attn")
  ]
  if head_dim is not None and any(w != head_dim for w in attended + widths[-1:]):
    diffs.append(
      f"attention_head_dim={head_dim!r} (the official U-Net has one attention head: null)"
    )
  if diffs:
    raise ConfigError(f"{path} has settings this U-Net cannot reproduce: {'; '.join(diffs)}.")


def image_size_of(unet_config: dict, *, path: str) -> int | None:
  """The square image size of a `UNet2DModel` config (`sample_size`), or None when it does not
  say."""
  size = unet_config.get("sample_size")
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ConfigError(f"{path} has sample_size={size}; this U-Net takes square images only.")
    size = size[0]
  return None if size is None else int(size)


# ----------------------------------------------------------------------------- model directories


class ModelDir(NamedTuple):
  """What a diffusers model directory holds, read into memory."""

  source: params_lib.Source
  unet_config: dict
  scheduler_config: dict | None
  scheduler_path: str | None
  image_size: int | None


def unet_dir(path: str) -> str | None:
  """The folder holding the UNet2DModel's config.json: `path` itself, or `path/unet` in a pipeline
  snapshot."""
  for candidate in (storage.join(path, "unet"), path):
    if storage.is_file(storage.join(candidate, CONFIG_NAME)):
      return candidate
  return None


def _read_json(path: str) -> dict:
  try:
    value = storage.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"Cannot read {path}: {e}.") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} does not hold a JSON object.")
  return value


def _read_weights(folder: str) -> tuple[dict, str]:
  """The state dict in `folder` (safetensors preferred) and the file it came from."""
  path = storage.join(folder, WEIGHTS_NAME)
  if storage.is_file(path):
    try:
      return safetensors_numpy.load(storage.read_bytes(path)), path
    except (SafetensorError, OSError) as e:
      raise CheckpointError(
        f"Cannot read {path} (truncated or not a safetensors file?): {e}."
      ) from e
  path = storage.join(folder, TORCH_WEIGHTS_NAME)
  if not storage.is_file(path):
    raise CheckpointError(
      f"{folder} has a {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {TORCH_WEIGHTS_NAME}."
    )
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only .bin weights need it)
  except ImportError as e:
    raise ConfigError(
      f"{path} is a PyTorch pickle, which needs PyTorch to read: install torch, or use "
      f"the model's {WEIGHTS_NAME}."
    ) from e
  try:
    with storage.open_read(path) as f:
      return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True), path
  except (
    Exception
  ) as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
    raise CheckpointError(
      f"Cannot read {path} (truncated or not a PyTorch state dict?): {e}."
    ) from e


def _scheduler_file(path: str, folder: str) -> str | None:
  for candidate in (
    storage.join(folder, SCHEDULER_NAME),
    storage.join(path, SCHEDULER_NAME),
    storage.join(path, "scheduler", SCHEDULER_NAME),
  ):
    if storage.is_file(candidate):
      return candidate
  return None


def read_model_dir(path: str) -> ModelDir:
  """Reads a diffusers model directory or pipeline snapshot (config, weights, scheduler config if
  any)."""
  folder = unet_dir(path)
  if folder is None:
    raise CheckpointError(
      f"{path} has no {CONFIG_NAME} (nor unet/{CONFIG_NAME}); it is not a diffusers model."
    )
  config_path = storage.join(folder, CONFIG_NAME)
  unet_config = _read_json(config_path)
  check_unet_config(unet_config, path=config_path)
  state_dict, weights_path = _read_weights(folder)
  scheduler_path = _scheduler_file(path, folder)
  source = state_dict_source(state_dict, description=f"the diffusers weights {weights_path}")
  return ModelDir(
    source=source,
    unet_config=unet_config,
    scheduler_config=_read_json(scheduler_path) if scheduler_path else None,
    scheduler_path=scheduler_path,
    image_size=image_size_of(unet_config, path=config_path),
  )


def write_model_dir(
  out: str, *, state_dict: dict, unet_config: dict, scheduler_config: dict
) -> None:
  """Writes a flat model directory (the Hub's layout) that UNet2DModel and DDPMPipeline both
  load."""
  storage.write_bytes(
    storage.join(out, WEIGHTS_NAME), safetensors_numpy.save(state_dict, metadata={"format": "pt"})
  )
  files = {
    CONFIG_NAME: {"_class_name": "UNet2DModel", **unet_config},
    SCHEDULER_NAME: scheduler_config,
    # DDPMPipeline loads each component from the root when it has no subfolder of that name.
    "model_index.json": {
      "_class_name": "DDPMPipeline",
      "scheduler": ["diffusers", "DDPMScheduler"],
      "unet": ["diffusers", "UNet2DModel"],
    },
  }
  for name, content in files.items():
    storage.write_text(
      storage.join(out, name), json.dumps(content, indent=2, sort_keys=True) + "\n"
    )
