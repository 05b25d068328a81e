"""uint8 images -> the Inception network's 299x299 input, by the TF graph's rule or pytorch-fid's.

The two conventions give pool3 features that differ by many percent on 32x32 inputs, so every result
records which one it used (`RESIZE_MODES`):
- "tf": TF1 `resize_bilinear` (align_corners=False, no half-pixel centres) of the 0..255 values,
  then (x - 128) / 128 — the 2015-12-05 graph's own preprocessing, as torch-fidelity reproduces it.
- "pytorch": x / 255, `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, no
  antialiasing), then 2x - 1 — pytorch-fid's InceptionV3 with resize_input and normalize_input.
"""

import jax.numpy as jnp
import numpy as np

from ddpm_jax import errors

INPUT_SIZE = 299
RESIZE_MODES = ("tf", "pytorch")


def _tf1_taps(in_size: int, out_size: int):
  """Source rows of TF1 bilinear resizing: output i reads i * in/out (scale rounded to float32)."""
  scale = np.float32(in_size / out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = src.astype(np.int32)  # src >= 0, so truncation is floor
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, src - lo.astype(np.float32)


def _torch_taps(in_size: int, out_size: int):
  """Source rows of PyTorch bilinear resizing (align_corners=False): half-pixel centres, clamped at
  0."""
  scale = np.float32(in_size / out_size)
  src = np.maximum(
    (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0
  )
  lo = np.minimum(src.astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def _lerp_axis(x, taps, axis: int):
  """a + (b - a) * t along one axis, with a, b the two source rows of each output row."""
  lo, hi, t = taps
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = -1
  return a + (b - a) * jnp.asarray(t).reshape(shape)


def _lerp_axis_torch(x, taps, axis: int):
  """(1 - t) a + t b along one axis: PyTorch's CPU kernel's weighting."""
  lo, hi, t = taps
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = -1
  t = jnp.asarray(t).reshape(shape)
  return (1 - t) * a + t * b


def resize_tf1_bilinear(x, size: int = INPUT_SIZE):
  """TF1 `resize_bilinear(align_corners=False)` of float [N, H, W, C] to [N, size, size, C].

  Interpolates along the width first, then the height, as torch-fidelity's TF1 port does, so the
  float32 results agree with it to rounding.
  """
  _, h, w, _ = x.shape
  x = _lerp_axis(x, _tf1_taps(w, size), axis=2)
  return _lerp_axis(x, _tf1_taps(h, size), axis=1)


def resize_torch_bilinear(x, size: int = INPUT_SIZE):
  """`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` of float [N, H, W,
  C]."""
  _, h, w, _ = x.shape
  x = _lerp_axis_torch(x, _torch_taps(w, size), axis=2)
  return _lerp_axis_torch(x, _torch_taps(h, size), axis=1)


def check_resize(resize: str) -> str:
  if resize not in RESIZE_MODES:
    raise errors.ConfigError(f"resize = {resize!r} is not one of {', '.join(RESIZE_MODES)}.")
  return resize


def inception_input(images, *, resize: str = "tf"):
  """uint8 [N, H, W, 1 or 3] -> float32 [N, 299, 299, 3] in the network's input range.

  Grayscale images are repeated to three channels (what converting them to RGB does).
  """
  check_resize(resize)
  assert images.ndim == 4 and images.shape[-1] in (1, 3), images.shape
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize == "tf":
    return (resize_tf1_bilinear(x) - 128) / 128
  return resize_torch_bilinear(x / 255) * 2 - 1
