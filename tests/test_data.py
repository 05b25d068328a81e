"""Tests of ddpm_jax.data: sources, the Grain training stream, evaluation batches, conversions.

All offline: the digits ship with scikit-learn, image folders are written here, TFDS is mocked,
and the "not prepared" case runs with sockets disabled.
"""

import socket

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import data
from ddpm_jax import images as images_lib
from ddpm_jax.configs import default
from ddpm_jax.configs import digits as digits_config

N_FOLDER = 24  # images in the identifiable folder: 4 epochs of batches of 6 fit exactly
SIZE = 8


def _config(**overrides):
  """The data section of the default config with `overrides` applied."""
  config = default.get_config().data
  config.update(overrides)
  return config


def _digits(**overrides):
  """The digits data config with `overrides` applied."""
  config = digits_config.get_config().data
  config.update(overrides)
  return config


def _take(it, n):
  """The next n batches of an iterator."""
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def id_folder(tmp_path_factory):
  """24 SIZE x SIZE grayscale PNGs; image i: left half 4 + 8 i, right half 255 (so id and flip are
  readable)."""
  root = tmp_path_factory.mktemp("ids")
  for i in range(N_FOLDER):
    image = np.full((SIZE, SIZE), 255, np.uint8)
    image[:, : SIZE // 2] = 4 + 8 * i
    Image.fromarray(image).save(root / f"{i:02d}.png")
  return str(root)


def _ids_and_flips(batch):
  """Per image of a batch from `id_folder`: its id and whether it was mirrored."""
  batch = batch[..., 0].astype(int)
  ids = (batch.min(axis=(1, 2)) - 4) // 8
  flipped = batch[:, :, 0].max(axis=1) == 255
  return ids, flipped


def _folder_config(folder, **overrides):
  """A grayscale image_folder data config at SIZE x SIZE."""
  return _config(
    dataset="image_folder", image_folder=folder, image_size=SIZE, num_channels=1, **overrides
  )


# ----------------------------------------------------------------------------------------------
# Digits.


def test_digits_source():
  from sklearn import datasets

  source = data.load_images(_digits(), split="train")
  assert len(source) == 1797
  images = np.stack([source[i] for i in range(len(source))])
  assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  labels = datasets.load_digits().target
  means = np.stack([images[labels == k].mean(axis=0) for k in range(10)]).reshape(10, -1)
  distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
  assert (distances + np.eye(10) * 1e9).min() > 100  # ten distinct digit shapes
  np.testing.assert_array_equal(data.load_images(_digits(), split="test")[5], source[5])


# ----------------------------------------------------------------------------------------------
# The training stream.


def test_train_iterator_shape_and_determinism():
  config = _digits(random_flip=True)
  a = _take(data.train_iterator(config, global_batch_size=16, seed=3), 3)
  b = _take(data.train_iterator(config, global_batch_size=16, seed=3), 3)
  c = _take(data.train_iterator(config, global_batch_size=16, seed=4), 3)
  assert a[0].shape == (16, 16, 16, 1) and a[0].dtype == np.uint8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_epochs_reshuffle_and_cover_every_example(id_folder):
  it = data.train_iterator(
    _folder_config(id_folder, random_flip=False), global_batch_size=6, seed=0
  )
  epochs = []
  for _ in range(3):
    ids = np.concatenate([_ids_and_flips(b)[0] for b in _take(it, N_FOLDER // 6)])
    assert sorted(ids) == list(range(N_FOLDER))  # every example exactly once
    epochs.append(list(ids))
  assert epochs[0] != list(range(N_FOLDER))  # shuffled
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled every epoch


def test_flips_only_with_random_flip(id_folder):
  it = data.train_iterator(
    _folder_config(id_folder, random_flip=True), global_batch_size=24, seed=1
  )
  flipped = np.concatenate([_ids_and_flips(b)[1] for b in _take(it, 10)])
  assert 0.35 < flipped.mean() < 0.65
  it = data.train_iterator(
    _folder_config(id_folder, random_flip=False), global_batch_size=24, seed=1
  )
  batches = _take(it, 4)
  assert not np.concatenate([_ids_and_flips(b)[1] for b in batches]).any()


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_does_not_depend_on_process_count(process_count):
  config = _digits(random_flip=True)
  steps = 5  # 5 x 24 = 120 rows, also crossing no epoch; the folder test below crosses epochs
  single = _take(data.train_iterator(config, global_batch_size=24, seed=7), steps)
  shards = [
    _take(
      data.train_iterator(
        config, global_batch_size=24, seed=7, process_index=p, process_count=process_count
      ),
      steps,
    )
    for p in range(process_count)
  ]
  for s in range(steps):
    assert shards[0][s].shape == (24 // process_count, 16, 16, 1)
    np.testing.assert_array_equal(np.concatenate([shard[s] for shard in shards]), single[s])


def test_process_independence_across_epochs(id_folder):
  config = _folder_config(id_folder, random_flip=True)
  single = _take(data.train_iterator(config, global_batch_size=8, seed=2), 9)  # 3 epochs
  shards = [
    _take(
      data.train_iterator(config, global_batch_size=8, seed=2, process_index=p, process_count=2), 9
    )
    for p in range(2)
  ]
  for s in range(9):
    np.testing.assert_array_equal(np.concatenate([shards[0][s], shards[1][s]]), single[s])


def test_get_state_set_state_resumes_exactly(id_folder):
  config = _folder_config(id_folder, random_flip=True)
  it = data.train_iterator(config, global_batch_size=4, process_index=1, process_count=2, seed=5)
  _take(it, 7)
  state = it.get_state()
  expected = _take(it, 10)  # crosses epochs
  resumed = data.train_iterator(
    config, global_batch_size=4, process_index=1, process_count=2, seed=5
  )
  resumed.set_state(state)
  for x, y in zip(_take(resumed, 10), expected):
    np.testing.assert_array_equal(x, y)


def test_train_iterator_errors(id_folder, tmp_path):
  with pytest.raises(data.DatasetError, match="divisible"):
    data.train_iterator(_digits(), global_batch_size=10, seed=0, process_count=4)
  with pytest.raises(data.DatasetError, match="fewer than one global batch"):
    data.train_iterator(_folder_config(id_folder), global_batch_size=32, seed=0)
  with pytest.raises(data.DatasetError, match="known datasets"):
    data.train_iterator(_config(dataset="imagenet"), global_batch_size=8, seed=0)
  with pytest.raises(data.DatasetError, match="not an existing folder"):
    data.load_images(_folder_config(str(tmp_path / "missing")), split="train")
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(data.DatasetError, match="no .png"):
    data.load_images(_folder_config(str(tmp_path)), split="train")
  with pytest.raises(data.DatasetError, match="image_folder is empty"):
    data.load_images(_folder_config(""), split="train")
  with pytest.raises(data.DatasetError, match="num_channels"):
    data.load_images(_digits(num_channels=3), split="train")


def test_worker_processes_give_the_same_stream():
  config = _digits(random_flip=True)
  expected = _take(data.train_iterator(config, global_batch_size=8, seed=9), 3)
  config.num_workers = 1
  from absl import flags  # pylint: disable=g-import-not-at-top

  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:  # library code leaves absl's flags alone: workers need them parsed
    with pytest.raises(data.DatasetError, match="mark_as_parsed"):
      data.train_iterator(config, global_batch_size=8, seed=9)
    flags.FLAGS.mark_as_parsed()
  it = data.train_iterator(config, global_batch_size=8, seed=9)
  try:
    for x, y in zip(_take(it, 3), expected):
      np.testing.assert_array_equal(x, y)
  finally:
    it.close()
    if not was_parsed:
      flags.FLAGS.unparse_flags()


# ----------------------------------------------------------------------------------------------
# Image folders.


def test_image_folder_formats_and_center_crop(tmp_path):
  (tmp_path / "sub").mkdir()
  wide = np.zeros((20, 40, 3), np.uint8)  # green 20x20 center, red margins left and right
  wide[..., 0] = 255
  wide[:, 10:30] = (0, 255, 0)
  Image.fromarray(wide).save(tmp_path / "a_wide.png")
  tall = np.zeros(
    (64, 32, 3), np.uint8
  )  # blue 32x32 center, red margins top and bottom (on JPEG blocks)
  tall[..., 0] = 255
  tall[16:48] = (0, 0, 255)
  Image.fromarray(tall).save(tmp_path / "sub" / "b_tall.JPG", quality=95)
  Image.fromarray(np.full((5, 5), 100, np.uint8)).save(tmp_path / "c_gray.jpeg")  # upscaled
  (tmp_path / "d_readme.txt").write_text("ignored")

  rgb = data.load_images(
    _config(dataset="image_folder", image_folder=str(tmp_path), image_size=SIZE, num_channels=3),
    split="train",
  )
  assert len(rgb) == 3
  images = [rgb[i] for i in range(3)]
  assert all(im.shape == (SIZE, SIZE, 3) and im.dtype == np.uint8 for im in images)
  np.testing.assert_array_equal(
    images[0], np.broadcast_to(np.array([0, 255, 0], np.uint8), (SIZE, SIZE, 3))
  )
  assert np.abs(images[1].astype(int) - 100).max() <= 2  # sorted by path: c_gray.jpeg before sub/
  assert (
    images[2][..., 0].max() < 30 and images[2][..., 2].min() > 220
  )  # JPEG: approximately blue, no red

  gray = data.load_images(
    _config(dataset="image_folder", image_folder=str(tmp_path), image_size=SIZE, num_channels=1),
    split="train",
  )
  assert gray[0].shape == (SIZE, SIZE, 1)
  assert len(np.unique(gray[0])) == 1  # the crop is uniformly green-as-gray: no red margin mixed in


def test_eval_batches_in_order_without_flip(id_folder):
  config = _folder_config(id_folder, random_flip=True)
  batches = list(data.eval_batches(config, split="test", batch_size=5, num_examples=13))
  assert [b.shape[0] for b in batches] == [5, 5, 3]
  ids, flipped = _ids_and_flips(np.concatenate(batches))
  assert list(ids) == list(range(13)) and not flipped.any()
  with pytest.raises(data.DatasetError, match="exceeds"):
    data.eval_batches(config, split="test", batch_size=5, num_examples=25)


# ----------------------------------------------------------------------------------------------
# TFDS.


@pytest.fixture
def no_network(monkeypatch):
  """Every socket connection or DNS lookup fails at once, and proxies are unset."""

  def refuse(*args, **kwargs):
    raise OSError("network disabled in tests")

  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)
  for var in data._PROXY_VARS:
    monkeypatch.delenv(var, raising=False)


def test_tfds_cifar10_through_train_iterator(no_network, tmp_path):
  tfds = data._import_tfds()
  config = _config(dataset="cifar10", tfds_data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=40):
    it = data.train_iterator(config, global_batch_size=8, seed=0)
    batches = _take(it, 6)  # past one epoch of 40
    small = data.load_images(
      _config(dataset="cifar10", tfds_data_dir=str(tmp_path), image_size=16), split="test"
    )
    with pytest.raises(data.DatasetError, match="3-channel"):
      data.load_images(
        _config(dataset="cifar10", num_channels=1, tfds_data_dir=str(tmp_path)), split="train"
      )
  assert all(b.shape == (8, 32, 32, 3) and b.dtype == np.uint8 for b in batches)
  assert len(np.unique(np.concatenate(batches[:5]).reshape(40, -1), axis=0)) > 1
  assert small[0].shape == (16, 16, 3)


def test_tfds_not_prepared_offline_fails_fast(no_network, tmp_path, monkeypatch):
  """Offline, the error comes before TFDS starts a download (whose retries would take minutes)."""
  tfds = data._import_tfds()
  downloads = []
  monkeypatch.setattr(
    tfds.download.DownloadManager, "download", lambda *a, **k: downloads.append(a)
  )
  monkeypatch.setattr(
    tfds.download.DownloadManager, "download_and_extract", lambda *a, **k: downloads.append(a)
  )
  with pytest.raises(data.DatasetError, match="not prepared in .* could not be downloaded"):
    data.load_images(_config(dataset="cifar10", tfds_data_dir=str(tmp_path)), split="train")
  with pytest.raises(data.DatasetError, match="manual download"):
    data.load_images(
      _config(dataset="celeb_a_hq", image_size=256, tfds_data_dir=str(tmp_path)), split="train"
    )
  with pytest.raises(data.DatasetError, match="church_outdoor"):
    data.load_images(_config(dataset="lsun/church", tfds_data_dir=str(tmp_path)), split="train")
  assert not downloads


# ----------------------------------------------------------------------------------------------
# Conversions.


def test_model_input_round_trip_is_exact():
  import jax.numpy as jnp

  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  x = images_lib.to_model_input(values)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(images_lib.to_uint8(x), values)
  xj = images_lib.to_model_input(jnp.asarray(values))
  assert xj.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(images_lib.to_uint8(xj)), values)
  np.testing.assert_array_equal(
    images_lib.to_uint8(np.array([-3.0, 3.0, 0.0], np.float32)), [0, 255, 128]
  )


def test_tfds_prepares_a_dataset_with_its_own_machinery(no_network, tmp_path, monkeypatch):
  """The first-run path for cifar10 reaches TFDS's download step with the installed dependencies
  (TFDS once failed before it, on an import it does not declare); the download itself is stopped
  there."""
  tfds = data._import_tfds()

  class ReachedDownload(Exception):
    pass

  def stop(*args, **kwargs):
    raise ReachedDownload("the download step was reached")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", stop)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", stop)
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: True)
  with pytest.raises(data.DatasetError, match="the download step was reached") as info:
    data.load_images(_config(dataset="cifar10", tfds_data_dir=str(tmp_path)), split="train")
  assert "could not be downloaded and prepared" in str(info.value)
