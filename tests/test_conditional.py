"""Class-conditional models and classifier-free guidance (Ho & Salimans 2022): the class embedding,
label dropout, labels from every data source, guided sampling, the class grid, conditional
evaluation, and the diffusers UNet2DModel with num_class_embeds.

One tiny conditional workdir (4 training steps) is shared by the tests that need a checkpoint.
"""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from sklearn import datasets
from test_convert import TINY_UNET
from test_evaluate import low_rank_frechet_distance
from test_unet import randomize_torch

from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from conftest import write_test_inception_weights
from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import interpolate
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import streams
from ddpm_jax import train
from ddpm_jax import validation
from ddpm_jax.convert import workdir as convert_workdir
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import fid as fid_eval
from ddpm_jax.evaluation import samples as samples_lib
from ddpm_jax.metrics import fid as fid_lib
from ddpm_jax.models import unet

K = 10  # the digits' classes


def cond_config(**overrides):
  return tiny_config(
    model__num_classes=K, training__label_dropout=0.1, training__num_steps=4, **overrides
  )


@pytest.fixture(scope="module")
def fixed():
  """(model, diffusion, params) of the tiny conditional U-Net with every weight moved off its
  (near-zero) initialisation, so outputs and their dependence on the label are O(1)."""
  built = state_lib.build(cond_config())
  params = state_lib.init_state(built.model, built.tx, seed=0, shape=(8, 8, 1)).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return built.model, built.diffusion, jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny conditional run: 4 steps on the labeled digits, checkpoints at 2 and 4, class grid."""
  path = tmp_path_factory.mktemp("cond") / "run"
  train.train(cond_config(), str(path))
  return path


def batch_inputs(batch=4):
  x = jax.random.normal(jax.random.key(2), (batch, 8, 8, 1))
  t = jnp.arange(batch, dtype=jnp.int32) * 2
  y = jnp.arange(batch, dtype=jnp.int32) % K
  return x, t, y


# ----------------------------------------------------------------------------- the model


def test_unconditional_model_is_unchanged():
  """num_classes = 0 (the default) builds the paper's U-Net (whose count and outputs test_unet pins
  against diffusers): no class embedding, and the conditional U-Net differs only by its embedding
  table: the same initial weights elsewhere, and with a zero table the unconditional outputs
  bitwise."""
  built = state_lib.build(tiny_config())
  x, t, _ = batch_inputs()
  params = built.model.init(jax.random.key(0), x, t, train=False)
  assert built.model.num_classes == 0 and "class_embed" not in params["params"]
  assert unet.count_params(params) == 701_345
  cond = state_lib.build(cond_config()).model
  cond_params = cond.init(jax.random.key(0), x, t, train=False)
  assert unet.count_params(cond_params) == 701_345 + (K + 1) * 4 * 32
  table = cond_params["params"].pop("class_embed")["embedding"]
  assert table.shape == (K + 1, 4 * 32) and 0.5 < float(jnp.std(table)) < 2  # N(0, 1) init
  jax.tree.map(np.testing.assert_array_equal, cond_params, params)
  cond_params["params"]["class_embed"] = {"embedding": jnp.zeros_like(table)}
  np.testing.assert_array_equal(
    cond.apply(cond_params, x, t, jnp.arange(4) % K, train=False),
    built.model.apply(params, x, t, train=False),
  )


def test_label_changes_the_output_and_none_is_the_null_label(fixed):
  model, _, params = fixed
  x, t, y = batch_inputs()
  apply = lambda labels: model.apply(params, x, t, labels, train=False)
  assert float(jnp.abs(apply(y) - apply((y + 1) % K)).max()) > 1e-3
  np.testing.assert_array_equal(apply(None), apply(jnp.full_like(y, K)))


# ----------------------------------------------------------------------------- training


def test_label_dropout_rate_and_per_example_draws():
  step_key = jax.random.key(7)
  ids = jnp.arange(4000, dtype=jnp.int32)
  y = ids % K
  dropped = train.drop_labels(step_key, ids, y, rate=0.25, null_label=K)
  is_null = np.asarray(dropped == K)
  assert abs(is_null.mean() - 0.25) < 0.03, is_null.mean()
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(y)[~is_null])
  # example i's draw depends on its id only (not on the batch or device it is in)
  part = train.drop_labels(step_key, ids[1000:1100], y[1000:1100], rate=0.25, null_label=K)
  np.testing.assert_array_equal(part, dropped[1000:1100])
  assert train.drop_labels(step_key, ids, y, rate=0.0, null_label=K) is y


def test_resume_with_labels_equals_uninterrupted_bitwise(workdir, tmp_path):
  """Stopped at step 2 and resumed, a conditional run (labels, label dropout) ends where the
  uninterrupted one does: the labels come back with the data position."""
  shutil.copytree(workdir, tmp_path / "cut", ignore=shutil.ignore_patterns("samples", "events.*"))
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
  resumed = train.train(cond_config(training__num_grid_samples=0), str(tmp_path / "cut"))
  built, mesh = state_lib.build(cond_config()), parallel.make_mesh()
  full, step = checkpoint.restore_ema_params(cond_config(), str(workdir), built=built, mesh=mesh)
  assert step == int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, full, jax.device_get(resumed.ema_params))


def _raw_params(workdir):
  """The (non-EMA) params of the newest checkpoint of a tiny conditional run."""
  built, mesh = state_lib.build(cond_config()), parallel.make_mesh()
  abstract = state_lib.abstract_state(built.model, built.tx, shape=(8, 8, 1), mesh=mesh)
  manager = checkpoint.make_manager(str(workdir), keep=1, read_only=True)
  return jax.device_get(checkpoint.restore(manager, abstract_state=abstract).params)


def test_two_devices_continue_a_conditional_run_as_one_does(workdir, tmp_path):
  """Resumed at step 2 on 2 host devices (a fresh process), the run ends at step 4 where the
  1-device run does, to float32 rounding (the gradient's reduction order): each example's label
  and its dropout follow the example, not the device it lands on."""
  shutil.copytree(workdir, tmp_path / "cut", ignore=shutil.ignore_patterns("samples", "events.*"))
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
  config = cond_config(training__num_grid_samples=0)
  result = run_cli(
    "--config=configs/digits.py",
    *config_flags(config, "data", "model", "diffusion", "training"),
    f"--workdir={tmp_path / 'cut'}",
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5),
    _raw_params(workdir),
    _raw_params(tmp_path / "cut"),
  )


class LabelRecorder:
  """A stand-in for the conditional U-Net that records the labels of every call (train: bool, y
  [B]) and is cheap to compile: its output is x times the mean of its class embedding (so the
  loss still has a gradient). Initialised as the real model."""

  def __init__(self, model, calls):
    self.model, self.num_classes, self.calls = model, model.num_classes, calls

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, params, x, t, y=None, *, train, dropout_keys=None):
    jax.debug.callback(lambda y: self.calls.append((train, np.asarray(y))), y)
    return x * jnp.mean(params["params"]["class_embed"]["embedding"])


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
  """One training step (label dropout 0.5) and a class grid of 2K samples with the model replaced
  by a LabelRecorder: (config, workdir, recorded calls)."""
  config = cond_config(training__num_grid_samples=2 * K)
  config.training.num_steps, config.training.label_dropout = 1, 0.5
  path, calls = tmp_path_factory.mktemp("recorded") / "run", []
  real_build = state_lib.build

  def build(config):
    built = real_build(config)
    return built._replace(model=LabelRecorder(built.model, calls))

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(state_lib, "build", build)
    train.train(config, str(path))
  return config, path, calls


def test_training_drops_labels_where_the_label_dropout_stream_says(recorded_run):
  """The labels the model sees in a train step are the batch's labels with the null label exactly
  where each example's EXAMPLE_LABEL_DROPOUT draw (rate 0.5) says so (Ho & Salimans 2022,
  Algorithm 1), drawn by hand here."""
  config, _, calls = recorded_run
  seen = [y for is_train, y in calls if is_train]
  batch = next(
    iter(data.train_iterator(config.data, global_batch_size=8, seed=config.seed, num_classes=K))
  )
  step_key = jax.random.fold_in(streams.key(config.seed, streams.TRAINING), 0)
  drop = np.asarray(
    [
      jax.random.bernoulli(
        jax.random.fold_in(jax.random.fold_in(step_key, i), streams.EXAMPLE_LABEL_DROPOUT), 0.5
      )
      for i in range(8)
    ]
  )
  assert 0 < drop.sum() < 8 and np.all(np.asarray(batch["label"]) < K)
  assert seen
  for y in seen:
    np.testing.assert_array_equal(y, np.where(drop, K, batch["label"]))


def test_training_writes_a_class_grid(recorded_run):
  """The training grid of a conditional model is a class grid: num_grid_samples = 2K over K classes
  is two columns, and the two samples of row k ask for class k (one forward of the 2K samples per
  step: w = 0)."""
  _, path, calls = recorded_run
  sampled = [y for is_train, y in calls if not is_train]
  assert len(sampled) == 10  # T steps of one batch
  for y in sampled:
    np.testing.assert_array_equal(y.reshape(K, 2), np.repeat(np.arange(K)[:, None], 2, axis=1))
  grid = np.asarray(Image.open(path / "samples" / "step_1.png"))
  factor = math.ceil(512 / (2 * (8 + 2) + 2))  # save_png enlarges to >= 512 pixels wide
  assert grid.shape[:2] == ((K * (8 + 2) + 2) * factor, (2 * (8 + 2) + 2) * factor)


# ----------------------------------------------------------------------------- labels of the data


def test_digits_labels_are_scikit_learn_targets():
  source = data.load_images(tiny_config().data, split="train", num_classes=K)
  target = datasets.load_digits().target
  for i in (0, 1, 500, 1796):
    example = source[i]
    assert example["label"] == target[i] and example["label"].dtype == np.int32
    np.testing.assert_array_equal(example["image"], data._digits(8)[i])
  it = data.train_iterator(tiny_config().data, global_batch_size=8, seed=0, num_classes=K)
  batch = next(it)
  assert batch["image"].shape == (8, 8, 8, 1) and batch["label"].shape == (8,)
  images = data._digits(8).reshape(len(target), -1)
  for image, label in zip(batch["image"], batch["label"]):
    (index,) = np.flatnonzero((images == image.reshape(1, -1)).all(axis=1))[:1]
    assert target[index] == label
  plain = next(data.train_iterator(tiny_config().data, global_batch_size=8, seed=0))
  np.testing.assert_array_equal(plain, batch["image"])  # unconditional runs see the same images


def test_image_folder_classes_are_sorted_sub_folders(tmp_path):
  for name, value in (("zebra", 200), ("apple", 50), ("mango", 120)):
    (tmp_path / "imgs" / name).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(
        tmp_path / "imgs" / name / f"{i}.png"
      )
  config = tiny_config(data__dataset="image_folder", data__image_folder=str(tmp_path / "imgs"))
  source = data.load_images(config.data, split="train", num_classes=3)
  by_label = {int(source[i]["label"]): int(source[i]["image"].min()) // 10 for i in range(9)}
  assert by_label == {0: 5, 1: 12, 2: 20}  # apple, mango, zebra
  with pytest.raises(data.DatasetError, match="has 3 classes but config.model.num_classes = 4"):
    data.load_images(config.data, split="train", num_classes=4)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "loose.png")
  with pytest.raises(data.DatasetError, match="loose.png is not in a sub-folder"):
    data.load_images(config.data, split="train", num_classes=3)


def test_image_folder_classes_json(tmp_path):
  for name in ("b", "a"):
    (tmp_path / "imgs" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / name / "0.png")
  config = cond_config(data__dataset="image_folder", data__image_folder=str(tmp_path / "imgs"))
  train._write_classes(config, str(tmp_path / "wd"))
  assert json.loads((tmp_path / "wd" / "classes.json").read_text()) == {"class_names": ["a", "b"]}


def test_tfds_cifar10_labels(tmp_path):
  tfds = data._import_tfds()
  config = tiny_config(
    data__dataset="cifar10", data__tfds_data_dir=str(tmp_path), data__num_channels=3
  )
  with tfds.testing.mock_data(num_examples=20):
    batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0, num_classes=10))
    raw = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path))
    source = data.load_images(config.data, split="train", num_classes=10)
    assert [int(source[i]["label"]) for i in range(5)] == [int(raw[i]["label"]) for i in range(5)]
    with pytest.raises(data.DatasetError, match="has 10 classes"):
      data.load_images(config.data, split="train", num_classes=3)
  assert batch["image"].shape == (8, 8, 8, 3) and batch["label"].dtype == np.int32
  assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(data__dataset="celeb_a_hq", data__num_channels=3), "'celeb_a_hq' has none"),
    (dict(data__dataset="lsun/church_outdoor", data__num_channels=3), "has none"),
    (dict(model__num_classes=7), "must be 10, the classes of 'digits'"),
    (dict(training__label_dropout=1.0), "label_dropout = 1.0 must be in"),
    (dict(sampling__labels="1,12"), "holds class 12, outside"),
    (dict(sampling__labels="some"), "must be 'all', 'grid' or class ids"),
    (dict(sampling__guidance_scale=-1.0), "guidance_scale = -1.0 must be"),
  ],
)
def test_conditional_config_errors_are_one_sentence(overrides, match):
  config = cond_config()
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  with pytest.raises(ConfigError, match=match):
    validation.validate(config, mode="train")


def test_guidance_needs_a_conditional_model():
  with pytest.raises(ConfigError, match="needs a conditional model"):
    validation.validate(tiny_config(sampling__guidance_scale=1.0), mode="sample")


# ----------------------------------------------------------------------------- labels of samples


def test_label_specs_and_class_grid_layout():
  np.testing.assert_array_equal(labels_lib.table("all", num_classes=3, num_samples=7), [0, 1, 2])
  grid = labels_lib.table("grid", num_classes=3, num_samples=7)
  assert labels_lib.grid_columns(3, 7) == 3
  np.testing.assert_array_equal(grid, [0, 0, 0, 1, 1, 1, 2, 2, 2])  # row k (3 columns) = class k
  np.testing.assert_array_equal(labels_lib.of_ids(grid, np.arange(7)), [0, 0, 0, 1, 1, 1, 2])
  listed = labels_lib.table("2, 0", num_classes=3, num_samples=7)
  np.testing.assert_array_equal(labels_lib.of_ids(listed, np.arange(5)), [2, 0, 2, 0, 2])
  assert labels_lib.describe("1,7,7") == "1-7-7"


def test_grid_png_shows_one_row_per_class_for_any_num_samples():
  """grid.png of labels = 'grid' with K = 3 and N = 400 (ceil(N / K) = 134 columns, more than 256
  images): one row per class, min(134, 256 // 3) = 85 columns, row k = samples 134 k + j; with
  N = 7 a short last row. Each fake 1x1 image holds its sample id's label (+ 1, as 0 is black)."""
  for num_samples, rows in ((400, [[k] * 85 for k in range(3)]), (7, [[0] * 3, [1] * 3, [2]])):
    table = labels_lib.table("grid", num_classes=3, num_samples=num_samples)
    fake = (labels_lib.of_ids(table, np.arange(num_samples)) + 1).astype(np.uint8)
    picture = samples_lib.grid_picture(fake.reshape(-1, 1, 1, 1), num_classes=3)[..., 0]
    ncols = len(rows[0])
    assert picture.shape == (3 * 3 + 2, ncols * 3 + 2)
    cells = picture[2::3, 2::3]  # 1x1 images, padding 2
    for k, row in enumerate(rows):
      np.testing.assert_array_equal(cells[k, : len(row)], np.asarray(row) + 1)
      assert np.all(cells[k, len(row) :] == 255)  # padding
  ids, ncols = labels_lib.grid_picture_ids(3, 400)
  assert ncols == 85 and list(ids[84:87]) == [84, 134, 135]


def test_guidance_formula_in_one_batched_forward(fixed):
  """(1 + w) eps(x, y) - w eps(x, null) by hand, and the guided function calls the network once on
  the doubled batch; learned variances (the extra channels) come from the conditional half."""
  model, _, params = fixed
  x, t, y = batch_inputs()
  w = 3.0
  cond = model.apply(params, x, t, y, train=False)
  uncond = model.apply(params, x, t, jnp.full_like(y, K), train=False)
  guided = sampling.guided_model_fn(model, guidance_scale=w)(params, x, t, y)
  np.testing.assert_allclose(guided, (1 + w) * cond - w * uncond, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(guided - cond).max()) > 1e-2

  calls = []

  class Recorder:
    num_classes = K

    def apply(self, params, x, t, y, train):
      calls.append((x.shape[0], np.asarray(y)))
      return jnp.concatenate([x * (y[:, None, None, None] + 1.0), x], axis=-1)  # "eps", "var"

  out = sampling.guided_model_fn(Recorder(), guidance_scale=w)(None, x, t, y)
  assert len(calls) == 1 and calls[0][0] == 8
  np.testing.assert_array_equal(calls[0][1], np.concatenate([y, np.full(4, K)]))
  expected_eps = (1 + w) * x * (y[:, None, None, None] + 1.0) - w * x * (K + 1.0)
  np.testing.assert_allclose(out[..., :1], expected_eps, rtol=1e-6)
  np.testing.assert_array_equal(out[..., 1:], x)

  # w = 0: one forward of the batch B with the labels y (no doubled batch, no null pass)
  calls.clear()
  out = sampling.guided_model_fn(Recorder(), guidance_scale=0.0)(None, x, t, y)
  assert len(calls) == 1 and calls[0][0] == 4
  np.testing.assert_array_equal(calls[0][1], y)
  np.testing.assert_array_equal(out, Recorder().apply(None, x, t, y, False))


def _hand_sample(model, d, params, table, ids, *, w):
  """Algorithm 2 written out, with the guided eps computed from two separate forwards."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(5), ids)
  y = jnp.asarray(table)[ids % len(table)]
  x = sampling.draw_normal(keys, d.num_timesteps, (8, 8, 1))
  for t in reversed(range(d.num_timesteps)):
    ts = jnp.full((len(ids),), t, jnp.int32)
    out = model.apply(params, x, ts, y, train=False)
    if w:
      out = (1 + w) * out - w * model.apply(params, x, ts, jnp.full_like(y, K), train=False)
    x, _ = dm.p_sample(d, out, x, ts, noise=sampling.draw_normal(keys, t, (8, 8, 1)))
  return np.asarray(x)


SAMPLERS = [
  dict(method="ancestral"),
  dict(
    method="ancestral",
    timesteps=respace.kept_timesteps(spacing="uniform", num_steps=4, num_timesteps=10),
  ),
  dict(
    method="ddim",
    timesteps=respace.kept_timesteps(spacing="uniform", num_steps=4, num_timesteps=10),
    eta=0.5,
  ),
]


def _draw(model, d, params, table, *, w, **options):
  """Samples 0..3 (float32, unclipped) of `make_sampler` at guidance scale w."""
  mesh = parallel.make_mesh()
  sample = sampling.make_sampler(
    model, d, mesh, image_shape=(8, 8, 1), as_uint8=False, label_table=table, guidance_scale=w,
    **options,
  )  # fmt: skip
  return np.asarray(
    parallel.to_host(sample(params, jax.random.key(5), sampling.sample_ids(0, 4, mesh)))
  )


def test_sampler_gives_sample_i_the_label_of_its_id(fixed):
  """The sampler's labels: sample i asks for table[i % len(table)], as Algorithm 2 written out by
  hand with those labels."""
  model, d, params = fixed
  table = labels_lib.table("2,5,9", num_classes=K, num_samples=4)
  np.testing.assert_allclose(
    _draw(model, d, params, table, w=0.0),
    _hand_sample(model, d, params, table, jnp.arange(4), w=0.0),
    atol=1e-4,
  )


@pytest.mark.parametrize("options", SAMPLERS, ids=["ancestral", "respaced", "ddim"])
def test_w0_is_plain_conditional_sampling_bitwise(fixed, options):
  """w = 0 is plain conditional sampling, bitwise: the sampler of a model that just calls the
  conditional network with label 3 (no guidance code at all)."""
  model, d, params = fixed

  class Plain:
    num_classes = 0

    def apply(self, params, x, t, y=None, *, train):
      assert y is None
      return model.apply(params, x, t, jnp.full((x.shape[0],), 3, jnp.int32), train=train)

  table = labels_lib.table("3", num_classes=K, num_samples=4)
  np.testing.assert_array_equal(
    _draw(model, d, params, table, w=0.0, **options),
    _draw(Plain(), d, params, None, w=0.0, **options),
  )


@pytest.mark.parametrize("options", SAMPLERS, ids=["ancestral", "respaced", "ddim"])
def test_every_sampler_is_guided(fixed, options):
  """Ancestral, respaced and DDIM sampling at w = 2 equal sampling at w = 0 from a model whose
  output is the guided combination computed by hand (two separate forwards)."""
  model, d, params = fixed
  w = 2.0

  class HandGuided:
    num_classes = K

    def apply(self, params, x, t, y, train):
      cond = model.apply(params, x, t, y, train=train)
      return (1 + w) * cond - w * model.apply(params, x, t, jnp.full_like(y, K), train=train)

  table = labels_lib.table("all", num_classes=K, num_samples=4)
  np.testing.assert_allclose(
    _draw(model, d, params, table, w=w, **options),
    _draw(HandGuided(), d, params, table, w=0.0, **options),
    atol=1e-4,
  )


def test_from_config_passes_the_guidance_scale(fixed):
  """sampling.from_config (the sampler of every mode) at config.sampling.guidance_scale = 2 is
  make_sampler at guidance_scale = 2, bitwise, and differs from w = 0."""
  model, d, params = fixed
  mesh = parallel.make_mesh()

  def from_config(w):
    config = cond_config(sampling__guidance_scale=w)
    sample = sampling.from_config(config, state_lib.build(config), mesh, as_uint8=False)
    ids = sampling.sample_ids(0, 4, mesh)
    return np.asarray(parallel.to_host(sample(params, jax.random.key(5), ids)))

  table = sampling.config_label_table(cond_config())
  guided = from_config(2.0)
  np.testing.assert_array_equal(guided, _draw(model, d, params, table, w=2.0))
  assert np.abs(guided - from_config(0.0)).max() > 1e-2


# ----------------------------------------------------------------------------- modes


def test_sample_mode_records_labels_and_w(workdir):
  config = cond_config(sampling__labels="grid", sampling__guidance_scale=1.5)
  config.sampling.num_samples = 20
  config.sampling.num_progressive = 0
  out = samples_lib.dump_samples(config, str(workdir))
  assert out.endswith("ckpt_4_n20_seed0_ancestral10_w1.5_labelsgrid")
  record = json.loads(open(f"{out}/sampler.json").read())
  assert record["labels"] == "grid" and record["guidance_scale"] == 1.5
  arrays = np.load(f"{out}/samples.npz")
  assert arrays["arr_0"].shape == (20, 8, 8, 1)
  np.testing.assert_array_equal(arrays["arr_1"], np.repeat(np.arange(K), 2))  # row k = class k
  grid = Image.open(f"{out}/grid.png")
  factor = math.ceil(512 / (2 * 10 + 2))
  assert grid.size == ((2 * 10 + 2) * factor, (K * 10 + 2) * factor)  # 2 columns, 10 rows


def test_interpolation_of_a_conditional_model_is_unguided_with_the_null_label(workdir):
  """--mode=interpolate of a conditional model (labels 'grid', w = 1.5 configured) decodes with the
  null label and no guidance, and its folder and record say so (labels null, no w): its images
  are those of a decoder whose network is given y = null explicitly."""
  config = cond_config(sampling__labels="grid", sampling__guidance_scale=1.5)
  config.interpolation.timesteps, config.interpolation.num_pairs = (10,), 1
  config.interpolation.lambdas = (0.0, 0.5, 1.0)
  out = interpolate.run(config, str(workdir))
  assert out.endswith("ckpt_4_seed0_ancestral10_labelsnull"), out
  text = open(f"{out}/timesteps_and_lambdas.txt").read()
  assert "'labels': 'null'" in text and "guidance" not in text
  saved = np.load(f"{out}/interpolations.npz")

  built, mesh = state_lib.build(config), parallel.make_mesh()
  params, _ = checkpoint.restore_ema_params(config, str(workdir), built=built, mesh=mesh)

  class ExplicitNull:
    num_classes = 0

    def apply(self, params, x, t, y=None, *, train):
      assert y is None
      null = jnp.full((x.shape[0],), K, jnp.int32)
      return built.model.apply(params, x, t, null, train=train)

  fn = interpolate.make_interpolator(ExplicitNull(), built.diffusion, mesh, image_shape=(8, 8, 1))
  by_hand = interpolate.interpolations(
    fn,
    params,
    key=streams.key(config.seed, streams.INTERPOLATION),
    sources1=saved["sources1"],
    sources2=saved["sources2"],
    lambdas=list(config.interpolation.lambdas),
    timesteps=[10],
    batch_size=config.sampling.batch_size,
    mesh=mesh,
  )
  np.testing.assert_array_equal(saved["images"], by_hand)


def test_bpd_is_conditional_on_the_true_label(fixed):
  model, d, params = fixed
  mesh = parallel.make_mesh()
  fn = bpd.make_bpd_fn(d, model, mesh, clip_denoised=True)
  images_uint8 = np.asarray(data._digits(8)[:4])
  labels = np.arange(4, dtype=np.int32)
  key, ids = jax.random.key(3), sampling.sample_ids(0, 4, mesh)
  total = lambda batch: np.asarray(parallel.to_host(fn(params, key, batch, ids)[0])).sum(1)
  ours = total({"image": images_uint8, "label": labels})
  x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1
  expected = [
    dm.calc_bpd_loop(
      d,
      lambda x_t, t, i=i: model.apply(params, x_t, t, jnp.asarray(labels[i : i + 1]), train=False),
      x_start=x[i : i + 1],
      key=jax.random.fold_in(key, i),
    ).terms_bpd.sum()
    for i in range(4)
  ]
  # (a batch of 4 and batches of 1 round differently; the decoder term amplifies that a little)
  np.testing.assert_allclose(ours, expected, rtol=2e-3)
  other = total({"image": images_uint8, "label": (labels + 1) % K})
  assert np.abs(ours - other).max() > 0.1, np.abs(ours - other)


def test_bpd_mode_bounds_p_x_given_the_true_label(fixed, workdir, tmp_path, monkeypatch):
  """--mode=bpd of a conditional checkpoint (here with the fixed model's weights, whose output
  depends on the label visibly): each example's bound at its own digit's label."""
  model, d, params = fixed
  monkeypatch.setattr(checkpoint, "restore_ema_params", lambda *args, **kwargs: (params, 4))
  config = cond_config()
  ev = config.evaluation
  ev.split, ev.num_examples, ev.batch_size = "train", 4, 4
  wd = shutil.copytree(workdir, tmp_path / "wd", ignore=shutil.ignore_patterns("eval", "samples"))
  r = json.loads(open(bpd.evaluate(config, str(wd))).read())
  assert r["settings"]["conditional_on"] == "true labels" and r["num_examples"] == 4
  mesh = parallel.make_mesh()
  fn = bpd.make_bpd_fn(d, model, mesh, clip_denoised=True)
  source = data.load_images(config.data, split="train", num_classes=K)
  key, ids = streams.key(config.seed, streams.BPD), sampling.sample_ids(0, 4, mesh)

  def mean_bound(labels):
    batch = {"image": np.stack([source[i]["image"] for i in range(4)]), "label": labels}
    terms, prior, _ = (
      np.asarray(parallel.to_host(a), np.float64) for a in fn(params, key, batch, ids)
    )
    return float((terms.sum(1) + prior).mean())

  true = np.array([source[i]["label"] for i in range(4)], np.int32)
  assert r["bits_per_dim"]["mean"] == pytest.approx(mean_bound(true), rel=1e-6)
  assert abs(r["bits_per_dim"]["mean"] - mean_bound((true + 1) % K)) > 1e-2


def test_fid_mode_draws_class_balanced_samples(workdir, tmp_path, monkeypatch):
  """--mode=fid of a conditional model: sample i asks for class i % K whatever
  config.sampling.labels says, guided with config.sampling.guidance_scale; both recorded."""
  monkeypatch.setattr(fid_lib, "frechet_distance", low_rank_frechet_distance)
  config = cond_config(sampling__labels="grid", sampling__guidance_scale=2.0)
  ev = config.evaluation
  ev.num_fid_samples, ev.sample_chunk_size, ev.batch_size = 6, 6, 6
  ev.fid_reference_splits, ev.num_fid_reference, ev.split = ("train",), 4, "train"
  ev.inception_weights = write_test_inception_weights(str(tmp_path / "inception.npz"))
  ev.stats_dir = str(tmp_path / "fid_stats")
  wd = shutil.copytree(workdir, tmp_path / "wd", ignore=shutil.ignore_patterns("eval", "samples"))
  r = json.loads(open(fid_eval.evaluate(config, str(wd))).read())
  assert r["sampler"]["labels"] == "all" and r["sampler"]["guidance_scale"] == 2.0
  assert np.isfinite(r["fid"]["train"])
  (chunk,) = (wd / "eval").glob("fid_4_ancestral10_w2.0_labelsall_seed0/chunk_*.npz")
  built, mesh = state_lib.build(config), parallel.make_mesh()
  params, _ = checkpoint.restore_ema_params(config, str(wd), built=built, mesh=mesh)
  fn = sampling.from_config(config, built, mesh, label_table=np.arange(K, dtype=np.int32))
  expected = sampling.generate(
    fn, params, key=samples_lib.sample_key(config), num_samples=6, batch_size=4, mesh=mesh
  )
  np.testing.assert_array_equal(np.load(chunk)["arr_0"], expected)


# ----------------------------------------------------------------------------- diffusers


def test_diffusers_round_trip_with_num_class_embeds(tmp_path):
  """A random UNet2DModel with num_class_embeds = K + 1 imports to the same eps (with labels) and
  exports back to the same weights, which diffusers loads."""
  torch.manual_seed(0)
  reference = UNet2DModel(**TINY_UNET, num_class_embeds=K + 1).eval()
  with torch.no_grad():
    randomize_torch(reference, 1)
  reference.save_pretrained(tmp_path / "hub", safe_serialization=True)
  config = cond_config()
  convert_workdir.import_checkpoint(
    str(tmp_path / "hub"), config=config, workdir=str(tmp_path / "wd")
  )
  built = state_lib.build(config)
  params, _ = checkpoint.restore_ema_params(
    config, str(tmp_path / "wd"), built=built, mesh=parallel.make_mesh()
  )
  x, t, y = batch_inputs()
  ours = np.asarray(built.model.apply(params, x, t, y, train=False))

  def eps_of(torch_model):
    with torch.no_grad():
      return (
        torch_model(
          torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
          torch.from_numpy(np.array(t)).long(),
          class_labels=torch.from_numpy(np.array(y)).long(),
        )
        .sample.numpy()
        .transpose(0, 2, 3, 1)
      )

  theirs = eps_of(reference)
  assert 0.1 < theirs.std() and np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()

  out, _ = convert_workdir.export_diffusers(str(tmp_path / "wd"), str(tmp_path / "export"))
  exported = UNet2DModel.from_pretrained(out).eval()
  assert exported.config.num_class_embeds == K + 1
  for key, value in reference.state_dict().items():
    np.testing.assert_array_equal(exported.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  assert np.abs(eps_of(exported) - ours).max() <= 1e-4
  with pytest.raises(ConfigError, match="model.num_classes \\(checkpoint 10, config 0\\)"):
    convert_workdir.import_checkpoint(
      str(tmp_path / "hub"), config=tiny_config(), workdir=str(tmp_path / "wd2")
    )
