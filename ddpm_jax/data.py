"""Input pipelines: uint8 NHWC images from TFDS, the built-in digits, or a folder, batched by Grain.

Every source is random access (`len`, `source[i]` -> uint8 [H, W, C]; for a class-conditional
model `{"image": that, "label": int32}`, the labels of the digits, of TFDS's `label` feature, or of
a folder's class sub-folders). Training order, flips and
per-process sharding are pure functions of the seed and the example's position in one global stream,
so a run on 1 host and a run on 64 hosts see the same global batches, and the iterator position
(`get_state`) is all a checkpoint needs to resume exactly.
"""

import functools
import os
import posixpath
import socket
import sys

import grain
import numpy as np
from absl import flags
from absl import logging
from PIL import Image
from sklearn import datasets

from ddpm_jax import console
from ddpm_jax import storage
from ddpm_jax.errors import DatasetError  # pylint: disable=unused-import (re-exported)

_TFDS_NAMES = {"cifar10": "cifar10", "celeb_a_hq": "celeb_a_hq/256"}
_KNOWN = ("digits", "image_folder", "cifar10", "celeb_a_hq", "lsun/<category>")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The datasets whose examples carry a class label, and how many classes they have (an image folder
# has one class per sub-folder).
NUM_CLASSES = {"digits": 10, "cifar10": 10}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
# Enough batches in flight to hide decoding, few enough that 256x256 batches stay small in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


# ---------------------------------------------------------------------------------------------
# Image geometry shared by the folder and TFDS sources.


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
  """The central square of `image`, resized to size x size with antialiased bicubic filtering.

  PIL's BICUBIC widens its kernel by the scale factor when shrinking, so large photos (LSUN,
  CelebA-HQ) are low-pass filtered instead of aliased, and it is the filter the DDPM/ADM image
  pipelines used; for upscaling it is a smooth interpolation.
  """
  w, h = image.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  image = image.crop((left, top, left + side, top + side))
  if side != size:
    image = image.resize((size, size), Image.BICUBIC)
  return image


def _as_hwc(image: Image.Image) -> np.ndarray:
  """A PIL image in mode L or RGB as a uint8 [H, W, C] array."""
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _fit_array(array: np.ndarray, size: int) -> np.ndarray:
  """Center-crops and resizes a uint8 [H, W, C] array unless it is already size x size."""
  if array.shape[0] == size and array.shape[1] == size:
    return array
  pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  return _as_hwc(center_crop_resize(pil, size))


# ---------------------------------------------------------------------------------------------
# Sources.


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> np.ndarray:
  """scikit-learn's 1,797 8x8 digits (0..16) as uint8 0..255, bilinearly upscaled; read-only."""

  small = np.round(datasets.load_digits().images * (255.0 / 16.0)).astype(np.uint8)
  big = [
    np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR)) for im in small
  ]
  images = np.stack(big)[..., None]
  images.flags.writeable = False
  return images


def _labeled(image: np.ndarray, label) -> dict:
  """One example of a conditional model's source."""
  return {"image": image, "label": np.int32(label)}


class LabeledDigits:
  """The digits with their classes (scikit-learn's targets, 0..9)."""

  def __init__(self, image_size: int):
    self._images = _digits(image_size)
    self._labels = datasets.load_digits().target.astype(np.int32)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict:
    return _labeled(self._images[index], self._labels[index])


class ImageFolderSource:
  """Every PNG/JPEG under a folder, decoded lazily, converted to L/RGB, center-cropped and
  resized; with `labels` (one per path) each example is {"image", "label"}."""

  def __init__(self, paths, *, image_size: int, num_channels: int, labels=None):
    self._paths = [str(p) for p in paths]
    self._size = image_size
    self._mode = "L" if num_channels == 1 else "RGB"
    self._labels = None if labels is None else np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int):
    with storage.open_read(self._paths[index]) as f, Image.open(f) as image:
      image = image.convert(self._mode)
    image = _as_hwc(center_crop_resize(image, self._size))
    return image if self._labels is None else _labeled(image, self._labels[index])

  def __repr__(self) -> str:
    return f"ImageFolderSource({len(self)} images)"


class TfdsImageSource:
  """The 'image' feature of a TFDS random-access source, center-cropped/resized when its size
  differs."""

  def __init__(self, source, *, image_size: int, with_labels: bool = False):
    self._source = source
    self._size = image_size
    self._with_labels = with_labels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    example = self._source[index]
    image = _fit_array(np.asarray(example["image"], dtype=np.uint8), self._size)
    return _labeled(image, example["label"]) if self._with_labels else image

  def __repr__(self) -> str:
    return f"TfdsImageSource({len(self)} images)"


def image_paths_under(folder: str) -> list[str]:
  """Every PNG/JPEG file (any case of the suffix) anywhere under `folder` (a local path or a gs://
  URL), in the order of their path components."""
  found = [
    f for f in storage.files_under(folder) if posixpath.splitext(f)[1].lower() in _IMAGE_SUFFIXES
  ]
  return [
    storage.join(storage.resolve(folder), f) for f in sorted(found, key=lambda f: f.split("/"))
  ]


def folder_classes(folder: str, paths) -> tuple[list[str], list[int]]:
  """The class names of an image folder (its sub-folders, sorted) and each path's class id; a
  DatasetError names an image that is not inside a class sub-folder."""
  root = storage.resolve(folder).rstrip("/") + "/"
  first = [p[len(root) :].split("/") for p in paths]
  loose = [p for p, parts in zip(paths, first) if len(parts) < 2]
  if loose:
    raise DatasetError(
      f"config.model.num_classes > 0 needs one sub-folder per class in config.data.image_folder = "
      f"{folder!r}, but {loose[0]} is not in a sub-folder."
    )
  names = sorted({parts[0] for parts in first})
  ids = {name: i for i, name in enumerate(names)}
  return names, [ids[parts[0]] for parts in first]


def _image_paths(folder: str) -> list[str]:
  """The images of config.data.image_folder; DatasetError when there are none."""
  if not folder:
    raise DatasetError(
      "config.data.image_folder is empty; set it to a folder of PNG/JPEG images "
      "when config.data.dataset = 'image_folder'."
    )
  if not storage.is_dir(folder):
    raise DatasetError(f"config.data.image_folder = {folder!r} is not an existing folder.")
  paths = image_paths_under(folder)
  if not paths:
    raise DatasetError(f"config.data.image_folder = {folder!r} contains no .png/.jpg/.jpeg files.")
  return paths


# ---------------------------------------------------------------------------------------------
# TFDS.


def hide_accelerators_from_tensorflow():
  """Makes TensorFlow (imported by TFDS and TensorBoard writers) see no GPU/TPU, so JAX keeps all
  their memory."""
  # TensorFlow 2.21 prints its start-up notices (oneDNN, CUDA stubs) before it reads
  # TF_CPP_MIN_LOG_LEVEL: the import is kept quiet unless that variable asks for TF's messages.
  quiet = "tensorflow" not in sys.modules and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") == "3"
  try:
    with console.native_stderr_hidden(quiet):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (
      RuntimeError,
      ValueError,
    ) as e:  # TF already initialised its devices: nothing more to do.
      logging.warning("Could not hide %s devices from TensorFlow: %s", kind, e)


def _import_tfds():
  """tensorflow_datasets, imported only after TensorFlow has been kept off the accelerators."""
  hide_accelerators_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _network_reachable(
  host: str = "storage.googleapis.com", port: int = 443, timeout: float = 5.0
) -> bool:
  """Whether a download could start, checked in <= `timeout` s: TFDS itself retries for minutes
  offline."""
  if any(os.environ.get(v) for v in _PROXY_VARS):
    return True  # Only the proxy knows; let TFDS try.
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _tfds_name(dataset: str) -> str:
  """The TFDS builder name for a config.data.dataset value; DatasetError for unknown names."""
  if dataset in _TFDS_NAMES:
    return _TFDS_NAMES[dataset]
  if dataset.startswith("lsun/") and len(dataset) > len("lsun/"):
    return dataset
  raise DatasetError(
    f"config.data.dataset = {dataset!r} is unknown; known datasets: {', '.join(_KNOWN)}."
  )


def _tfds_builder(tfds, name: str, data_dir: str | None):
  """The ArrayRecord-format builder for `name`; DatasetError for an unknown name or LSUN
  category."""
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (DatasetNotFoundError, unknown config, ...)
    hint = ""
    if name.startswith("lsun/"):
      categories = sorted(tfds.builder_cls("lsun").builder_configs)
      hint = f" LSUN categories: {', '.join(categories)}."
    raise DatasetError(f"TFDS has no dataset {name!r} ({e}).{hint}") from e


def _download_and_prepare(tfds, builder, *, name: str, split: str, data_dir: str | None):
  """Downloads and prepares `builder` with TFDS's own machinery, failing fast and clearly when it
  cannot."""
  where = builder.data_dir
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
      builder.download_and_prepare(download_config=config, file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(
        f"dataset {name!r} is not prepared in {where} and needs a manual download: {e} "
        "Then run again, or point --config.data.tfds_data_dir at a prepared copy."
      ) from e
    return
  if not _network_reachable():
    raise DatasetError(
      f"dataset {name!r} is not prepared in {where} and could not be downloaded (no network): "
      "run once with internet, or point --config.data.tfds_data_dir at a prepared copy."
    )
  logging.info("Downloading and preparing %s into %s (once).", name, where)
  try:
    tfds.data_source(
      name,
      split=split,
      data_dir=data_dir,
      download=True,
      builder_kwargs={"file_format": "array_record"},
    )
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(
      f"dataset {name!r} could not be downloaded and prepared in {where}: {e}"
    ) from e


def _tfds_source(dataset: str, *, split: str, data_dir: str | None):
  """The random-access ArrayRecord source of a TFDS split, downloaded and prepared on first use."""
  name = _tfds_name(dataset)
  tfds = _import_tfds()
  builder = _tfds_builder(tfds, name, data_dir)
  kwargs = dict(split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
  try:
    return tfds.data_source(name, download=False, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if builder.is_prepared():
      splits = ", ".join(sorted(builder.info.splits)) or "none"
      raise DatasetError(
        f"cannot read split {split!r} of {name!r} from {builder.data_dir} (splits: {splits}): {e}"
      ) from e
  _download_and_prepare(tfds, builder, name=name, split=split, data_dir=data_dir)
  return tfds.data_source(name, download=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Public entry points.


def _check_first_image(source, data_config):
  """DatasetError when the source's images do not have config.data.num_channels channels."""
  image = source[0]
  image = image["image"] if isinstance(image, dict) else image
  size, channels = data_config.image_size, data_config.num_channels
  if image.shape[-1] != channels:
    raise DatasetError(
      f"config.data.dataset = {data_config.dataset!r} has {image.shape[-1]}-channel images "
      f"but config.data.num_channels = {channels}."
    )
  assert image.shape == (size, size, channels) and image.dtype == np.uint8, (
    image.shape,
    image.dtype,
  )


def _check_classes(found: int, num_classes: int, *, what: str):
  if found != num_classes:
    raise DatasetError(
      f"{what} has {found} classes but config.model.num_classes = {num_classes}; set it to {found}."
    )


def _tfds_labeled(tfds_source, dataset: str, num_classes: int):
  """Checks that a TFDS source has a `label` feature with num_classes classes."""
  info = getattr(tfds_source, "dataset_info", None)
  features = {} if info is None else info.features
  feature = features["label"] if "label" in features else None
  if feature is None:
    raise DatasetError(
      f"config.model.num_classes = {num_classes} needs class labels, but config.data.dataset = "
      f"{dataset!r} has no 'label' feature; use num_classes = 0."
    )
  _check_classes(int(feature.num_classes), num_classes, what=f"config.data.dataset = {dataset!r}")


def load_images(data_config, *, split: str, num_classes: int = 0):
  """The random-access source of `split`: `len(src)`, `src[i]` -> uint8 [image_size, image_size,
  C], or with num_classes > 0 {"image": that, "label": int32} (DatasetError for a dataset without
  num_classes classes)."""
  assert int(data_config.image_size) > 0 and data_config.num_channels in (1, 3), data_config
  dataset, size, channels = (
    data_config.dataset,
    int(data_config.image_size),
    data_config.num_channels,
  )
  if dataset == "digits":
    if split not in ("train", "test"):
      raise DatasetError(
        f"the digits dataset has splits 'train' and 'test' (the same images), not {split!r}."
      )
    if channels != 1:
      raise DatasetError(
        f"the digits dataset is grayscale: set config.data.num_channels = 1, not {channels}."
      )
    if num_classes:
      _check_classes(NUM_CLASSES["digits"], num_classes, what="the digits dataset")
    source = LabeledDigits(size) if num_classes else _digits(size)
  elif dataset == "image_folder":
    paths = _image_paths(data_config.image_folder)
    labels = None
    if num_classes:
      names, labels = folder_classes(data_config.image_folder, paths)
      _check_classes(
        len(names),
        num_classes,
        what=f"config.data.image_folder = {data_config.image_folder!r} ({', '.join(names)})",
      )
    source = ImageFolderSource(paths, image_size=size, num_channels=channels, labels=labels)
  else:
    tfds_source = _tfds_source(dataset, split=split, data_dir=data_config.tfds_data_dir or None)
    if num_classes:
      _tfds_labeled(tfds_source, dataset, num_classes)
    source = TfdsImageSource(tfds_source, image_size=size, with_labels=bool(num_classes))
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise DatasetError(f"split {split!r} of config.data.dataset = {dataset!r} has no examples.")
  _check_first_image(source, data_config)
  return source


def _random_flip(example, rng: np.random.Generator):
  """Mirrors the image (of a labeled example too) left-right with probability 1/2."""
  if isinstance(example, dict):
    return dict(example, image=_random_flip(example["image"], rng))
  return np.ascontiguousarray(example[:, ::-1]) if rng.random() < 0.5 else example


def _derived_seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the flips, from the run's seed."""
  if seed < 0:
    raise DatasetError(f"the data seed must be non-negative, got {seed}.")
  shuffle_seed, flip_seed = np.random.SeedSequence(seed).generate_state(2)
  return int(shuffle_seed), int(flip_seed)


def _check_sharding(*, global_batch_size: int, process_index: int, process_count: int):
  """DatasetError unless the global batch splits evenly over processes and the index is valid."""
  if global_batch_size <= 0:
    raise DatasetError(f"config.training.batch_size = {global_batch_size} must be positive.")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DatasetError(
      f"process_index {process_index} is not in [0, process_count = {process_count})."
    )
  if global_batch_size % process_count:
    raise DatasetError(
      f"config.training.batch_size = {global_batch_size} is not divisible by the "
      f"{process_count} processes."
    )


def train_iterator(
  data_config,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  start_batch: int = 0,
  num_classes: int = 0,
) -> grain.DatasetIterator:
  """Endless uint8 batches [global_batch_size // process_count, H, W, C] for this process, from
  global batch `start_batch` on (with num_classes > 0: {"image": those, "label": int32 [B]}).

  One global stream: epoch e is the whole dataset shuffled with a seed folded with e (Grain's
  shuffle + repeat), each element flipped (if config.data.random_flip) by a draw seeded with its
  stream position. The stream is cut into blocks of L = global_batch_size // process_count;
  process p takes blocks p, p + P, p + 2P, ..., so global batch s is the concatenation over
  processes of their s-th batches whatever P is, and each process decodes only its own rows.
  Batch s is thus a function of the seed and s alone: a run resumed at step s reads from
  start_batch = s, on any number of processes or Grain workers.
  """
  _check_sharding(
    global_batch_size=global_batch_size, process_index=process_index, process_count=process_count
  )
  source = load_images(data_config, split=data_config.split, num_classes=num_classes)
  if len(source) < global_batch_size:
    raise DatasetError(
      f"config.data.dataset = {data_config.dataset!r} has {len(source)} examples, fewer than "
      f"one global batch (config.training.batch_size = {global_batch_size})."
    )
  shuffle_seed, flip_seed = _derived_seeds(seed)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  if data_config.random_flip:
    ds = ds.random_map(_random_flip, seed=flip_seed)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index + start_batch * process_count :: process_count]
  it_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if data_config.num_workers > 0:
    if (
      not flags.FLAGS.is_parsed()
    ):  # Grain's workers read absl flags; parsing them is the caller's business
      raise DatasetError(
        f"config.data.num_workers = {data_config.num_workers} starts Grain worker processes, "
        "which read absl flags: call absl.flags.FLAGS.mark_as_parsed() first (main does)."
      )
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=int(data_config.num_workers))
    )
  return iter(it_ds)


def eval_batches(
  data_config, *, split: str, batch_size: int, num_examples: int, num_classes: int = 0
):
  """The first `num_examples` images of `split` in order, unflipped, in uint8 batches of <=
  batch_size (with num_classes > 0: {"image": those, "label": int32 [B]})."""
  if batch_size <= 0 or num_examples <= 0:
    raise DatasetError(
      f"evaluation batch_size ({batch_size}) and num_examples ({num_examples}) must be positive."
    )
  source = load_images(data_config, split=split, num_classes=num_classes)
  if num_examples > len(source):
    raise DatasetError(
      f"config.evaluation.num_examples = {num_examples} exceeds the {len(source)} examples of "
      f"split {split!r} of {data_config.dataset!r}."
    )
  ds = grain.MapDataset.source(source)[:num_examples].batch(batch_size)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
