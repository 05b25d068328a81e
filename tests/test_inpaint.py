"""--mode=inpaint: RePaint (Lugmayr et al. 2022) against its schedule written out by hand and a
plain Python loop over it, the kept region, the result files, and the user errors."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import inpaint
from ddpm_jax import main
from ddpm_jax import parallel
from ddpm_jax import repaint
from ddpm_jax import state as state_lib
from ddpm_jax import streams
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError

# ----------------------------------------------------------------------------- the schedule


def test_jump_schedule_is_repaints_for_small_T():
  # RePaint's get_schedule_jump(t_T=7, n_sample=1, jump_length=2, jump_n_sample=3), by hand: jumps
  # up 2 steps at t = 4, 2, 0 (the multiples of 2 below 7 - 2), twice each, then on to -1.
  assert repaint.jump_schedule(7, 2, 3).tolist() == [
    *(6, 5, 4),
    *(5, 6, 5, 4),
    *(5, 6, 5, 4),
    *(3, 2),
    *(3, 4, 3, 2),
    *(3, 4, 3, 2),
    *(1, 0),
    *(1, 2, 1, 0),
    *(1, 2, 1, 0),
    -1,
  ]
  # one pass: plain reverse steps; a jump as long as the chain never happens
  assert repaint.jump_schedule(5, 2, 1).tolist() == [4, 3, 2, 1, 0, -1]
  assert repaint.jump_schedule(5, 5, 3).tolist() == [4, 3, 2, 1, 0, -1]
  # the paper's setting (T = 250, j = 10, r = 10): 24 stretches traversed 9 more times
  times = repaint.jump_schedule(250, 10, 10)
  moves = repaint.schedule_moves(times)
  assert repaint.num_model_calls(moves) == 250 + 24 * 9 * 10
  assert set((moves.to - moves.start).tolist()) == {-1, 10}  # reverse steps and 10-step jumps


def test_moves_merge_each_run_of_upward_steps_into_one_jump():
  moves = repaint.schedule_moves(repaint.jump_schedule(7, 2, 3))
  assert list(zip(moves.start.tolist(), moves.to.tolist()))[:6] == [
    (6, 5),
    (5, 4),
    (4, 6),
    (6, 5),
    (5, 4),
    (4, 6),
  ]
  assert moves.to[-1] == -1 and len(moves.start) == 25


# ----------------------------------------------------------------------------- the sampler

T, JUMP, PASSES = 10, 3, 2


@pytest.fixture(scope="module")
def tiny_model():
  """The tiny U-Net with every parameter perturbed (the initial output layer is near zero)."""
  config = tiny_config()
  built = state_lib.build(config)
  params = state_lib.init_state(built.model, built.tx, seed=0, shape=(8, 8, 1)).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return config, built, jax.tree.unflatten(tree, leaves)


def reference_repaint(apply, betas, params, key, ids, x0, keep, *, jump, passes):
  """RePaint written as a plain Python loop over the time list, one move at a time, with NumPy
  formulas (Ho et al. 2020 eq. 7 and 11 for the reverse step, the fixedlarge variance; eq. 4 for
  the known region and the jump): the noise comes from the same keys as `repaint`."""
  betas = np.asarray(betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  log_var = np.log(np.append(posterior_variance[1], betas[1:]))
  shape = x0.shape[1:]

  def noise(kind, i):
    out = []
    for row in ids:
      k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, row), kind), i)
      out.append(np.asarray(jax.random.normal(k, shape)))
    return np.stack(out).astype(np.float64)

  x = noise(streams.INPAINT_START, 0)
  times = repaint.jump_schedule(len(betas), jump, passes).tolist()
  move, jump_start = -1, None
  for a, b in zip(times[:-1], times[1:]):
    if b > a:  # a step of a jump, drawn as one q(x_b | x_start) from where the jump began
      if jump_start is None:
        move, jump_start = move + 1, (a, x)
      start, x_start = jump_start
      ratio = abar[b] / abar[start]
      x = np.sqrt(ratio) * x_start + np.sqrt(1.0 - ratio) * noise(streams.INPAINT_FORWARD, move)
      continue
    move, jump_start = move + 1, None
    t = np.full((len(ids),), a, np.int32)
    eps = np.asarray(apply(params, jnp.asarray(x, jnp.float32), t), np.float64)
    x0_pred = np.clip(np.sqrt(1.0 / abar[a]) * x - np.sqrt(1.0 / abar[a] - 1.0) * eps, -1, 1)
    mean = coef1[a] * x0_pred + coef2[a] * x
    unknown = mean + (a > 0) * np.exp(0.5 * log_var[a]) * noise(streams.INPAINT_REVERSE, move)
    if b >= 0:
      known = np.sqrt(abar[b]) * x0 + np.sqrt(1.0 - abar[b]) * noise(streams.INPAINT_KNOWN, move)
    else:
      known = x0
    x = np.where(keep > 0.5, known, unknown)
  return x


def test_repaint_matches_a_plain_loop_and_keeps_the_known_region(tiny_model):
  config, built, params = tiny_model
  mesh = parallel.make_mesh()
  fn = repaint.make_inpainter(
    repaint.model_apply(built.model),
    built.diffusion,
    mesh,
    image_shape=(8, 8, 1),
    jump_length=JUMP,
    num_resamplings=PASSES,
    as_uint8=False,
  )
  rng = np.random.default_rng(0)
  x0 = images.to_model_input(rng.integers(0, 256, (2, 8, 8, 1)).astype(np.uint8))
  keep = np.broadcast_to(repaint.region_mask("center", 8)[None, :, :, None], x0.shape)
  keep = keep.astype(np.float32)
  key, ids = streams.key(0, streams.INPAINT), np.array([3, 8], np.int32)
  ours = np.asarray(fn(params, key, jnp.asarray(ids), x0, keep))
  apply = jax.jit(lambda p, x, t: built.model.apply(p, x, t, train=False))
  betas = dm.get_beta_schedule("linear", beta_start=0.01, beta_end=0.5, num_timesteps=T)
  expected = reference_repaint(apply, betas, params, key, ids, x0, keep, jump=JUMP, passes=PASSES)
  error = float(np.abs(ours - expected).max())
  print(f"RePaint vs the plain loop: max abs error {error:.1e}")
  assert error <= 1e-5, error  # float32 against float64 over 25 moves
  kept = keep > 0.5
  np.testing.assert_array_equal(ours[kept], x0[kept])  # the input itself, bit for bit
  assert float(np.abs(ours[~kept] - x0[~kept]).mean()) > 0.05  # the rest was filled in
  # the uint8 images (what the mode writes) keep the input's pixels
  uint8_input = rng.integers(0, 256, (1, 8, 8, 1)).astype(np.uint8)
  np.testing.assert_array_equal(
    images.to_uint8(np.where(kept[:1], images.to_model_input(uint8_input), 0.3)),
    np.where(kept[:1], uint8_input, images.to_uint8(np.float32(0.3))),
  )


def test_the_whole_schedule_is_one_loop_with_one_network_call(tiny_model):
  """RePaint's 25 moves trace to one while loop whose body calls the network once (traced, not
  compiled): compile time does not grow with T, the jump length or the passes."""
  config, built, params = tiny_model
  fn = repaint.make_inpainter(
    repaint.model_apply(built.model),
    built.diffusion,
    parallel.make_mesh(),
    image_shape=(8, 8, 1),
    jump_length=JUMP,
    num_resamplings=PASSES,
  )
  x0 = np.zeros((2, 8, 8, 1), np.float32)
  key, ids = streams.key(0, streams.INPAINT), np.arange(2, dtype=np.int32)
  text = str(jax.make_jaxpr(fn)(params, key, ids, x0, x0))
  assert len(re.findall(r"= (?:scan|while)\[", text)) == 1  # fori_loop: a scan (static bounds)
  # the network's convolutions appear as often as in one U-Net forward, not once per move
  one_forward = str(
    jax.make_jaxpr(lambda p, x: built.model.apply(p, x, ids, train=False))(params, x0)
  )
  assert text.count("conv_general_dilated[") == one_forward.count("conv_general_dilated[") > 0


# ----------------------------------------------------------------------------- the mode


def mode_config(**inpaint_keys):
  config = tiny_config()
  config.inpaint.jump_length, config.inpaint.num_resamplings = JUMP, PASSES
  config.inpaint.num_samples = 3
  config.sampling.batch_size = 4  # 2 images x 3 samples: two batches, the second cut
  for key, value in inpaint_keys.items():
    config.inpaint[key] = value
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
  """A workdir whose only checkpoint holds the perturbed tiny model (as an imported one does)."""
  config, built, params = tiny_model
  folder = str(tmp_path_factory.mktemp("inpaint_run"))
  state = jax.jit(functools.partial(state_lib.state_from_params, tx=built.tx, seed=0))(params)
  manager = checkpoint.make_manager(folder, keep=1)
  checkpoint.save(manager, state=state, config=config, force=True)
  manager.wait_until_finished()
  checkpoint.write_config(folder, config)
  return folder


def write_png(path, array):
  Image.fromarray(array).save(path)
  return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Two 12x10 greyscale photos in a folder (cropped to their central 10x10, resized to 8x8) and a
  12x10 mask keeping the top half."""
  folder = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(1)
  os.makedirs(folder / "photos")
  for name in ("a.png", "b.png"):
    write_png(folder / "photos" / name, rng.integers(0, 256, (10, 12), dtype=np.uint8))
  mask = np.zeros((10, 12), np.uint8)
  mask[:5] = 255
  return dict(folder=str(folder / "photos"), mask=write_png(folder / "mask.png", mask))


def test_the_mode_writes_inputs_mask_results_and_keeps_the_input_pixels(workdir, inputs):
  config = mode_config(image=inputs["folder"], mask=inputs["mask"])
  out = main.run(config, workdir, "inpaint")
  assert os.path.basename(out) == f"ckpt_0_n2x3_seed0_ancestral{T}_j{JUMP}_r{PASSES}"
  assert sorted(os.listdir(out)) == [
    "inpaint.json",
    "inpaint.npz",
    "input.png",
    "mask.png",
    "result.png",
  ]
  arrays = np.load(os.path.join(out, "inpaint.npz"))
  assert arrays["inputs"].shape == (2, 8, 8, 1) and arrays["samples"].shape == (2, 3, 8, 8, 1)
  keep = arrays["mask"][..., 0] == 255
  assert keep[:4].all() and not keep[4:].any()  # the 12x10 mask cropped and resized as the images
  for i in range(2):
    for s in range(3):
      np.testing.assert_array_equal(arrays["samples"][i, s][keep], arrays["inputs"][i][keep])
  # the samples of one image differ from each other (each row has its own noise)
  assert not np.array_equal(arrays["samples"][0, 0], arrays["samples"][0, 1])
  record = json.loads(open(os.path.join(out, "inpaint.json")).read())
  assert record["jump_length"] == JUMP and record["num_resamplings"] == PASSES
  assert [os.path.basename(p) for p in record["images"]] == ["a.png", "b.png"]
  # result.png: one row per image (input, masked input, 3 samples)
  assert (
    Image.open(os.path.join(out, "result.png")).size[0] > Image.open(out + "/result.png").size[1]
  )


def test_dataset_images_and_named_regions():
  config = mode_config(mask="bottom_half", num_images=3)
  loaded = inpaint.load_inputs(config)
  np.testing.assert_array_equal(loaded.images, data.load_images(config.data, split="train")[:3])
  assert loaded.names == ["train[0]", "train[1]", "train[2]"]
  keep = {name: repaint.region_mask(name, 8) for name in repaint.MASK_REGIONS}
  assert keep["bottom_half"][:4].all() and not keep["bottom_half"][4:].any()
  assert keep["top_half"][4:].all() and not keep["top_half"][:4].any()
  assert keep["left_half"][:, 4:].all() and not keep["left_half"][:, :4].any()
  assert keep["right_half"][:, :4].all() and not keep["right_half"][:, 4:].any()
  assert not keep["center"][2:6, 2:6].any() and keep["center"].sum() == 64 - 16
  np.testing.assert_array_equal(inpaint.load_mask(config, loaded.sizes), keep["bottom_half"])


def test_user_errors_are_one_sentence(tmp_path, inputs):
  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("not a picture")
  white = write_png(tmp_path / "white.png", np.full((8, 8), 255, np.uint8))
  odd_size = write_png(tmp_path / "odd.png", np.zeros((5, 7), np.uint8))
  empty = tmp_path / "empty"
  os.makedirs(empty)
  (empty / "readme.txt").write_text("no images here")
  cases = [
    (dict(image=str(tmp_path / "missing.png"), mask="center"), "does not exist"),
    (dict(mask=""), "is empty; give a PNG"),
    (dict(mask=str(tmp_path / "nomask.png")), "is neither a file nor one of the regions"),
    (dict(mask="center", jump_length=T), "must be smaller than the 10 reverse steps"),
    (dict(mask="center", num_resamplings=0), "must be an integer >= 1"),
    (dict(mask=str(not_an_image)), "is not an image PIL can read"),
    (dict(mask=white), "white everywhere"),
    (dict(image=inputs["folder"], mask=odd_size), "is 7x5 pixels, but the model's images are 8x8"),
    (dict(image=str(empty), mask="center"), "without PNG/JPEG images"),
    (dict(mask="center", num_images=5000), "has 1797 images"),
  ]
  for keys, message in cases:
    with pytest.raises(ConfigError, match=message) as e:
      config = mode_config(**keys)
      validation.validate(config, mode="inpaint")
      inpaint.load_mask(config, inpaint.load_inputs(config).sizes)
    assert "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- conditional models


def test_a_conditional_model_inpaints_with_its_labels_and_guidance(tmp_path, inputs):
  """Sample s of every image has label table[s] of sampling.labels, and the network call is the
  guided one, (1 + w) eps(x, y) - w eps(x, null), here computed by hand with two forwards."""
  config = mode_config(image=inputs["folder"], mask="center", num_samples=2)
  config.model.num_classes = 10
  config.sampling.labels, config.sampling.guidance_scale = "3,7", 2.0
  built = state_lib.build(config)
  params = state_lib.init_state(built.model, built.tx, seed=0, shape=(8, 8, 1)).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(6), len(leaves))
  params = jax.tree.unflatten(
    tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  folder = str(tmp_path / "run")
  state = jax.jit(functools.partial(state_lib.state_from_params, tx=built.tx, seed=0))(params)
  manager = checkpoint.make_manager(folder, keep=1)
  checkpoint.save(manager, state=state, config=config, force=True)
  manager.wait_until_finished()
  checkpoint.write_config(folder, config)

  out = main.run(config, folder, "inpaint")
  assert os.path.basename(out) == f"ckpt_0_n2x2_seed0_ancestral{T}_w2.0_labels3-7_j{JUMP}_r{PASSES}"
  arrays = np.load(os.path.join(out, "inpaint.npz"))
  assert arrays["labels"].tolist() == [3, 7]
  record = json.loads(open(os.path.join(out, "inpaint.json")).read())
  assert record["labels"] == "3-7" and record["guidance_scale"] == 2.0

  w, model = 2.0, built.model
  by_hand = lambda p, x, t, y: (
    (1 + w) * model.apply(p, x, t, y, train=False)
    - w * model.apply(p, x, t, jnp.full_like(y, 10), train=False)
  )
  fn = repaint.make_inpainter(
    by_hand,
    built.diffusion,
    parallel.make_mesh(),
    image_shape=(8, 8, 1),
    jump_length=JUMP,
    num_resamplings=PASSES,
    as_uint8=False,
  )
  ids = np.arange(4, dtype=np.int32)
  x0 = images.to_model_input(arrays["inputs"])[ids // 2]
  keep = np.broadcast_to(repaint.region_mask("center", 8)[None, :, :, None], x0.shape)
  expected = fn(
    params,
    streams.key(0, streams.INPAINT),
    ids,
    x0,
    keep.astype(np.float32),
    np.array([3, 7, 3, 7], np.int32),
  )
  samples = arrays["samples"].reshape((4, 8, 8, 1)).astype(int)
  # the same up to float rounding (one batched forward against two), which may move a pixel by 1
  assert np.abs(samples - images.to_uint8(np.asarray(expected)).astype(int)).max() <= 1
  np.testing.assert_array_equal(samples[keep], arrays["inputs"][ids // 2][keep])
  assert not np.array_equal(samples[0], samples[1])  # labels 3 and 7
