"""`python -m ddpm_jax.convert`: published checkpoints into a workdir and back out to diffusers.

References are independent of the importer: diffusers' own UNet2DModel computes the expected
outputs, and the TF checkpoints are written with the official variable names derived here from
diffusers' names (the scopes of the official `unet.model`), not from the importer's name table.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from diffusers import DDPMScheduler
from diffusers import UNet2DModel
from safetensors import numpy as safetensors_numpy

from conftest import REPO
from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from ddpm_jax import checkpoint
from ddpm_jax import convert
from ddpm_jax import diffusion as dm
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax.configs import celebahq256
from ddpm_jax.configs import cifar10
from ddpm_jax.convert import scheduler as scheduler_lib
from ddpm_jax.errors import ConfigError

TINY = tiny_config()  # 8x8, 1 channel, ch 32, ch_mult (1, 2), attention at 4x4, T = 10
TINY_FLAGS = [
  "--config=configs/digits.py",
  *config_flags(TINY, "data", "model", "diffusion", "training", "sampling"),
]
# The tiny U-Net as diffusers builds it, spelled out here rather than taken from
# convert.diffusers_unet_config.
TINY_UNET = dict(
  sample_size=8,
  in_channels=1,
  out_channels=1,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=None,
  norm_eps=1e-6,
  freq_shift=1,
  flip_sin_to_cos=False,
  downsample_padding=0,
)


@pytest.fixture(autouse=True, scope="module")
def no_torch_grad():
  with torch.no_grad():
    yield


def random_unet(seed, **kwargs) -> UNet2DModel:
  """A UNet2DModel with every weight random and O(1)-preserving (norms near 1, small biases)."""
  model = UNet2DModel(**kwargs).eval()
  generator = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=generator)
    if p.ndim == 1:
      p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
    else:
      p.copy_(noise / math.sqrt(p[0].numel()))
  return model


def inputs(batch, size, channels, *, num_timesteps):
  x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
  t = np.linspace(0, num_timesteps - 1, batch).astype(np.int32)
  return x, t


def torch_eps(model, x, t):
  out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
  return out.numpy().transpose(0, 2, 3, 1)


def restored_state(config, workdir):
  built = state_lib.build(config)
  manager = checkpoint.make_manager(str(workdir), keep=1, read_only=True)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(config), mesh=parallel.make_mesh()
  )
  return checkpoint.restore(manager, abstract_state=abstract), built.model


def jax_eps(model, params, x, t):
  return np.asarray(jax.jit(lambda p, x, t: model.apply(p, x, t, train=False))(params, x, t))


def assert_same_weights(folder, reference):
  """The exported weights are the reference's, bit for bit (outputs then agree as far as torch
  allows: the same weights loaded from disk already change its outputs by ~3e-6)."""
  exported = UNet2DModel.from_pretrained(folder).eval()
  expected = reference.state_dict()
  assert exported.state_dict().keys() == expected.keys()
  for key, value in exported.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), expected[key].numpy(), err_msg=key)
  return exported


def assert_close(ours, reference, what):
  error, scale = float(np.abs(ours - reference).max()), float(reference.std())
  print(f"{what}: max abs error {error:.2e}, output std {scale:.3f}")
  assert 0.1 < scale < 10 and error <= 1e-4, (error, scale)


def save_diffusers(model, folder, **scheduler):
  model.save_pretrained(folder, safe_serialization=True)
  if scheduler:
    DDPMScheduler(**scheduler).save_pretrained(folder)


def use_legacy_attention_names(path):
  """Renames to_q/to_k/to_v/to_out.0 to query/key/value/proj_attn, as in the Hub's google/ddpm-*
  files."""
  renames = {
    ".to_q.": ".query.",
    ".to_k.": ".key.",
    ".to_v.": ".value.",
    ".to_out.0.": ".proj_attn.",
  }
  arrays = safetensors_numpy.load_file(path)
  legacy = {}
  for key, value in arrays.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    legacy[key] = value
  assert "mid_block.attentions.0.proj_attn.weight" in legacy
  safetensors_numpy.save_file(legacy, path, metadata={"format": "pt"})


TINY_SCHEDULER = dict(
  num_train_timesteps=10, beta_start=0.01, beta_end=0.5, variance_type="fixed_large"
)


# ---------------------------------------------------------------------------- diffusers round trips


def test_cifar10_hub_model_imports_and_exports_exactly(tmp_path):
  """google/ddpm-cifar10-32's configuration at full size, through the documented command and
  back."""
  reference = random_unet(
    1,
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    dropout=0.1,
  )
  save_diffusers(
    reference,
    tmp_path / "hub",
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
  )
  use_legacy_attention_names(tmp_path / "hub" / "diffusion_pytorch_model.safetensors")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.convert",
      "import",
      str(tmp_path / "hub"),
      "--config=configs/cifar10.py",
      f"--workdir={tmp_path / 'wd'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Imported 35,746,307 parameters" in result.stdout

  config = cifar10.get_config()
  state, model = restored_state(config, tmp_path / "wd")
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.params, state.ema_params)
  x, t = inputs(2, 32, 3, num_timesteps=1000)
  expected = torch_eps(reference, x, t)
  assert_close(jax_eps(model, state.ema_params, x, t), expected, "cifar10 import")

  out = str(tmp_path / "export")
  result = subprocess.run(
    [sys.executable, "-m", "ddpm_jax.convert", "export", f"--workdir={tmp_path / 'wd'}", out],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Exported the EMA params of step 0" in result.stdout and sorted(os.listdir(out)) == [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "model_index.json",
    "scheduler_config.json",
  ]
  assert_close(torch_eps(assert_same_weights(out, reference), x, t), expected, "cifar10 export")
  pipeline = DDPMPipeline.from_pretrained(out)
  assert pipeline.scheduler.config.variance_type == "fixed_large"
  np.testing.assert_allclose(pipeline.scheduler.betas.numpy(), DDPMScheduler().betas.numpy())


def test_256_type_pipeline_snapshot_round_trip(tmp_path):
  """The 256x256 models' layout (6 levels, attention at 16, fixedsmall), at 64x64 with ch 32, saved
  as a DDPMPipeline snapshot (unet/ and scheduler/ folders)."""
  config = celebahq256.get_config()
  config.data.image_size = 64
  config.model.ch = 32
  reference = random_unet(
    2,
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64, 64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D") + ("DownBlock2D",) * 3,
    up_block_types=("UpBlock2D",) * 3 + ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
  )
  scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=True)
  DDPMPipeline(unet=reference, scheduler=scheduler).save_pretrained(tmp_path / "snapshot")
  assert os.path.exists(tmp_path / "snapshot" / "scheduler" / "scheduler_config.json")

  done = convert.import_checkpoint(
    str(tmp_path / "snapshot"), config=config, workdir=str(tmp_path / "wd")
  )
  assert done.step == 0 and done.checkpoint_dir.endswith(os.path.join("checkpoints", "0"))
  state, model = restored_state(config, tmp_path / "wd")
  x, t = inputs(1, 64, 3, num_timesteps=1000)
  expected = torch_eps(reference, x, t)
  assert_close(jax_eps(model, state.ema_params, x, t), expected, "256-type import")

  out, _ = convert.export_diffusers(str(tmp_path / "wd"), str(tmp_path / "export"))
  assert_close(torch_eps(assert_same_weights(out, reference), x, t), expected, "256-type export")
  assert DDPMPipeline.from_pretrained(out).scheduler.config.variance_type == "fixed_small"


def test_torch_bin_weights_load_with_torch_and_need_it(tmp_path, monkeypatch):
  reference = random_unet(3, **TINY_UNET)
  reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert sorted(os.listdir(tmp_path / "bin")) == ["config.json", "diffusion_pytorch_model.bin"]
  done = convert.import_checkpoint(str(tmp_path / "bin"), config=TINY, workdir=str(tmp_path / "wd"))
  state, model = restored_state(TINY, tmp_path / "wd")
  x, t = inputs(2, 8, 1, num_timesteps=10)
  assert_close(jax_eps(model, state.ema_params, x, t), torch_eps(reference, x, t), ".bin import")
  assert done.num_params == sum(p.numel() for p in reference.parameters())
  monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
  with pytest.raises(
    ConfigError, match=r"diffusion_pytorch_model\.bin is a PyTorch pickle, which needs PyTorch"
  ):
    convert.import_checkpoint(str(tmp_path / "bin"), config=TINY, workdir=str(tmp_path / "wd2"))


# ---------------------------------------------------------------------- the official TF checkpoints


def official_tf_name(key: str, *, num_levels: int) -> str:
  """The official variable name of a UNet2DModel state-dict key: the scopes of the official
  unet.model (model/temb/dense0, model/down_{i}/block_{j}/..., model/mid/attn_1,
  model/up_{i}/upsample/conv,
  ...)."""
  layers = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "conv": "conv",
  }
  key = key.replace("to_out.0", "to_out_0")
  *scope, layer, leaf = key.split(".")
  layer = layer.replace("to_out_0", "to_out.0")
  top = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "temb/dense0",
    "time_embedding.linear_2": "temb/dense1",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
  }
  if not scope:
    name = top[layer]
  elif scope[0] == "time_embedding":
    name = top[f"time_embedding.{layer}"]
  elif scope[0] == "mid_block":
    kind, index = scope[1], int(scope[2])
    name = (
      "mid/" + ("attn_1" if kind == "attentions" else f"block_{index + 1}") + "/" + layers[layer]
    )
  else:
    blocks, index, kind, j = scope
    level = int(index) if blocks == "down_blocks" else num_levels - 1 - int(index)
    prefix = f"{blocks[: -len('_blocks')]}_{level}"
    child = {
      "resnets": f"block_{j}",
      "attentions": f"attn_{j}",
      "downsamplers": "downsample",
      "upsamplers": "upsample",
    }[kind]
    name = f"{prefix}/{child}/{layers[layer]}"
  is_norm = "norm" in layer
  return (
    f"model/{name}/"
    + {"weight": "gamma" if is_norm else "W", "bias": "beta" if is_norm else "b"}[leaf]
  )


def official_tf_layout(value: np.ndarray) -> np.ndarray:
  """torch -> the official layouts: conv [kh, kw, in, out]; dense and 1x1 nin [in, out]."""
  if value.ndim == 4 and value.shape[2:] != (1, 1):
    return value.transpose(2, 3, 1, 0)
  if value.ndim in (2, 4):
    return value.reshape(value.shape[:2]).T
  return value


def official_variables(model: UNet2DModel, *, num_levels: int) -> dict:
  return {
    official_tf_name(k, num_levels=num_levels): official_tf_layout(v.numpy())
    for k, v in model.state_dict().items()
  }


def write_tf_checkpoint(prefix, variables: dict) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(str(prefix)), exist_ok=True)
  names = sorted(variables)
  tf.raw_ops.SaveV2(
    prefix=str(prefix),
    tensor_names=names,
    shape_and_slices=[""] * len(names),
    tensors=[tf.constant(variables[n]) for n in names],
  )
  return str(prefix)


def training_checkpoint(ema: dict, raw: dict, *, step=4321) -> dict:
  """What the official training writes: raw variables, EMA copies, Adam slots and bookkeeping."""
  rng = np.random.default_rng(7)
  out = dict(raw)
  out.update({f"{name}/ExponentialMovingAverage": value for name, value in ema.items()})
  for name, value in raw.items():
    out[f"{name}/Adam"] = rng.standard_normal(value.shape).astype(np.float32)
    out[f"{name}/Adam_1"] = np.abs(rng.standard_normal(value.shape)).astype(np.float32)
  out.update(
    global_step=np.int64(step),
    beta1_power=np.float32(0.9**step),
    beta2_power=np.float32(0.999**step),
  )
  return out


@pytest.fixture(scope="module")
def tf_twins():
  """Two random tiny U-Nets standing for the EMA and the raw weights, and their official
  variables."""
  ema_model, raw_model = random_unet(11, **TINY_UNET), random_unet(12, **TINY_UNET)
  return (
    ema_model,
    raw_model,
    official_variables(ema_model, num_levels=2),
    official_variables(raw_model, num_levels=2),
  )


def test_tf_checkpoint_imports_ema_by_default_then_samples(tmp_path, tf_twins):
  ema_model, raw_model, ema, raw = tf_twins
  assert "model/mid/attn_1/proj_out/W" in ema and "model/up_1/block_0/nin_shortcut/W" in ema
  assert ema["model/down_0/block_0/conv1/W"].shape == (3, 3, 32, 32) and ema[
    "model/temb/dense0/W"
  ].shape == (32, 128)
  prefix = write_tf_checkpoint(
    tmp_path / "release" / "model.ckpt-4321", training_checkpoint(ema, raw)
  )
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.convert",
      "import",
      os.path.dirname(prefix),
      *TINY_FLAGS,
      f"--workdir={tmp_path / 'wd'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 4321" in result.stdout

  state, model = restored_state(TINY, tmp_path / "wd")
  assert int(state.step) == 4321
  x, t = inputs(2, 8, 1, num_timesteps=10)
  ours = jax_eps(model, state.ema_params, x, t)
  assert_close(ours, torch_eps(ema_model, x, t), "TF EMA import")
  assert (
    float(np.abs(ours - torch_eps(raw_model, x, t)).max()) > 0.1
  )  # the raw weights are really different

  result = run_cli(*TINY_FLAGS, f"--workdir={tmp_path / 'wd'}", "--mode=sample")
  assert result.returncode == 0, result.stderr[-3000:]
  samples = np.load(tmp_path / "wd" / "samples" / "ckpt_4321_n6_seed0_ancestral10" / "samples.npz")[
    "arr_0"
  ]
  assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8

  # A second import into the same workdir is refused, in one sentence, and leaves the checkpoint
  # alone.
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "ddpm_jax.convert",
      "import",
      prefix,
      *TINY_FLAGS,
      f"--workdir={tmp_path / 'wd'}",
      "--raw",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "already holds checkpoints" in result.stderr and "--overwrite" in result.stderr
  assert os.listdir(tmp_path / "wd" / "checkpoints") == ["4321"]


def test_tf_raw_weights_on_request_and_overwrite(tmp_path, tf_twins):
  ema_model, raw_model, ema, raw = tf_twins
  prefix = write_tf_checkpoint(tmp_path / "model.ckpt-4321", training_checkpoint(ema, raw))
  workdir = str(tmp_path / "wd")
  convert.import_checkpoint(prefix, config=TINY, workdir=workdir)
  done = convert.import_checkpoint(
    prefix + ".index", config=TINY, workdir=workdir, raw=True, overwrite=True
  )
  assert done.step == 4321
  state, model = restored_state(TINY, workdir)
  x, t = inputs(2, 8, 1, num_timesteps=10)
  assert_close(jax_eps(model, state.ema_params, x, t), torch_eps(raw_model, x, t), "TF raw import")
  assert sorted(os.listdir(workdir)) == [
    "checkpoints",
    "config.json",
  ]  # no staging folders left behind

  # Training can continue from an imported workdir (the data position is the step).
  manager = checkpoint.make_manager(workdir, keep=1, read_only=True)
  abstract = state_lib.abstract_state(
    model, state_lib.build(TINY).tx, shape=(8, 8, 1), mesh=parallel.make_mesh()
  )
  assert int(checkpoint.restore(manager, abstract_state=abstract).step) == 4321

  # A checkpoint without global_step (e.g. an EMA-only export) lands at step 0.
  ema_only = {f"{k}/ExponentialMovingAverage": v for k, v in ema.items()}
  prefix = write_tf_checkpoint(tmp_path / "ema_only" / "model.ckpt", ema_only)
  assert convert.import_checkpoint(prefix, config=TINY, workdir=str(tmp_path / "wd2")).step == 0


# ----------------------------------------------------------------------------- errors


def import_error(tmp_path, src, *, config=TINY, **kwargs) -> str:
  workdir = tmp_path / "never_written"
  with pytest.raises(ConfigError) as info:
    convert.import_checkpoint(str(src), config=config, workdir=str(workdir), **kwargs)
  assert not os.path.exists(workdir / "checkpoints")
  message = str(info.value)
  assert "\n" not in message and message.endswith("."), message
  print(message)
  return message


def test_neither_format_and_missing_paths(tmp_path):
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("hello")
  assert "is neither a diffusers model directory" in import_error(tmp_path, tmp_path / "junk")
  assert "does not exist" in import_error(tmp_path, tmp_path / "nowhere")
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(
    json.dumps(dict(TINY_UNET, _class_name="UNet2DModel"))
  )
  assert "neither diffusion_pytorch_model.safetensors nor" in import_error(
    tmp_path, tmp_path / "noweights"
  )


@pytest.mark.parametrize(
  "edit, match",
  [
    (
      "drop",
      r"lacks 1 of the model's \d+ weights: 'model/mid/block_2/conv2/W/ExponentialMovingAverage'",
    ),
    (
      "extra",
      r"1 weight in the TF checkpoint .* has no place in the model: "
      r"'model/mid/block_3/conv1/W/Expon",
    ),
    (
      "unknown_raw",
      r"1 variable\(s\) under model/ with a raw copy but no EMA copy or the reverse, e\.g\. "
      r"model/mid/mystery/W",
    ),
    (
      "shape",
      r"'model/down_0/block_0/conv2/W/ExponentialMovingAverage' has shape \(3, 3, 32, 16\), "
      r"which does not "
      r"fit the model's down_0_block_0/conv2/kernel of shape \(3, 3, 32, 32\)",
    ),
    ("no_ema", r"holds no /ExponentialMovingAverage copies .* pass --raw"),
  ],
)
def test_tf_variable_errors(tmp_path, tf_twins, edit, match):
  _, _, ema, raw = tf_twins
  ema, raw = dict(ema), dict(raw)
  if edit == "drop":
    del ema["model/mid/block_2/conv2/W"], raw["model/mid/block_2/conv2/W"]
  elif edit == "extra":
    ema["model/mid/block_3/conv1/W"] = raw["model/mid/block_3/conv1/W"] = np.zeros(
      (3, 3, 64, 64), np.float32
    )
  elif edit == "unknown_raw":
    raw["model/mid/mystery/W"] = np.zeros((2, 2), np.float32)
  elif edit == "shape":
    ema["model/down_0/block_0/conv2/W"] = raw["model/down_0/block_0/conv2/W"] = np.zeros(
      (3, 3, 32, 16), np.float32
    )
  variables = training_checkpoint(ema, raw)
  if edit == "no_ema":
    variables = raw
  prefix = write_tf_checkpoint(tmp_path / "model.ckpt-5", variables)
  assert re.search(match, import_error(tmp_path, prefix))


def test_model_that_differs_from_the_config_names_every_key(tmp_path, tf_twins):
  _, _, ema, raw = tf_twins
  prefix = write_tf_checkpoint(tmp_path / "model.ckpt-5", training_checkpoint(ema, raw))
  config = tiny_config(
    model__ch=64,
    model__num_res_blocks=2,
    diffusion__var_type="learned_range",
    diffusion__loss_type="hybrid",
  )
  message = import_error(tmp_path, prefix, config=config)
  for part in (
    "model.ch (checkpoint 32, config 64)",
    "model.num_res_blocks (checkpoint 1, config 2)",
    "diffusion.var_type (checkpoint: fixed variances, out_channels=1; config 'learned_range')",
  ):
    assert part in message, message
  assert "model.ch_mult" not in message and "model.attn_resolutions" not in message


def test_truncated_files(tmp_path, tf_twins):
  _, _, ema, raw = tf_twins
  prefix = write_tf_checkpoint(tmp_path / "tf" / "model.ckpt-5", training_checkpoint(ema, raw))
  data_file = prefix + ".data-00000-of-00001"
  with open(data_file, "r+b") as f:
    f.truncate(os.path.getsize(data_file) // 3)
  assert "(truncated data file?)" in import_error(tmp_path, prefix)
  with open(prefix + ".index", "r+b") as f:
    f.truncate(20)
  assert "Cannot read the TF checkpoint" in import_error(tmp_path, prefix)

  save_diffusers(random_unet(4, **TINY_UNET), tmp_path / "hub")
  weights = tmp_path / "hub" / "diffusion_pytorch_model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  assert "Cannot read" in import_error(tmp_path, tmp_path / "hub")
  (tmp_path / "hub" / "config.json").write_text("{not json")
  assert "Cannot read" in import_error(tmp_path, tmp_path / "hub")


def test_scheduler_and_unet_config_disagreements(tmp_path):
  save_diffusers(
    random_unet(5, **TINY_UNET),
    tmp_path / "hub",
    num_train_timesteps=1000,
    beta_start=0.01,
    beta_end=0.5,
    variance_type="fixed_small",
    clip_sample=False,
  )
  message = import_error(tmp_path, tmp_path / "hub")
  assert "scheduler_config.json differs from the config in" in message
  for part in (
    "diffusion.num_timesteps (scheduler 1000, config 10)",
    "diffusion.var_type (scheduler 'fixedsmall', config 'fixedlarge')",
    "sampling.clip_denoised (scheduler False, config True)",
  ):
    assert part in message, message
  assert "beta_start" not in message

  save_diffusers(
    random_unet(5, **TINY_UNET),
    tmp_path / "v",
    **dict(TINY_SCHEDULER, prediction_type="v_prediction"),
  )
  assert "prediction_type='v_prediction'" in import_error(tmp_path, tmp_path / "v")

  save_diffusers(
    random_unet(5, **dict(TINY_UNET, flip_sin_to_cos=True, attention_head_dim=8)), tmp_path / "flip"
  )
  message = import_error(tmp_path, tmp_path / "flip")
  assert "flip_sin_to_cos=True" in message and "attention_head_dim=8" in message

  save_diffusers(random_unet(5, **TINY_UNET), tmp_path / "ok", **TINY_SCHEDULER)
  assert "--raw picks the raw weights of a TF checkpoint" in import_error(
    tmp_path, tmp_path / "ok", raw=True
  )


def test_export_refuses_an_existing_folder_and_unmappable_settings(tmp_path):
  save_diffusers(random_unet(6, **TINY_UNET), tmp_path / "hub", **TINY_SCHEDULER)
  convert.import_checkpoint(str(tmp_path / "hub"), config=TINY, workdir=str(tmp_path / "wd"))
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="already exists"):
    convert.export_diffusers(str(tmp_path / "wd"), str(tmp_path / "taken"))
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
  out, _ = convert.export_diffusers(str(tmp_path / "wd"), str(tmp_path / "taken"), overwrite=True)
  assert "keep.txt" not in os.listdir(out)
  with pytest.raises(ConfigError, match="no config.json"):
    convert.export_diffusers(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  for key, value in (("mean_type", "xprev"), ("var_type", "learned")):
    config = tiny_config(**{f"diffusion__{key}": value})
    with pytest.raises(ConfigError, match=f"config.diffusion.{key}='{value}' has no diffusers"):
      scheduler_lib.scheduler_config(config)


# ----------------------------------------------------------------------------- scheduler mapping


@pytest.mark.parametrize("schedule", ["linear", "quad", "cosine", "jsd", "warmup10"])
def test_exported_scheduler_has_the_configs_betas(schedule):
  config = cifar10.get_config()
  config.diffusion.beta_schedule = schedule
  exported = scheduler_lib.scheduler_config(config)
  expected = dm.get_beta_schedule(schedule, beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  np.testing.assert_allclose(
    DDPMScheduler.from_config(exported).betas.numpy(), expected, rtol=1e-5, atol=1e-7
  )
  scheduler_lib.check_scheduler(
    json.loads(json.dumps(exported)), config, path="exported"
  )  # and back


def test_the_hubs_first_scheduler_files_read_like_the_current_ones():
  legacy = {
    "_class_name": "GaussianDDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "timesteps": 1000,
    "variance_type": "fixed_large",
  }
  settings = scheduler_lib.settings_from_scheduler(legacy, path="legacy")
  assert (
    settings["diffusion.num_timesteps"] == 1000 and settings["diffusion.var_type"] == "fixedlarge"
  )
  scheduler_lib.check_scheduler(legacy, cifar10.get_config(), path="legacy")


def test_keys_missing_from_a_diffusers_config_mean_diffusers_defaults_not_the_papers(tmp_path):
  """A config.json (old or hand-written) that leaves out flip_sin_to_cos, freq_shift,
  downsample_padding, norm_eps or attention_head_dim describes diffusers' defaults for them, which
  are not the official U-Net's: refused, key by key. The table of defaults is diffusers' own."""
  import inspect  # pylint: disable=g-import-not-at-top

  from ddpm_jax.convert import diffusers_format  # pylint: disable=g-import-not-at-top

  signature = inspect.signature(UNet2DModel.__init__).parameters
  for key, value in diffusers_format.DIFFUSERS_DEFAULTS.items():
    assert signature[key].default == value, key
  save_diffusers(random_unet(5, **TINY_UNET), tmp_path / "hub", **TINY_SCHEDULER)
  config_path = tmp_path / "hub" / "config.json"
  full = json.loads(config_path.read_text())
  for key in (
    "flip_sin_to_cos",
    "freq_shift",
    "downsample_padding",
    "norm_eps",
    "attention_head_dim",
  ):
    config_path.write_text(json.dumps({k: v for k, v in full.items() if k != key}))
    assert key in import_error(tmp_path, tmp_path / "hub"), key
  config_path.write_text(json.dumps(full))
  convert.import_checkpoint(str(tmp_path / "hub"), config=TINY, workdir=str(tmp_path / "wd"))
