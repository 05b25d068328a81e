"""config.training.init_from: a run starts from a workdir's, a diffusers directory's or an
official TF checkpoint's weights (params = EMA = the source's at step 0), a conditional model from
an unconditional one, weights that do not fit are refused in one sentence, and the source is read
only once."""

import functools
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from test_convert import TINY_UNET
from test_convert import official_variables
from test_convert import random_unet
from test_convert import torch_eps
from test_convert import training_checkpoint
from test_convert import write_tf_checkpoint

from conftest import tiny_config
from ddpm_jax import checkpoint
from ddpm_jax import finetune
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import train
from ddpm_jax.errors import ConfigError


def finetune_config(src, **overrides):
  config = tiny_config(**overrides)
  config.training.init_from = str(src)
  config.training.num_steps = 0  # train() returns the step-0 state without a step
  config.seed = 3
  return config


def eps(config, params, x, t):
  model = state_lib.build(config).model
  return np.asarray(jax.jit(lambda p: model.apply(p, x, t, train=False))(params))


def inputs():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  return x, np.array([0, 9], np.int32)


def assert_fresh_start(state, config):
  """Step 0, EMA == params, zero Adam moments, the key of the run's own seed."""
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
  adam = state.opt_state[1][0]
  assert int(adam.count) == 0
  assert all(not np.asarray(m).any() for m in jax.tree.leaves((adam.mu, adam.nu)))
  expected_key = state_lib.state_from_params({}, state_lib.build(config).tx, seed=config.seed).key
  np.testing.assert_array_equal(state.key, expected_key)


@pytest.fixture(scope="module")
def source_workdir(tmp_path_factory):
  """A workdir of this project whose checkpoint holds distinct params and EMA params (seed 1)."""
  config = tiny_config()
  built = state_lib.build(config)
  state = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=1, shape=(8, 8, 1))
  )()
  noise = lambda p: p + 0.01 * jax.random.normal(jax.random.key(2), p.shape)
  state = state._replace(ema_params=jax.tree.map(noise, state.params), step=np.int32(7))
  folder = str(tmp_path_factory.mktemp("source_run"))
  manager = checkpoint.make_manager(folder, keep=1)
  checkpoint.save(manager, state=state, config=config, force=True)
  manager.wait_until_finished()
  checkpoint.write_config(folder, config)
  return folder, jax.device_get(state.ema_params)


def test_a_workdir_gives_its_ema_weights_at_step_0(tmp_path, source_workdir, caplog):
  src, ema = source_workdir
  config = finetune_config(src)
  with caplog.at_level(logging.INFO, logger="absl"):
    state = train.train(config, str(tmp_path / "run"))
  assert_fresh_start(state, config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ema)
  said = [r.getMessage() for r in caplog.records if "Fine-tuning from" in r.getMessage()]
  assert len(said) == 1 and f"the EMA weights of step 7 of the run in {src}" in said[0], said


def test_a_diffusers_directory_gives_its_outputs_at_step_0(tmp_path):
  with torch.no_grad():
    reference = random_unet(21, **TINY_UNET)
    reference.save_pretrained(tmp_path / "hub_model", safe_serialization=True)
    config = finetune_config(tmp_path / "hub_model")
    state = train.train(config, str(tmp_path / "run"))
    assert_fresh_start(state, config)
    x, t = inputs()
    error = float(np.abs(eps(config, state.params, x, t) - torch_eps(reference, x, t)).max())
  assert error <= 1e-4, error


def test_a_tf_checkpoint_gives_its_ema_outputs_at_step_0(tmp_path):
  with torch.no_grad():
    ema_model, raw_model = random_unet(31, **TINY_UNET), random_unet(32, **TINY_UNET)
    variables = training_checkpoint(
      official_variables(ema_model, num_levels=2), official_variables(raw_model, num_levels=2)
    )
    prefix = write_tf_checkpoint(tmp_path / "release" / "model.ckpt-500", variables)
    config = finetune_config(prefix)
    state = train.train(config, str(tmp_path / "run"))
    assert_fresh_start(state, config)
    x, t = inputs()
    error = float(np.abs(eps(config, state.params, x, t) - torch_eps(ema_model, x, t)).max())
  assert error <= 1e-4, error
  # a conditional config fits the (unconditional) checkpoint with its class embedding at zero
  conditional = finetune_config(prefix, model__num_classes=10)
  mesh = parallel.make_mesh()
  fitted = finetune.fit_params(
    finetune.read_source(prefix, mesh=mesh),
    finetune.expected_params(conditional, state_lib.build(conditional), mesh=mesh),
    num_levels=2,
    zero_if_missing=finetune.ZERO_IF_MISSING,
  )
  assert fitted.zeroed == (("class_embed", "embedding"),)


def test_weights_that_do_not_fit_are_one_sentence_naming_the_tensors(tmp_path, source_workdir):
  src, _ = source_workdir
  cases = [
    (
      finetune_config(src, model__ch=64),
      "the first that disagree are 'conv_in/bias' (32) and the config's conv_in/bias (64)",
    ),
    (finetune_config(src, model__num_res_blocks=2), "has no 'down_0_block_1/conv1/bias'"),
    (
      finetune_config(src, model__attn_resolutions=()),
      "have no place in it, the first 'down_1_attn_0",
    ),
    (finetune_config(tmp_path / "nothing"), "is neither a workdir of this project"),
    (finetune_config(str(tmp_path / "run") + "/"), "is this run's own --workdir"),
  ]
  for config, message in cases:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
      train.train(config, str(tmp_path / "run"))
    assert "\n" not in str(e.value)


def test_a_conditional_model_starts_from_an_unconditional_one(tmp_path, source_workdir, caplog):
  """The class embedding the source lacks starts at zero (said in the log): at step 0 the model
  gives the source's outputs for every label and the null label."""
  src, ema = source_workdir
  config = finetune_config(src, model__num_classes=10)
  with caplog.at_level(logging.INFO, logger="absl"):
    state = train.train(config, str(tmp_path / "run"))
  assert_fresh_start(state, config)
  params = jax.device_get(state.params)
  assert params["params"]["class_embed"]["embedding"].shape == (11, 128)
  assert not params["params"]["class_embed"]["embedding"].any()
  del params["params"]["class_embed"]
  jax.tree.map(np.testing.assert_array_equal, params, ema)
  said = [r.getMessage() for r in caplog.records if "Fine-tuning from" in r.getMessage()]
  assert len(said) == 1 and "the class embedding starts at zero" in said[0], said
  x, t = inputs()
  model = state_lib.build(config).model
  for y in (None, np.array([0, 9], np.int32)):
    ours = jax.jit(lambda p, y=y: model.apply(p, x, t, y, train=False))(state.params)
    np.testing.assert_allclose(ours, eps(tiny_config(), ema, x, t), atol=1e-6)


def test_a_resumed_finetuning_run_does_not_read_its_source_again(tmp_path, source_workdir):
  src, _ = source_workdir
  copy = str(tmp_path / "source_copy")
  shutil.copytree(src, copy)
  config = finetune_config(copy)
  config.training.num_steps = config.training.checkpoint_every = 1
  config.training.num_grid_samples = 0  # no sample grids: only the checkpoints matter here
  first = train.train(config, str(tmp_path / "run"))
  shutil.rmtree(copy)  # gone: a resume that read it would fail
  config.training.num_steps = 2
  resumed = train.train(config, str(tmp_path / "run"))
  assert int(first.step) == 1 and int(resumed.step) == 2
  assert checkpoint.checkpoint_steps(str(tmp_path / "run")) == [1, 2]
