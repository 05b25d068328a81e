"""--mode=inpaint: RePaint inpainting (`repaint`) of image files or dataset images with the EMA
weights of any checkpoint of this project (trained or imported), written with the input, the mask
and the arrays to a new folder named after the checkpoint, the counts, the seed, the sampler and
the jumps.

A conditional model inpaints sample s of every image with the label table[s % len(table)] of
config.sampling.labels (so "all" gives one inpainting per class with num_samples = num_classes),
guided with config.sampling.guidance_scale.
"""

import typing

import jax
import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import images
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import repaint
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import streams
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError

MASK_THRESHOLD = 128  # grey levels >= this keep the pixel

# ----------------------------------------------------------------------------- inputs and the mask


class Inputs(typing.NamedTuple):
  """The images to inpaint, at the model's size."""

  images: np.ndarray  # uint8 [N, H, W, C]
  names: list  # where each came from: a path, or "<split>[i]"
  sizes: list  # (width, height) of each before cropping and resizing


def _read_image(path: str, mode: str, *, what: str) -> Image.Image:
  """An image file as a PIL image in `mode` (L or RGB); one sentence when it is not an image."""
  try:
    with storage.open_read(path) as f, Image.open(f) as image:
      return image.convert(mode)
  except Image.UnidentifiedImageError:
    raise ConfigError(f"{what}: {path} is not an image PIL can read (PNG, JPEG, ...).") from None
  except (OSError, ValueError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"{what}: cannot read {path} as an image ({reason}).") from None


def _hwc(image: Image.Image) -> np.ndarray:
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def load_inputs(config) -> Inputs:
  """config.inpaint.image (a file, or every PNG/JPEG under a folder), center-cropped and resized to
  the model's size as training images are; or the first num_images images of inpaint.split."""
  c, size = config.inpaint, config.data.image_size
  if not c.image:
    source = data.load_images(config.data, split=c.split)
    if c.num_images > len(source):
      raise ConfigError(
        f"config.inpaint.num_images = {c.num_images}, but split {c.split!r} of "
        f"{config.data.dataset!r} has {len(source)} images."
      )
    names = [f"{c.split}[{i}]" for i in range(c.num_images)]
    return Inputs(
      np.stack([source[i] for i in range(c.num_images)]), names, [(size, size)] * len(names)
    )
  if storage.is_dir(c.image):
    paths = data.image_paths_under(c.image)
    if not paths:
      raise ConfigError(f"config.inpaint.image = {c.image!r} is a folder without PNG/JPEG images.")
  else:
    paths = [storage.resolve(c.image)]
  mode = "L" if config.data.num_channels == 1 else "RGB"
  pictures = [_read_image(p, mode, what="config.inpaint.image") for p in paths]
  arrays = [_hwc(data.center_crop_resize(p, size)) for p in pictures]
  return Inputs(np.stack(arrays), paths, [p.size for p in pictures])


def _sizes_text(sizes) -> str:
  distinct = sorted(set(sizes))
  return "x".join(map(str, distinct[0])) if len(distinct) == 1 else "of several sizes"


def load_mask(config, image_sizes) -> np.ndarray:
  """config.inpaint.mask as a keep-mask bool [S, S] at the model's size S (True = keep).

  A PNG of S x S pixels is taken as it is; one of the images' own size is cropped and resized as
  they are; grey levels >= 128 keep. A named region is built at size S.
  """
  c, size = config.inpaint, config.data.image_size
  if c.mask in repaint.MASK_REGIONS:
    return repaint.region_mask(c.mask, size)
  grey = _read_image(c.mask, "L", what="config.inpaint.mask")
  if grey.size != (size, size):
    if any(s != grey.size for s in image_sizes):
      raise ConfigError(
        f"config.inpaint.mask = {c.mask!r} is {grey.size[0]}x{grey.size[1]} pixels, but the "
        f"model's images are {size}x{size} and the input images are {_sizes_text(image_sizes)}; "
        "give a mask of the model's size or of the images' size."
      )
    grey = data.center_crop_resize(grey, size)
  keep = np.asarray(grey) >= MASK_THRESHOLD
  if keep.all():
    raise ConfigError(
      f"config.inpaint.mask = {c.mask!r} is white everywhere, so nothing is filled in "
      "(white = keep, black = fill in)."
    )
  if not keep.any():
    raise ConfigError(
      f"config.inpaint.mask = {c.mask!r} is black everywhere, so nothing of the image is kept "
      "(white = keep, black = fill in); for unconditional samples use --mode=sample."
    )
  return keep


# ------------------------------------------------------------------------ the --mode=inpaint driver


def sample_labels(config) -> np.ndarray | None:
  """A conditional model's label of each sample index s of an image (config.sampling.labels over
  inpaint.num_samples); None for an unconditional model."""
  table = sampling.config_label_table(config, num_samples=config.inpaint.num_samples)
  if table is None:
    return None
  return labels_lib.of_ids(table, np.arange(config.inpaint.num_samples))


def inpaint_images(
  fn,
  params,
  *,
  key,
  images_uint8,
  keep,
  num_samples: int,
  batch_size: int,
  mesh,
  labels=None,
  progress=None,
) -> np.ndarray:
  """uint8 inpaintings [N, num_samples, H, W, C] of every image (row r = image r // num_samples,
  its sample r % num_samples), in batches of `batch_size` rows; `labels` [num_samples] (a
  conditional model's): the label of each sample index."""
  n = len(images_uint8)
  rows = n * num_samples
  ids = np.arange(rows, dtype=np.int32)
  x0 = images.to_model_input(images_uint8)[ids // num_samples]
  keep_rows = np.broadcast_to(
    keep.astype(np.float32)[None, :, :, None], (rows,) + keep.shape + (1,)
  )
  arrays = [ids, x0, keep_rows]
  if labels is not None:
    arrays.append(np.asarray(labels, np.int32)[ids % num_samples])
  batch_size = min(batch_size, parallel.round_up_to_devices(rows))
  padded = -(-rows // batch_size) * batch_size
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - rows, axis=0)])
  arrays = [pad(a) for a in arrays]
  out = []
  for start in range(0, padded, batch_size):
    if progress is not None:
      progress.begin(min(start, rows), min(batch_size, max(rows - start, 0)))
    chunk = [
      parallel.global_batch(parallel.process_rows(a[start : start + batch_size]), mesh)
      for a in arrays
    ]
    out.append(parallel.to_host(fn(params, key, *chunk)))
    if progress is not None:
      progress.end(min(start + batch_size, rows))
  return np.concatenate(out)[:rows].reshape((n, num_samples) + images_uint8.shape[1:])


def folder_name(config, step: int, num_images: int) -> str:
  """ckpt_<step>_n<images>x<samples>_seed<seed>_<sampler>_j<jump>_r<resamplings>."""
  c = config.inpaint
  tag = sampling.tag(sampling.record(config))
  return (
    f"ckpt_{step}_n{num_images}x{c.num_samples}_seed{config.seed}_{tag}"
    f"_j{c.jump_length}_r{c.num_resamplings}"
  )


def masked_picture(images_uint8: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """The inputs with the region to fill in painted mid-grey."""
  return np.where(keep[None, :, :, None], images_uint8, np.uint8(128))


def run(config, workdir: str) -> str | None:
  """--mode=inpaint: writes result.png (one row per image: input, masked input, inpaintings),
  input.png, mask.png, inpaint.npz and inpaint.json to a new folder named after the checkpoint,
  the counts, the seed, the sampler and the jumps."""
  validation.check(config, mode="inpaint")
  c = config.inpaint
  built = state_lib.build(config)
  inputs = load_inputs(config)
  keep = load_mask(config, inputs.sizes)
  mesh = parallel.make_mesh()
  params, step = checkpoint.restore_ema_params(
    config, workdir, built=built, mesh=mesh, step=config.sampling.checkpoint_step
  )
  record = sampling.record(config)
  moves = repaint.schedule_moves(
    repaint.jump_schedule(record["num_steps"], c.jump_length, c.num_resamplings)
  )
  rows = len(inputs.images) * c.num_samples
  logging.info(
    "Inpainting %d images x %d samples with the EMA parameters of step %d (%s; RePaint jumps of %d "
    "steps, %d passes: %d network calls per image).",
    len(inputs.images),
    c.num_samples,
    step,
    sampling.tag(record),
    c.jump_length,
    c.num_resamplings,
    repaint.num_model_calls(moves),
  )
  labels = sample_labels(config)
  progress = sampling.Progress(rows, desc="inpainting")
  fn = repaint.from_config(config, built, mesh, on_step=progress.on_step)
  results = inpaint_images(
    fn,
    params,
    key=streams.key(config.seed, streams.INPAINT),
    images_uint8=inputs.images,
    keep=keep,
    num_samples=c.num_samples,
    batch_size=config.sampling.batch_size,
    mesh=mesh,
    labels=labels,
    progress=progress,
  )
  if jax.process_index() != 0:
    return None
  out = storage.fresh_path(
    storage.join(workdir, "inpaint", folder_name(config, step, len(inputs.images)))
  )
  mask_uint8 = np.where(keep, np.uint8(255), np.uint8(0))[..., None]
  extra = {} if labels is None else dict(labels=labels)
  storage.save_npz(
    storage.join(out, "inpaint.npz"),
    inputs=inputs.images,
    mask=mask_uint8,
    samples=results,
    **extra,
  )
  masked = masked_picture(inputs.images, keep)
  strip = np.concatenate([inputs.images[:, None], masked[:, None], results], axis=1)
  images.save_png(
    storage.join(out, "result.png"),
    images.make_grid(strip.reshape((-1,) + strip.shape[2:]), ncols=strip.shape[1]),
  )
  images.save_png(storage.join(out, "input.png"), images.make_grid(inputs.images))
  images.save_png(storage.join(out, "mask.png"), mask_uint8)
  storage.write_json(
    storage.join(out, "inpaint.json"),
    dict(
      record,
      step=step,
      seed=int(config.seed),
      images=list(inputs.names),
      mask=c.mask,
      num_samples=c.num_samples,
      jump_length=c.jump_length,
      num_resamplings=c.num_resamplings,
      network_calls_per_image=repaint.num_model_calls(moves),
    ),
  )
  logging.info(
    "Wrote %s (result.png: input, masked input, %d inpaintings per row; inpaint.npz).",
    out,
    c.num_samples,
  )
  return out
