"""The U-Net of Ho et al. 2020 (Section 4, Appendix B; the official release's), Flax linen, NHWC.

Parameters are float32; `dtype` sets the compute precision (float32 or bfloat16). Submodule names
are part of the interface: the checkpoint importers in `ddpm_jax.convert` address weights by them.
"""

import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import ConfigError

NUM_GROUPS = 32  # GroupNorm groups, everywhere
NORM_EPS = 1e-6
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_init(scale=1.0):
  """The official initializer: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (near
  zero)."""
  # Flax's fans for HWIO conv kernels are in*kh*kw and out*kh*kw, as in the official TF code.
  return nn.initializers.variance_scaling(scale or 1e-10, "fan_avg", "uniform")


def level_resolutions(image_size, num_levels):
  """Spatial resolution of each U-Net level: image_size, image_size/2, ..."""
  return tuple(image_size // 2**level for level in range(num_levels))


def attention_levels(*, image_size, num_levels, attn_resolutions):
  """The levels whose resolution is one of attn_resolutions (attention after each of their
  blocks)."""
  resolutions = level_resolutions(image_size, num_levels)
  return tuple(level for level, res in enumerate(resolutions) if res in attn_resolutions)


def timestep_embedding(t, dim):
  """Sinusoidal embedding of timesteps t [B] -> float32 [B, dim]: sin half, then cos half."""
  assert t.ndim == 1 and dim % 2 == 0, (t.shape, dim)
  half = dim // 2
  # Frequencies in float64, rounded once: exp(-i ln(10000) / (half - 1)).
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


def _conv(features, *, name, dtype, kernel=3, strides=1, padding=1, init_scale=1.0):
  """A square conv with the official init (zero bias); `padding` is symmetric or explicit pairs."""
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=strides,
    padding=pad,
    name=name,
    dtype=dtype,
    kernel_init=default_init(init_scale),
  )


@jax.custom_vjp
def dense(x, kernel, bias):
  """x @ kernel + bias over the last axis of x."""
  return x @ kernel + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, g):
  """The gradients as plain 2-D products over the flattened leading axes: XLA:CPU runs these faster
  than the batched dot_generals autodiff derives for a [B, H, W, C] input (measured in
  bench/README.md "What was tried")."""
  x, kernel = residuals
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return g @ kernel.T, jnp.einsum("mi,mo->io", rows_x, rows_g), rows_g.sum(axis=0)


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """`nn.Dense` over the last axis, the same function and parameters ('kernel' [in, out], 'bias'),
  computed by `dense` (its gradient written out). Parameters float32, computation in `dtype`; in
  bfloat16 the bias gradient's sum accumulates in float32 (autodiff of nn.Dense sums in
  bfloat16)."""

  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def _dense(features, *, name, dtype, init_scale=1.0):
  """A dense layer over the last axis (the official `dense`/`nin`) with the official init."""
  return Dense(features, name=name, dtype=dtype, kernel_init=default_init(init_scale))


def _group_mean(channel_sums, count: int):
  """[B, C] sums over H, W -> each channel's group mean (the group's sum / count), [B, 1, 1, C]."""
  b, c = channel_sums.shape
  means = channel_sums.reshape(b, NUM_GROUPS, c // NUM_GROUPS).sum(axis=-1) / count
  return jnp.repeat(means, c // NUM_GROUPS, axis=-1)[:, None, None, :]


def _group_stats(x):
  """Group mean and 1 / std of float32 NHWC x, each [B, 1, 1, C]; two-pass variance."""
  _, height, width, c = x.shape
  count = height * width * (c // NUM_GROUPS)
  mean = _group_mean(x.sum(axis=(1, 2)), count)
  var = _group_mean(jnp.square(x - mean).sum(axis=(1, 2)), count)
  return mean, jax.lax.rsqrt(var + NORM_EPS)


@jax.custom_vjp
def group_norm(x, scale, bias):
  """(x - group mean) / group std * scale + bias over float32 NHWC x, NUM_GROUPS groups."""
  mean, rstd = _group_stats(x)
  return (x - mean) * (rstd * scale) + bias


def _group_norm_fwd(x, scale, bias):
  mean, rstd = _group_stats(x)
  return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _group_norm_bwd(residuals, g):
  """The closed-form gradient: two per-channel sums of g and g * x_hat in one pass, then one pass
  for dx (autodiff of the forward takes an extra pass over the activations)."""
  x, mean, rstd, scale = residuals
  _, height, width, c = x.shape
  count = height * width * (c // NUM_GROUPS)
  x_hat = (x - mean) * rstd
  sum_g, sum_g_xhat = g.sum(axis=(1, 2)), (g * x_hat).sum(axis=(1, 2))  # [B, C]
  dx = rstd * (
    g * scale - _group_mean(sum_g * scale, count) - x_hat * _group_mean(sum_g_xhat * scale, count)
  )
  return dx, sum_g_xhat.sum(axis=0), sum_g.sum(axis=0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC, NUM_GROUPS groups, eps NORM_EPS: float32 statistics, two-pass variance.

  The same function and parameters ('scale', 'bias') as `nn.GroupNorm`, formulated for XLA: the
  statistics are reductions over H, W to [B, C] (then summed per group), not over a regrouped
  [B, H*W, G, C/G] view, and the gradient is the closed form (`group_norm`); what each bought is in
  bench/README.md "What was tried".
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x.astype(jnp.float32), scale, bias).astype(self.dtype)


def _group_norm(*, name, dtype):
  """GroupNorm, 32 groups, eps 1e-6; statistics in float32 with the two-pass variance."""
  return GroupNorm(name=name, dtype=dtype)


class Dropout(nn.Module):
  """Dropout (inverted: kept values scaled by 1 / (1 - rate)) with one of two sources of randomness.

  With `keys` [B], example i's mask is drawn from keys[i] (folded with a number fixed per layer)
  alone: it does not depend on which other examples share the batch or the device, without vmapping
  the network over examples (which XLA runs far slower). Without, the mask comes from the 'dropout'
  rng.
  """

  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool, keys=None):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    if keys is None:
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
    else:
      assert keys.shape == x.shape[:1], (keys.shape, x.shape)
      layer = zlib.crc32("/".join(self.scope.path).encode()) & 0x7FFFFFFF
      mask = jax.vmap(
        lambda k: jax.random.bernoulli(jax.random.fold_in(k, layer), keep, x.shape[1:])
      )(keys)
    return jax.lax.select(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class ResnetBlock(nn.Module):
  """GN-swish-conv, + Dense(swish(temb)), GN-swish-dropout-conv(near zero), + (nin) shortcut."""

  out_ch: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x, temb, train: bool, dropout_keys=None
  ):  # positional: nn.remat marks train static
    h = nn.swish(_group_norm(name="norm1", dtype=self.dtype)(x))
    h = _conv(self.out_ch, name="conv1", dtype=self.dtype)(h)
    h = (
      h + _dense(self.out_ch, name="temb_proj", dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    )
    h = nn.swish(_group_norm(name="norm2", dtype=self.dtype)(h))
    h = Dropout(self.dropout, name="dropout")(h, deterministic=not train, keys=dropout_keys)
    h = _conv(self.out_ch, name="conv2", dtype=self.dtype, init_scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, name="nin_shortcut", dtype=self.dtype)(x)
    return x + h


def attention_implementation(
  *, platform: str, compute_capability: str | None, dtype, head_dim: int
) -> str:
  """Which `jax.nn.dot_product_attention` backend to use: 'cudnn' (fused flash attention) where
  cuDNN takes the call (an NVIDIA GPU of compute capability >= 8.0, 16-bit inputs, a head dim that
  is a multiple of 8 and at most 128, or 256 from Hopper on), else 'xla' (the explicit softmax
  formulation)."""
  if platform != "gpu" or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla"
  try:
    capability = tuple(int(part) for part in str(compute_capability).split(".")[:2])
  except ValueError:  # not a CUDA device (ROCm reports e.g. 'gfx90a')
    return "xla"
  max_head_dim = 256 if capability >= (9, 0) else 128
  return (
    "cudnn" if capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= max_head_dim else "xla"
  )


def _device_attention_implementation(dtype, head_dim: int) -> str:
  """attention_implementation() for the default device (the one jit places this computation on)."""
  device = jax.devices()[0]
  return attention_implementation(
    platform=device.platform,
    dtype=dtype,
    head_dim=head_dim,
    compute_capability=getattr(device, "compute_capability", None),
  )


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, near-zero output projection, residual.

  softmax(q k^T / sqrt(C)) v via `jax.nn.dot_product_attention`: logits and softmax in float32 and
  cuDNN's fused kernel on GPUs that take it (see attention_implementation).
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = _group_norm(name="norm", dtype=self.dtype)(x)
    # [B, H*W, 1 head, C]: the layout dot_product_attention takes (batch, length, heads, head dim).
    q, k, v = (
      _dense(c, name=n, dtype=self.dtype)(h).reshape(b, height * width, 1, c) for n in "qkv"
    )
    h = jax.nn.dot_product_attention(
      q, k, v, implementation=_device_attention_implementation(q.dtype, c)
    )
    return x + _dense(c, name="proj_out", dtype=self.dtype, init_scale=0.0)(
      h.reshape(b, height, width, c)
    )


class Downsample(nn.Module):
  """Halves H and W: conv3x3 stride 2 with TF 'SAME' padding, or 2x2 average pooling."""

  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    if self.with_conv:
      # TF 'SAME' with stride 2 on an even size pads 0 before and 1 after (bottom/right).
      x = _conv(c, name="conv", dtype=self.dtype, strides=2, padding=((0, 1), (0, 1)))(x)
    else:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    assert x.shape == (b, height // 2, width // 2, c), x.shape
    return x


class Upsample(nn.Module):
  """Doubles H and W: nearest neighbour, then conv3x3 if with_conv."""

  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = _conv(x.shape[-1], name="conv", dtype=self.dtype)(x)
    return x


class UNet(nn.Module):
  """The DDPM U-Net: x [B,H,W,C] in [-1,1] and integer t [B] -> float32 [B,H,W,out_ch].

  With num_classes > 0 it is class-conditional: a learned embedding of the label y [B] in
  [0, num_classes] (num_classes itself is the null label, "no class": Ho & Salimans 2022) is added
  to the timestep embedding after its MLP, as diffusers' UNet2DModel does with num_class_embeds.
  """

  ch: int
  out_ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  # recompute each block's activations in the backward pass (memory for compute)
  remat: bool = False
  num_classes: int = 0  # 0: unconditional (the paper's model, no class embedding)

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool, dropout_keys=None):
    """y [B]: class labels of a conditional model (None: the null label); dropout_keys [B]: one key
    per example for its dropout masks (else the 'dropout' rng is used)."""
    b, height, width, _ = x.shape
    assert t.shape == (b,), (t.shape, x.shape)
    assert height == width and height % 2 ** (len(self.ch_mult) - 1) == 0, x.shape
    assert y is None or self.num_classes, "labels given to an unconditional U-Net"
    temb = self._time_embedding(t)
    if self.num_classes:
      temb = temb + self._class_embedding(y, b)
    h = _conv(self.ch, name="conv_in", dtype=self.dtype)(x.astype(self.dtype))
    mode = (train, dropout_keys)  # what every ResNet block gets after (h, temb)
    h, skips = self._down(h, temb, mode=mode)
    h = self._middle(h, temb, mode=mode)
    h = self._up(h, skips, temb, mode=mode)
    h = nn.swish(_group_norm(name="norm_out", dtype=self.dtype)(h))
    h = _conv(self.out_ch, name="conv_out", dtype=self.dtype, init_scale=0.0)(h)
    assert h.shape == (b, height, width, self.out_ch), h.shape
    return h.astype(jnp.float32)

  def _time_embedding(self, t):
    """Sinusoidal embedding of t, then Dense(4ch) - swish - Dense(4ch)."""
    temb = timestep_embedding(t, self.ch).astype(self.dtype)
    temb = _dense(4 * self.ch, name="temb_dense0", dtype=self.dtype)(temb)
    return _dense(4 * self.ch, name="temb_dense1", dtype=self.dtype)(nn.swish(temb))

  def _class_embedding(self, y, batch: int):
    """Embedding [B, 4ch] of labels y [B] (None: the null label num_classes); N(0, 1) init, as
    torch.nn.Embedding (diffusers' class_embedding)."""
    if y is None:
      y = jnp.full((batch,), self.num_classes, jnp.int32)
    assert y.shape == (batch,), (y.shape, batch)
    embed = nn.Embed(
      self.num_classes + 1,
      4 * self.ch,
      dtype=self.dtype,
      embedding_init=nn.initializers.normal(stddev=1.0),
      name="class_embed",
    )
    return embed(y)

  def _down(self, h, temb, *, mode):
    """The downsampling path; returns h and every intermediate output, kept as skips."""
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = self._level_block(
          h, temb, prefix=f"down_{level}", index=i, out_ch=self.ch * mult, mode=mode
        )
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.resamp_with_conv, dtype=self.dtype, name=f"down_{level}_downsample")(h)
        skips.append(h)
    return h, skips

  def _middle(self, h, temb, *, mode):
    """ResNet block, attention, ResNet block at the lowest resolution."""
    c = h.shape[-1]
    resnet, attn = self._block_classes()
    h = resnet(c, self.dropout, dtype=self.dtype, name="mid_block_1")(h, temb, *mode)
    h = attn(dtype=self.dtype, name="mid_attn")(h)
    return resnet(c, self.dropout, dtype=self.dtype, name="mid_block_2")(h, temb, *mode)

  def _up(self, h, skips, temb, *, mode):
    """The upsampling path: num_res_blocks + 1 blocks per level, each on concat([h,
    skips.pop()])."""
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._level_block(
          h, temb, prefix=f"up_{level}", index=i, out_ch=self.ch * self.ch_mult[level], mode=mode
        )
      if level != 0:
        h = Upsample(self.resamp_with_conv, dtype=self.dtype, name=f"up_{level}_upsample")(h)
    assert not skips, len(skips)
    return h

  def _level_block(self, h, temb, *, prefix, index, out_ch, mode):
    """`{prefix}_block_{index}`, then `{prefix}_attn_{index}` at attention resolutions."""
    resnet, attn = self._block_classes()
    h = resnet(out_ch, self.dropout, dtype=self.dtype, name=f"{prefix}_block_{index}")(
      h, temb, *mode
    )
    if h.shape[1] in self.attn_resolutions:
      h = attn(dtype=self.dtype, name=f"{prefix}_attn_{index}")(h)
    return h

  def _block_classes(self):
    """ResnetBlock and AttnBlock, wrapped in nn.remat when self.remat (same names, same params)."""
    if not self.remat:
      return ResnetBlock, AttnBlock
    return nn.remat(ResnetBlock, static_argnums=(3,)), nn.remat(AttnBlock)


def _check_model_config(
  *, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, dtype, image_size, num_channels
):
  """Raises ConfigError, naming the offending value, for a config this U-Net cannot be built
  from."""
  if not ch_mult:
    raise ConfigError("model.ch_mult is empty; the U-Net needs at least one level.")
  if not all(isinstance(m, int) and m >= 1 for m in ch_mult):
    raise ConfigError(f"model.ch_mult={ch_mult} must hold positive integers.")
  if num_res_blocks < 1:
    raise ConfigError(f"model.num_res_blocks={num_res_blocks} must be at least 1.")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"model.dropout={dropout} must be in [0, 1).")
  if dtype not in DTYPES:
    raise ConfigError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}.")
  if num_channels < 1:
    raise ConfigError(f"data.num_channels={num_channels} must be at least 1.")
  for channels in (ch, *(ch * m for m in ch_mult)):
    if channels < 1 or channels % NUM_GROUPS:
      raise ConfigError(
        f"model.ch={ch} with model.ch_mult={ch_mult} gives {channels} channels, which is not "
        f"a positive multiple of the {NUM_GROUPS} GroupNorm groups."
      )
  factor = 2 ** (len(ch_mult) - 1)
  if image_size < factor or image_size % factor:
    raise ConfigError(
      f"data.image_size={image_size} must be a positive multiple of {factor} = "
      f"2**(len(model.ch_mult) - 1) for a {len(ch_mult)}-level U-Net."
    )
  resolutions = level_resolutions(image_size, len(ch_mult))
  for res in attn_resolutions:
    if res not in resolutions:
      raise ConfigError(
        f"model.attn_resolutions contains {res}, which never occurs in this U-Net; "
        f"its resolutions are {resolutions}."
      )


def create_model(
  model_config, *, image_size: int, num_channels: int, learned_variance: bool
) -> UNet:
  """Builds the UNet of a `config.model` section, validating it first (plain Python, before any
  jit)."""
  fields = dict(
    ch=int(model_config.ch),
    ch_mult=tuple(model_config.ch_mult),
    num_res_blocks=int(model_config.num_res_blocks),
    attn_resolutions=tuple(int(r) for r in model_config.attn_resolutions),
    dropout=float(model_config.dropout),
  )
  _check_model_config(
    **fields, dtype=model_config.dtype, image_size=int(image_size), num_channels=int(num_channels)
  )
  return UNet(
    **fields,
    out_ch=num_channels * (2 if learned_variance else 1),
    resamp_with_conv=bool(model_config.resamp_with_conv),
    dtype=DTYPES[model_config.dtype],
    remat=bool(model_config.get("remat", False)),
    num_classes=num_classes(model_config),
  )


def num_classes(model_config) -> int:
  """config.model.num_classes (0, unconditional, in configs saved before the key existed)."""
  return int(model_config.get("num_classes", 0))


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or jax.ShapeDtypeStructs)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
