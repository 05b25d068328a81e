"""The U-Net against REFERENCE.md §2: parameter counts, init, dropout, dtype, config checks, and its
outputs against diffusers' UNet2DModel (a faithful port of the official network) on random
weights."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from flax import traverse_util

from ddpm_jax import convert
from ddpm_jax.configs import default
from ddpm_jax.models import unet

CIFAR10_PARAMS = 35_746_307
LSUN256_PARAMS = 113_673_219


def tiny_config(**overrides):
  """A small model section (ch 32) for tests where the full-size model is not the point."""
  config = ml_collections.ConfigDict(
    dict(
      ch=32,
      ch_mult=(1, 2),
      num_res_blocks=1,
      attn_resolutions=(8,),
      dropout=0.1,
      resamp_with_conv=True,
      dtype="float32",
    )
  )
  config.update(overrides)
  return config


def abstract_params(model, *, image_size, num_channels):
  """Param shapes of `model` without materialising them."""
  x = jnp.zeros((1, image_size, image_size, num_channels))
  t = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))


def init_params(model, *, image_size, num_channels, seed=0):
  x = jnp.zeros((1, image_size, image_size, num_channels))
  init = jax.jit(model.init, static_argnames="train")
  return init(jax.random.key(seed), x, jnp.zeros((1,), jnp.int32), train=False)


def random_params(model, *, image_size, num_channels, seed):
  """Params with every weight random and O(1)-preserving, so near-zero layers and norms matter
  too."""
  # NumPy, from abstract shapes: compiling Flax's random init costs ~10 s on 2 CPU cores.
  flat = traverse_util.flatten_dict(
    abstract_params(model, image_size=image_size, num_channels=num_channels)
  )
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "kernel":
      out[path] = noise / math.sqrt(np.prod(leaf.shape[:-1]))
    else:
      out[path] = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * noise
  return traverse_util.unflatten_dict(out)


def randomize_torch(model, seed):
  """The torch twin of random_params: norms near 1, biases small, weights ~ N(0, 1/fan_in)."""
  generator = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=generator)
    if p.ndim == 1:
      p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
    else:
      p.copy_(noise / math.sqrt(p[0].numel()))


def diffusers_twin(model_config, *, image_size, num_channels, learned_variance, seed=0):
  """A randomised diffusers UNet2DModel and our model with the same weights."""
  torch.manual_seed(seed)
  kwargs = convert.diffusers_unet_config(
    model_config,
    image_size=image_size,
    num_channels=num_channels,
    learned_variance=learned_variance,
  )
  torch_model = UNet2DModel(**kwargs).eval()
  randomize_torch(torch_model, seed + 1)
  model = unet.create_model(
    model_config,
    image_size=image_size,
    num_channels=num_channels,
    learned_variance=learned_variance,
  )
  return torch_model, model


def max_error_against_diffusers(torch_model, model, params, *, image_size, num_channels, t):
  """Runs both networks in eval mode on the same NHWC input; returns (max abs error, output std)."""
  shape = (len(t), image_size, image_size, num_channels)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  t = np.asarray(t, np.int32)
  ref = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
  ref = ref.numpy().transpose(0, 2, 3, 1)
  out = jax.jit(lambda p, x, t: model.apply(p, x, t, train=False))(params, x, t)
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  return float(np.abs(np.asarray(out) - ref).max()), float(ref.std())


@pytest.fixture(autouse=True, scope="module")
def no_torch_grad():
  with torch.no_grad():
    yield


@pytest.fixture(scope="module")
def cifar10_twin():
  return diffusers_twin(
    default.get_config().model, image_size=32, num_channels=3, learned_variance=False
  )


# ----------------------------------------------------------------------------- sizes


def test_cifar10_parameter_count_is_exact():
  model = unet.create_model(
    default.get_config().model, image_size=32, num_channels=3, learned_variance=False
  )
  assert unet.count_params(abstract_params(model, image_size=32, num_channels=3)) == CIFAR10_PARAMS


def test_256_parameter_count_is_exact():
  config = default.set_256_model(default.get_config())
  model = unet.create_model(config.model, image_size=256, num_channels=3, learned_variance=False)
  assert unet.count_params(abstract_params(model, image_size=256, num_channels=3)) == LSUN256_PARAMS


def test_diffusers_twin_of_cifar10_is_the_hub_model(cifar10_twin):
  torch_model, _ = cifar10_twin
  assert sum(p.numel() for p in torch_model.parameters()) == CIFAR10_PARAMS
  config = torch_model.config
  assert tuple(config.block_out_channels) == (128, 256, 256, 256)
  assert tuple(config.down_block_types) == (
    "DownBlock2D",
    "AttnDownBlock2D",
    "DownBlock2D",
    "DownBlock2D",
  )
  assert tuple(config.up_block_types) == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  assert config.layers_per_block == 2 and config.freq_shift == 1 and not config.flip_sin_to_cos
  assert torch_model.mid_block.attentions[0].heads == 1


def test_learned_variance_doubles_output_channels():
  model = unet.create_model(tiny_config(), image_size=16, num_channels=3, learned_variance=True)
  x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, train=False)[0])
  assert model.out_ch == 6 and out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- against diffusers


def test_cifar10_matches_diffusers(cifar10_twin):
  torch_model, model = cifar10_twin
  params = convert.unet_params_from_diffusers(torch_model.state_dict(), model=model)
  error, scale = max_error_against_diffusers(
    torch_model, model, params, image_size=32, num_channels=3, t=[0, 999, 417]
  )
  print(f"cifar10 max abs error {error:.2e}, output std {scale:.3f}")
  assert 0.1 < scale < 10 and error <= 1e-4


def test_other_shape_matches_diffusers():
  # Attention at the top level (with a downsample) and the bottom level (without); 1 channel in, 2
  # out.
  config = tiny_config(ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16, 4), dropout=0.0)
  torch_model, model = diffusers_twin(
    config, image_size=16, num_channels=1, learned_variance=True, seed=3
  )
  assert torch_model.config.down_block_types == (
    "AttnDownBlock2D",
    "DownBlock2D",
    "AttnDownBlock2D",
  )
  params = convert.unet_params_from_diffusers(torch_model.state_dict(), model=model)
  error, scale = max_error_against_diffusers(
    torch_model, model, params, image_size=16, num_channels=1, t=[999, 0, 3]
  )
  print(f"tiny max abs error {error:.2e}, output std {scale:.3f}")
  assert 0.1 < scale < 10 and error <= 1e-4


def legacy_state_dict(state_dict):
  """Renames to_q/to_k/to_v/to_out.0 to the older query/key/value/proj_attn (numpy values)."""
  renames = {
    ".to_q.": ".query.",
    ".to_k.": ".key.",
    ".to_v.": ".value.",
    ".to_out.0.": ".proj_attn.",
  }
  legacy = {}
  for key, value in state_dict.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    legacy[key] = value.numpy()
  return legacy


def test_legacy_attention_keys_map_identically():
  config = tiny_config(attn_resolutions=(16, 8))
  torch_model, model = diffusers_twin(config, image_size=16, num_channels=3, learned_variance=False)
  state_dict = torch_model.state_dict()
  legacy = legacy_state_dict(state_dict)
  assert "mid_block.attentions.0.proj_attn.weight" in legacy and not any(
    ".to_q." in k for k in legacy
  )
  current = convert.unet_params_from_diffusers(state_dict, model=model)
  old = convert.unet_params_from_diffusers(legacy, model=model)
  jax.tree.map(np.testing.assert_array_equal, current, old)


def test_converter_rejects_missing_misshapen_and_unused_weights():
  torch_model, model = diffusers_twin(
    tiny_config(), image_size=16, num_channels=3, learned_variance=False
  )
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  missing = {k: v for k, v in state_dict.items() if k != "mid_block.resnets.1.conv2.weight"}
  with pytest.raises(
    ValueError, match=r"lacks 1 of the model's \d+ weights: 'mid_block\.resnets\.1\.conv2\.weight'"
  ):
    convert.unet_params_from_diffusers(missing, model=model)
  misshapen = dict(state_dict, **{"conv_out.bias": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match=r"'conv_out\.bias' has shape \(4,\)"):
    convert.unet_params_from_diffusers(misshapen, model=model)
  extra = dict(state_dict, **{"mid_block.resnets.2.conv1.bias": np.zeros(64, np.float32)})
  with pytest.raises(
    ValueError,
    match=r"1 weight in .* has no place in the model: 'mid_block\.resnets\.2\.conv1\.bias'",
  ):
    convert.unet_params_from_diffusers(extra, model=model)


# ----------------------------------------------------------------------------- init, dropout, dtype


def test_init_is_fan_avg_uniform_with_near_zero_layers():
  model = unet.create_model(tiny_config(), image_size=16, num_channels=3, learned_variance=False)
  flat = traverse_util.flatten_dict(init_params(model, image_size=16, num_channels=3)["params"])
  near_zero = [p for p in flat if p[-1] == "kernel" and p[-2] in ("conv2", "proj_out", "conv_out")]
  assert (
    len(near_zero) == 8 + 4 + 1
  )  # conv2 of 8 ResNet blocks, 4 attention outputs, the final conv
  for path, value in flat.items():
    receptive = np.prod(value.shape[:-2])
    fan_avg = receptive * (value.shape[-2] + value.shape[-1]) / 2 if value.ndim >= 2 else None
    if path in near_zero:  # variance scale 1e-10: |w| <= sqrt(3e-10 / fan_avg), about 1e-6
      assert np.abs(value).max() <= math.sqrt(3e-10 / fan_avg) < 1e-5, path
    elif path[-1] == "bias":
      assert not np.any(value), path
    elif path[-1] == "scale":
      np.testing.assert_array_equal(value, 1.0)
    else:  # uniform(-b, b), b = sqrt(3 / fan_avg), fans counting the receptive field
      bound = math.sqrt(3.0 / fan_avg)
      assert 0.9 * bound < np.abs(value).max() <= bound, path
  assert flat[("conv_in", "kernel")].shape == (3, 3, 3, 32)


def test_dropout_only_when_training():
  model = unet.create_model(
    tiny_config(dropout=0.3), image_size=16, num_channels=3, learned_variance=False
  )
  params = random_params(model, image_size=16, num_channels=3, seed=0)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([10, 900])
  apply = jax.jit(model.apply, static_argnames="train")
  train_a = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(2)})
  train_b = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(3)})
  assert float(jnp.abs(train_a - train_b).max()) > 1e-3
  np.testing.assert_array_equal(apply(params, x, t, train=False), apply(params, x, t, train=False))


def test_bfloat16_compute_keeps_float32_params_and_output():
  config = tiny_config(dtype="bfloat16")
  model = unet.create_model(config, image_size=16, num_channels=3, learned_variance=False)
  shapes = abstract_params(model, image_size=16, num_channels=3)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  params = random_params(model, image_size=16, num_channels=3, seed=0)
  model32 = unet.create_model(tiny_config(), image_size=16, num_channels=3, learned_variance=False)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  t = jnp.array([0, 999])
  out16 = jax.jit(model.apply, static_argnames="train")(params, x, t, train=False)
  out32 = jax.jit(model32.apply, static_argnames="train")(params, x, t, train=False)
  assert out16.dtype == jnp.float32
  assert float(jnp.abs(out16 - out32).max()) < 0.1 * float(jnp.abs(out32).max())


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
  "overrides, size, match",
  [
    (dict(), 17, r"image_size=17 .* multiple of 2"),
    (dict(ch_mult=(1, 2, 2, 2)), 4, r"image_size=4 .* multiple of 8"),
    (dict(attn_resolutions=(8, 12)), 16, r"attn_resolutions contains 12.*\(16, 8\)"),
    (dict(ch=48), 16, r"48 channels"),
    (dict(ch=16), 16, r"16 channels"),
    (dict(ch_mult=(1, 1.5)), 16, r"ch_mult=\(1, 1\.5\) must hold positive integers"),
    (dict(dtype="float16"), 16, r"dtype='float16'"),
    (dict(dropout=1.0), 16, r"dropout=1.0"),
    (dict(dropout=-0.1), 16, r"dropout=-0.1"),
    (dict(ch_mult=()), 16, r"ch_mult is empty"),
    (dict(num_res_blocks=0), 16, r"num_res_blocks=0"),
  ],
)
def test_create_model_rejects_bad_configs(overrides, size, match):
  with pytest.raises(ValueError, match=match):
    unet.create_model(
      tiny_config(**overrides), image_size=size, num_channels=3, learned_variance=False
    )


def test_resamp_without_conv_runs_but_has_no_diffusers_equivalent():
  config = tiny_config(resamp_with_conv=False)
  model = unet.create_model(config, image_size=16, num_channels=3, learned_variance=False)
  params = abstract_params(model, image_size=16, num_channels=3)["params"]
  assert "down_0_downsample" not in params and "up_1_upsample" not in params
  x = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
  params = random_params(model, image_size=16, num_channels=3, seed=0)
  out = jax.jit(model.apply, static_argnames="train")(params, x, jnp.array([1, 2]), train=False)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="resamp_with_conv=False"):
    convert.diffusers_unet_config(config, image_size=16, num_channels=3, learned_variance=False)
