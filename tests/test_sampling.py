"""Respaced and DDIM sampling, the interpolation mode, and their user errors (REFERENCE.md §6)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from ddpm_jax import diffusion as dm
from ddpm_jax import images
from ddpm_jax import interpolate
from ddpm_jax import parallel
from ddpm_jax import respace
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import samples as samples_eval

# ----------------------------------------------------------------------------- which steps are kept


@pytest.mark.parametrize(
  "T,section_counts,expected",
  [
    # "ddimN": the smallest stride i with len(range(0, T, i)) == N. ceil(1000 / i) = 10 first at
    # i = 100.
    (1000, "ddim10", list(range(0, 1000, 100))),
    # ceil(1000 / i) = 30 needs 33.3 <= i < 34.5: i = 34, so 0, 34, ..., 986 (29 * 34).
    (1000, "ddim30", list(range(0, 987, 34))),
    # One section of 20 steps, 10 kept: stride 19 / 9 = 2.11; round(0, 2.11, 4.22, 6.33, 8.44,
    # 10.56, 12.67, 14.78, 16.89, 19.0) = 0 2 4 6 8 11 13 15 17 19.
    (20, [10], [0, 2, 4, 6, 8, 11, 13, 15, 17, 19]),
    # Two sections of 10: [0..9] keeps 3 at stride 4.5: 0, round(4.5) = 4 (half to even), 9;
    # [10..19] keeps 4 at stride 3: 10, 13, 16, 19.
    (20, [3, 4], [0, 4, 9, 10, 13, 16, 19]),
    (20, "3,4", [0, 4, 9, 10, 13, 16, 19]),
    # 10 steps in 3 sections: the first T mod 3 = 1 section one longer: sizes 4, 3, 3 starting at 0,
    # 4, 7; a count of 1 keeps the section's first step.
    (10, [1, 1, 1], [0, 4, 7]),
    # 11 steps in 2 sections of 6 and 5: stride 5 -> 0, 5; then all of 6..10.
    (11, [2, 5], [0, 5, 6, 7, 8, 9, 10]),
    # stride 999 / 4 = 249.75: 0, 249.75 -> 250, 499.5 -> 500 (even), 749.25 -> 749, 999.
    (1000, [5], [0, 250, 500, 749, 999]),
    (20, [20], list(range(20))),
  ],
)
def test_kept_steps_follow_improved_diffusions_space_timesteps(T, section_counts, expected):
  np.testing.assert_array_equal(respace.space_timesteps(T, section_counts), expected)


@pytest.mark.parametrize(
  "spacing,num_steps,expected",
  [
    ("uniform", 10, [0, 2, 4, 6, 8, 11, 13, 15, 17, 19]),  # = section counts [10]
    ("uniform", -1, list(range(20))),
    ("ddim", 5, [0, 4, 8, 12, 16]),  # ceil(20 / 4) = 5
    ("ddim4", -1, [0, 5, 10, 15]),
    ("leading", 3, [0, 6, 12]),  # diffusers: arange(3) * (20 // 3)
    ("3,4", -1, [0, 4, 9, 10, 13, 16, 19]),
    ("3,4", 7, [0, 4, 9, 10, 13, 16, 19]),
  ],
)
def test_config_spacing_names(spacing, num_steps, expected):
  np.testing.assert_array_equal(
    respace.kept_timesteps(spacing=spacing, num_steps=num_steps, num_timesteps=20), expected
  )


def test_respaced_betas_keep_the_kept_alphas_cumprod():
  """abar'_k = abar[s_k]: in float64 exactly (to rounding), and in the float32 respaced
  Diffusion."""
  betas = dm.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  d = dm.make_diffusion(betas)
  abar64 = np.cumprod(1.0 - betas)
  for kept in (
    respace.space_timesteps(1000, "ddim50"),
    respace.space_timesteps(1000, [7, 0, 3]),
    np.array([0, 1, 2, 500, 998, 999]),
    np.array([999]),
    np.array([3]),
  ):
    np.testing.assert_allclose(
      np.cumprod(1.0 - respace.respaced_betas(abar64, kept)), abar64[kept], rtol=1e-10
    )
    spaced = respace.respace(d, kept)
    assert spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, np.asarray(d.alphas_cumprod)[kept], rtol=2e-6)
    np.testing.assert_allclose(
      spaced.alphas_cumprod_prev[1:], np.asarray(d.alphas_cumprod)[kept[:-1]], rtol=2e-6
    )
    assert spaced.alphas_cumprod_prev[0] == 1.0
  # Every step kept: the schedule itself.
  assert respace.respace(d, np.arange(1000)) is d
  np.testing.assert_allclose(respace.respaced_betas(abar64, np.arange(1000)), betas, rtol=1e-9)


# ------------------------------------------------------------------- samplers on a stand-in network


class StandInModel:
  """A cheap deterministic eps network, written alike in JAX and torch: 0.8 tanh(w x + t / 1000)."""

  def apply(self, params, x, t, train=False):
    del train
    return 0.8 * jnp.tanh(params["w"] * x + (t.astype(jnp.float32) / 1000.0)[:, None, None, None])

  @staticmethod
  def torch(w, x, t):
    return 0.8 * torch.tanh(w * x + t / 1000.0)


SHAPE = (4, 4, 1)


def _stand_in_noise(key, ids, t):
  """The noise the sampler draws for sample `ids` at original timestep t (or x_T at t = T), as
  documented."""
  return np.stack(
    [
      np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, int(i)), t), SHAPE))
      for i in ids
    ]
  )


def _algorithm2_before_respacing(model, d, mesh, params, key, ids, *, shape):
  """The sampler as it was before respacing existed (float output), the reference for
  bit-identity."""
  T = d.num_timesteps

  def per_device(params, key, ids):
    sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
    draw = lambda t: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(
      sample_keys
    )

    def body(i, x):
      t_scalar = T - 1 - i
      t = jnp.full((ids.shape[0],), t_scalar, jnp.int32)
      out = model.apply(params, x, t, train=False)
      return dm.p_sample(d, out, x, t, noise=draw(t_scalar), clip_denoised=True)[0]

    return jax.lax.fori_loop(0, T, body, draw(T))

  fn = parallel.data_parallel(
    per_device,
    mesh,
    in_specs=(jax.sharding.PartitionSpec(),) * 2 + (jax.sharding.PartitionSpec(parallel.AXIS),),
    out_specs=jax.sharding.PartitionSpec(parallel.AXIS),
  )
  return np.asarray(fn(params, key, ids))


def test_all_steps_kept_is_algorithm_2_bit_for_bit():
  config = tiny_config()
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  params = state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config)).ema_params
  ids, key = sampling.sample_ids(0, 4, mesh), jax.random.key(5)
  reference = _algorithm2_before_respacing(
    model, d, mesh, params, key, ids, shape=state_lib.image_shape(config)
  )
  options = sampling.sampler_options(config.sampling, d.num_timesteps)  # defaults: ancestral, all T
  for extra in (options, {}):
    fn = sampling.make_sampler(
      model, d, mesh, image_shape=state_lib.image_shape(config), as_uint8=False, **extra
    )
    np.testing.assert_array_equal(np.asarray(fn(params, key, ids)), reference)


def _respaced_by_hand(d, kept, params, key, ids, *, method, eta=0.0):
  """Python loop over the kept steps, betas respaced here from the formula, noise keyed by original
  t."""
  abar = np.cumprod(1.0 - np.asarray(d.betas, np.float64))[kept]
  spaced = dm.make_diffusion(1.0 - abar / np.append(1.0, abar[:-1]))
  x = jnp.asarray(_stand_in_noise(key, ids, d.num_timesteps))
  for k in reversed(range(len(kept))):
    out = StandInModel().apply(params, x, jnp.full((len(ids),), kept[k]))
    noise = jnp.asarray(_stand_in_noise(key, ids, kept[k]))
    k_batch = jnp.full((len(ids),), k)
    if method == "ancestral":
      x, _ = dm.p_sample(spaced, out, x, k_batch, noise=noise)
    else:
      x, _ = dm.ddim_sample(spaced, out, x, k_batch, eta=eta, noise=noise)
  return np.asarray(x)


@pytest.mark.parametrize("method,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_respaced_sampler_sees_original_timesteps_and_their_noise(method, eta):
  d = dm.from_config(tiny_config(diffusion__num_timesteps=50).diffusion)
  mesh = parallel.make_mesh()
  params, key, ids = {"w": jnp.float32(1.3)}, jax.random.key(2), np.arange(3, 7)
  kept = respace.space_timesteps(50, [3, 4])
  fn = sampling.make_sampler(
    StandInModel(),
    d,
    mesh,
    image_shape=SHAPE,
    method=method,
    timesteps=kept,
    eta=eta,
    as_uint8=False,
  )
  got = np.asarray(fn(params, key, sampling.sample_ids(3, 4, mesh)))
  np.testing.assert_allclose(
    got, _respaced_by_hand(d, kept, params, key, ids, method=method, eta=eta), atol=2e-5
  )


# --------------------------------------------------------------------------- DDIM against diffusers

_ddim_step = jax.jit(dm.ddim_sample, static_argnames=("eta", "clip_denoised"))


def _diffusers_ddim(d, num_steps, **kwargs):
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top

  scheduler = DDIMScheduler(
    num_train_timesteps=d.num_timesteps,
    trained_betas=np.asarray(d.betas),
    set_alpha_to_one=True,
    **kwargs,
  )
  scheduler.set_timesteps(num_steps)
  # The same float32 alphas_cumprod as ours (diffusers' own is a float32 cumprod, ~1e-5 off after
  # 1000 steps).
  scheduler.alphas_cumprod = torch.tensor(np.asarray(d.alphas_cumprod))
  return scheduler


@pytest.mark.parametrize("num_steps,steps_offset", [(10, 0), (50, 0), (7, 0), (10, 1), (1, 0)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers(num_steps, steps_offset, eta, clip):
  """Each step of a DDIM chain on diffusers' "leading" timesteps, same model output and noise."""
  d = dm.from_config(
    tiny_config(
      diffusion__num_timesteps=1000, diffusion__beta_start=1e-4, diffusion__beta_end=0.02
    ).diffusion
  )
  scheduler = _diffusers_ddim(d, num_steps, clip_sample=clip, steps_offset=steps_offset)
  kept = respace.leading_timesteps(1000, num_steps) + steps_offset
  np.testing.assert_array_equal(scheduler.timesteps.numpy(), kept[::-1])
  spaced = respace.respace(d, kept)
  rng = np.random.default_rng(num_steps)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  for k in reversed(range(num_steps)):
    eps = (0.9 * rng.standard_normal(x.shape) + 0.3 * x).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    ours, _ = _ddim_step(
      spaced,
      jnp.asarray(eps),
      jnp.asarray(x),
      jnp.full((2,), k),
      eta=eta,
      noise=jnp.asarray(z),
      clip_denoised=clip,
    )
    theirs = scheduler.step(
      torch.from_numpy(eps),
      int(kept[k]),
      torch.from_numpy(x),
      eta=eta,
      use_clipped_model_output=True,
      variance_noise=torch.from_numpy(z),
    ).prev_sample.numpy()
    np.testing.assert_allclose(
      np.asarray(ours), theirs, rtol=1e-5, atol=1e-5, err_msg=f"step {k} t {kept[k]}"
    )
    x = theirs


def test_ddim_x0_prediction_matches_diffusers_sample_prediction():
  d = dm.make_diffusion(
    dm.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    mean_type="xstart",
  )
  scheduler = _diffusers_ddim(d, 20, clip_sample=True, prediction_type="sample")
  kept = respace.leading_timesteps(1000, 20)
  spaced = respace.respace(d, kept)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  for k in reversed(range(20)):
    x0 = (1.2 * rng.standard_normal(x.shape)).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    ours, _ = _ddim_step(
      spaced, jnp.asarray(x0), jnp.asarray(x), jnp.full((2,), k), eta=0.5, noise=jnp.asarray(z)
    )
    theirs = scheduler.step(
      torch.from_numpy(x0),
      int(kept[k]),
      torch.from_numpy(x),
      eta=0.5,
      use_clipped_model_output=True,
      variance_noise=torch.from_numpy(z),
    ).prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)
    x = theirs


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_loop_matches_a_diffusers_loop(eta):
  """The whole compiled DDIM loop (stand-in network) against diffusers' loop fed the sampler's x_T
  and noise."""
  d = dm.make_diffusion(
    dm.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
  )
  mesh = parallel.make_mesh()
  params, key, ids = {"w": jnp.float32(0.7)}, jax.random.key(9), np.arange(4)
  kept = respace.kept_timesteps(spacing="leading", num_steps=25, num_timesteps=1000)
  fn = sampling.make_sampler(
    StandInModel(),
    d,
    mesh,
    image_shape=SHAPE,
    method="ddim",
    timesteps=kept,
    eta=eta,
    as_uint8=False,
  )
  got = np.asarray(fn(params, key, sampling.sample_ids(0, 4, mesh)))
  scheduler = _diffusers_ddim(d, 25)
  x = torch.from_numpy(_stand_in_noise(key, ids, 1000))
  for t in scheduler.timesteps:
    eps = StandInModel.torch(0.7, x, t.float())
    x = scheduler.step(
      eps,
      int(t),
      x,
      eta=eta,
      use_clipped_model_output=True,
      variance_noise=torch.from_numpy(_stand_in_noise(key, ids, int(t))),
    ).prev_sample
  np.testing.assert_allclose(got, x.numpy(), atol=1e-4)


def test_ddim_with_eta_0_is_deterministic_given_x_T():
  d = dm.from_config(tiny_config().diffusion)
  mesh = parallel.make_mesh()
  params, ids = {"w": jnp.float32(1.1)}, sampling.sample_ids(0, 4, mesh)
  make = lambda eta: sampling.make_sampler(
    StandInModel(),
    d,
    mesh,
    image_shape=SHAPE,
    method="ddim",
    eta=eta,
    timesteps=[0, 3, 6, 9],
    as_uint8=False,
  )
  deterministic, noisy = make(0.0), make(1.0)
  a = np.asarray(deterministic(params, jax.random.key(0), ids))
  np.testing.assert_array_equal(a, np.asarray(deterministic(params, jax.random.key(0), ids)))
  assert not np.allclose(
    a, np.asarray(noisy(params, jax.random.key(0), ids)), atol=1e-3
  )  # eta = 1 adds noise
  assert not np.allclose(
    a, np.asarray(deterministic(params, jax.random.key(1), ids)), atol=1e-3
  )  # other x_T


def test_respaced_progressive_records_end_at_the_sample():
  d = dm.from_config(tiny_config(diffusion__num_timesteps=20).diffusion)
  mesh = parallel.make_mesh()
  kept = [0, 4, 9, 10, 13, 16, 19]
  # record_every = 5: a record after the step from t when (next kept step, t] holds a multiple of 5
  # -- from 16 (15), 10 (10), 9 (5) -- and after the last step, from 0.
  np.testing.assert_array_equal(
    kept_t := np.asarray(kept)[sampling.record_steps(kept, 5)], [16, 10, 9, 0]
  )
  np.testing.assert_array_equal(
    np.arange(20)[sampling.record_steps(np.arange(20), 5)], sampling.record_timesteps(20, 5)
  )
  for method in ("ancestral", "ddim"):
    fn = sampling.make_sampler(
      StandInModel(), d, mesh, image_shape=SHAPE, method=method, timesteps=kept, record_every=5
    )
    ids = sampling.sample_ids(0, 4, mesh)
    samples, chain = fn({"w": jnp.float32(1.0)}, jax.random.key(0), ids)
    np.testing.assert_array_equal(chain.timesteps, kept_t)
    assert chain.x.shape == (4, 4) + SHAPE
    np.testing.assert_array_equal(chain.x[-1], samples)


# ----------------------------------------------------------------------------- interpolation


def _reconstructions_by_hand(model, d, params, key, sources, which, t):
  """Diffuse each source (pair p = row p) to timestep t with its pair's noise and decode it alone,
  step by step from Python with the documented noise keys; uint8."""
  q_key, p_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  noise = lambda base, i: jnp.stack(
    [
      jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, p), i), sources.shape[1:])
      for p in range(len(sources))
    ]
  )
  step = jax.jit(
    lambda x, s, z: dm.p_sample(d, model.apply(params, x, s, train=False), x, s, noise=z)[0]
  )
  x = dm.q_sample(
    d, images.to_model_input(sources), jnp.full((len(sources),), t), noise(q_key, which)
  )
  for s in range(t, -1, -1):
    x = step(x, jnp.full((len(sources),), s), noise(p_key, s))
  return np.asarray(images.to_uint8(x))


def test_interpolation_ends_are_the_reconstructions_and_noise_is_fixed_across_lambda():
  config = tiny_config()
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  params = state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config)).ema_params
  fn = interpolate.make_interpolator(model, d, mesh, image_shape=state_lib.image_shape(config))
  rng = np.random.default_rng(0)
  s1, s2 = (rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8) for _ in range(2))
  key = jax.random.key(3)
  run = lambda lambdas, timesteps: interpolate.interpolations(
    fn,
    params,
    key=key,
    sources1=s1,
    sources2=s2,
    lambdas=lambdas,
    timesteps=timesteps,
    batch_size=4,
    mesh=mesh,
  )
  out = run([0.0, 0.5, 1.0], [4, 10])  # 1-based t: timesteps 3 and 9; 6 rows in two batches of 4
  assert out.shape == (2, 2, 3, 8, 8, 1) and out.dtype == np.uint8
  for i, t in enumerate((4, 10)):
    for column, sources, which in ((0, s1, 1), (2, s2, 2)):
      by_hand = _reconstructions_by_hand(model, d, params, key, sources, which, t - 1)
      np.testing.assert_allclose(out[i, :, column].astype(int), by_hand.astype(int), atol=1)
  assert np.abs(out[1, :, 1].astype(int) - out[1, :, 0]).mean() > 5  # lambda = 0.5 is neither end
  # A lambda's column does not depend on which other lambdas share its batch (same compiled shape: 4
  # rows).
  np.testing.assert_array_equal(run([0.25, 0.5], [10])[0, :, 1], out[1, :, 1])


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("method", "plms", "config.sampling.method = 'plms'"),
    ("eta", -0.5, "config.sampling.eta = -0.5"),
    ("eta", 0.5, "applies only to method 'ddim'"),
    ("num_steps", 0, "config.sampling.num_steps = 0"),
    ("num_steps", 11, "config.sampling.num_steps = 11"),
    ("num_steps", -2, "config.sampling.num_steps = -2"),
    ("spacing", "linear", "config.sampling.spacing = 'linear'"),
    ("spacing", "ddim6x", "ddim6x"),
    ("spacing", "ddim8", "no integer stride keeps exactly 8"),  # ceil(10 / i) is 10, 5, 4, ...
    ("spacing", "3,6", "fewer than the 6 asked for"),  # two sections of 5
    ("spacing", "2,2", "config.sampling.num_steps = 5"),  # keeps 4
  ],
)
def test_sampling_config_errors_name_key_and_value(key, value, message):
  config = tiny_config(sampling__num_steps=5)
  config.sampling[key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    sampling.sampler_options(config.sampling, 10)


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("timesteps", (0, 5), "t = 0, outside [1, T = 10]"),
    ("timesteps", (11,), "t = 11, outside [1, T = 10]"),
    ("timesteps", (), "timesteps is empty"),
    ("lambdas", (0.0, 1.5), "lambdas"),
    ("image1", "some.png", "image1 and image2 must be given together"),
    ("figure9_pair", 8, "figure9_pair = 8"),
    ("num_pairs", 0, "num_pairs = 0"),
  ],
)
def test_interpolation_config_errors(key, value, message):
  config = tiny_config(interpolation__timesteps=(5, 10))
  config.interpolation[key] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
    validation.validate(config, mode="interpolate")


def test_more_pairs_than_the_split_holds_is_an_error():
  config = tiny_config(interpolation__num_pairs=900)  # digits: 1,797 images
  with pytest.raises(ConfigError, match="num_pairs = 900 needs 1800 images"):
    interpolate.load_sources(config)


# ----------------------------------------------------------------------------- the command line


TINY = config_flags(tiny_config(), "data", "model", "diffusion", "training", "sampling")


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny_run")
  result = run_cli("--config=configs/digits.py", f"--workdir={workdir}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_cli_samples_with_ddim_in_5_steps(trained_tiny):
  result = run_cli(
    "--config=configs/digits.py",
    f"--workdir={trained_tiny}",
    "--mode=sample",
    *TINY,
    "--config.sampling.method=ddim",
    "--config.sampling.num_steps=5",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = trained_tiny / "samples" / "ckpt_4_n6_seed0_ddim5_eta0.0_spacinguniform"
  arr = np.load(out / "samples.npz")["arr_0"]
  assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
  # Kept: round(0, 2.25, 4.5, 6.75, 9) = 0 2 4 7 9; records after the steps passing a multiple of 3,
  # and the last.
  assert (out / "chain_timesteps.txt").read_text().split() == ["9", "7", "4", "0"]
  # A bad value stops the mode before anything is written.
  config = tiny_config(sampling__num_steps=11)
  with pytest.raises(ConfigError, match="config.sampling.num_steps = 11"):
    samples_eval.dump_samples(config, str(trained_tiny))
  assert sorted(os.listdir(trained_tiny / "samples")) == [out.name, "step_4.png"]
  assert json.loads((out / "sampler.json").read_text()) == dict(
    method="ddim", num_steps=5, spacing="uniform", eta=0.0, step=4, num_samples=6, seed=0
  )


def test_cli_interpolate_writes_the_pictures_and_arrays_beside_earlier_ones(trained_tiny):
  earlier = trained_tiny / "interpolations" / "ckpt_4_seed0_ancestral10"
  earlier.mkdir(parents=True)
  (earlier / "interpolations.npz").write_bytes(b"earlier result")
  result = run_cli(
    "--config=configs/digits.py",
    f"--workdir={trained_tiny}",
    "--mode=interpolate",
    *TINY,
    "--config.interpolation.timesteps=(5,10)",
    "--config.interpolation.num_pairs=2",
    "--config.interpolation.lambdas=(0.0,0.5,1.0)",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (earlier / "interpolations.npz").read_bytes() == b"earlier result"
  out = trained_tiny / "interpolations" / "ckpt_4_seed0_ancestral10_1"
  arrays = np.load(out / "interpolations.npz")
  assert arrays["images"].shape == (2, 2, 3, 8, 8, 1)
  np.testing.assert_array_equal(arrays["timesteps"], [5, 10])
  for name in ("t5.png", "t10.png", "coarse_to_fine.png"):
    Image.open(out / name).verify()
  config = tiny_config(interpolation__timesteps=(0, 5))
  with pytest.raises(ConfigError, match="t = 0, outside"):
    interpolate.run(config, str(trained_tiny))
  assert sorted(os.listdir(trained_tiny / "interpolations")) == [earlier.name, out.name]


def test_respacing_an_xprev_model_is_refused_in_one_sentence():
  """A model that predicts x_(t-1) predicts it for the original step t - 1: a respaced step from t
  goes elsewhere, so such samples would be silently wrong (improved-diffusion respaces eps and x0
  models only). All T steps stay allowed."""
  config = tiny_config(diffusion__mean_type="xprev", sampling__num_steps=5)
  with pytest.raises(
    ConfigError, match="mean_type = 'xprev' predicts x_\\(t-1\\) for the original"
  ):
    validation.validate(config, mode="sample")
  built = state_lib.build(config)
  with pytest.raises(ConfigError, match="mean_type = 'xprev'"):
    sampling.make_sampler(
      built.model,
      built.diffusion,
      parallel.make_mesh(),
      image_shape=(8, 8, 1),
      timesteps=respace.kept_timesteps(spacing="uniform", num_steps=5, num_timesteps=10),
    )
  config.sampling.num_steps = -1
  validation.validate(config, mode="sample")
  config.sampling.method = "ddim"  # DDIM over every step reads x0 off the same original steps
  validation.validate(config, mode="sample")


def test_interpolation_decodes_with_the_configured_ddim_sampler_over_the_kept_steps_below_t():
  """method = ddim, 5 of T = 10 steps (kept 0 2 4 7 9): from t = 8 (0-indexed 7) the decoder takes
  the kept steps below it and t itself, 7 4 2 0, with DDIM's deterministic update; checked against
  the update written out here from the DDIM paper's formulas (eta = 0)."""
  config = tiny_config()
  built = state_lib.build(config)
  d, model, mesh = built.diffusion, built.model, parallel.make_mesh()
  params = state_lib.init_state(model, built.tx, seed=1, shape=(8, 8, 1)).ema_params
  kept = respace.kept_timesteps(spacing="uniform", num_steps=5, num_timesteps=10)
  np.testing.assert_array_equal(interpolate.decoding_steps(kept, 7), [0, 2, 4, 7])
  fn = interpolate.make_interpolator(
    model, d, mesh, image_shape=(8, 8, 1), method="ddim", timesteps=kept, eta=0.0
  )
  rng = np.random.default_rng(0)
  s1, s2 = (rng.integers(0, 256, (1, 8, 8, 1), dtype=np.uint8) for _ in range(2))
  key = jax.random.key(3)
  out = interpolate.interpolations(
    fn,
    params,
    key=key,
    sources1=s1,
    sources2=s2,
    lambdas=[0.0],
    timesteps=[8],
    batch_size=1,
    mesh=mesh,
  )
  # By hand: x_7 of source 1 with its pair's noise, then DDIM over 7 -> 4 -> 2 -> 0 -> x_0.
  abar = np.cumprod(1.0 - np.asarray(d.betas, np.float64))
  q_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(q_key, 1), (8, 8, 1)), np.float64)
  x = (
    np.sqrt(abar[7]) * images.to_model_input(s1[0]).astype(np.float64)
    + np.sqrt(1 - abar[7]) * noise
  )
  steps = [7, 4, 2, 0]
  for t, s in zip(steps, steps[1:] + [None]):
    eps = np.asarray(
      model.apply(params, jnp.asarray(x[None], jnp.float32), jnp.array([t]), train=False)
    )[0]
    x0 = np.clip((x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
    eps = (x - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
    abar_s = 1.0 if s is None else abar[s]
    x = np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s) * eps
  expected = np.asarray(images.to_uint8(np.asarray(x, np.float32)))
  np.testing.assert_allclose(out[0, 0, 0].astype(int), expected.astype(int), atol=1)
  # The default (ancestral, every step) decodes something else from the same x_t.
  ancestral = interpolate.interpolations(
    interpolate.make_interpolator(model, d, mesh, image_shape=(8, 8, 1)),
    params,
    key=key,
    sources1=s1,
    sources2=s2,
    lambdas=[0.0],
    timesteps=[8],
    batch_size=1,
    mesh=mesh,
  )
  assert np.abs(ancestral.astype(int) - out.astype(int)).max() > 5


def test_the_sampler_reports_its_steps_within_a_batch_and_the_bar_moves_with_them():
  config = tiny_config()
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  params = state_lib.init_state(built.model, built.tx, seed=0, shape=(8, 8, 1)).ema_params
  calls = []
  fn = sampling.from_config(
    config, built, mesh, on_step=lambda done, n: calls.append((int(done), int(n)))
  )
  jax.block_until_ready(fn(params, jax.random.key(0), sampling.sample_ids(0, 2, mesh)))
  jax.effects_barrier()
  assert sorted(calls) == [(i, 10) for i in range(1, 11)]
  progress = sampling.Progress(8)
  progress.begin(4, 4)  # the second batch of 4
  progress.on_step(5, 10)
  assert progress._bar.n == 6  # pylint: disable=protected-access
  progress.end(8)


def test_a_few_samples_are_drawn_in_a_batch_of_their_own_size(trained_tiny, monkeypatch):
  """--mode=sample with num_samples = 2 and the default batch of 256 computes 2, not 256."""
  sizes = []
  real = sampling.generate
  monkeypatch.setattr(
    sampling, "generate", lambda *a, **k: sizes.append(k["batch_size"]) or real(*a, **k)
  )
  config = tiny_config(sampling__num_samples=2, sampling__batch_size=256)
  samples_eval.dump_samples(config, str(trained_tiny))
  assert sizes == [parallel.round_up_to_devices(2)]
