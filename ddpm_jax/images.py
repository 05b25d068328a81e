"""Pixels: conversions at the model boundary ([0, 255] <-> [-1, 1]), sample grids, chain strips, PNG
files."""

import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import storage


def to_model_input(images_uint8):
  """uint8 [0, 255] -> float32 [-1, 1] (`x / 127.5 - 1`), for NumPy or JAX arrays alike."""
  return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x):
  """Model output in [-1, 1] -> uint8 [0, 255]: clip, `round((x + 1) * 127.5)`; NumPy or JAX."""
  return ((x.clip(-1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)


def make_grid(
  images: np.ndarray, *, ncols: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] row-major into one [rows*(H+p)+p, cols*(W+p)+p, C] image."""
  assert images.ndim == 4 and images.dtype == np.uint8, (images.shape, images.dtype)
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full(
    (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8
  )
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def chain_grid(chain: np.ndarray, *, padding: int = 2) -> np.ndarray:
  """A denoising chain [steps, N, H, W, C] as a picture: one row per sample, one column per step."""
  steps, n = chain.shape[:2]
  return make_grid(
    np.swapaxes(chain, 0, 1).reshape((steps * n,) + chain.shape[2:]), ncols=steps, padding=padding
  )


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement, so 16x16 or 32x32 samples are visible in an image viewer."""
  return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def save_png(path: str, image: np.ndarray, *, min_size: int = 512) -> str:
  """Writes a uint8 [H, W, C] image (C = 1 or 3), enlarged to at least `min_size` pixels wide.

  `path` may be a gs:// URL (the file goes through `storage`, written atomically).
  """
  image = upscale(image, max(1, math.ceil(min_size / image.shape[1])))
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
  return path
