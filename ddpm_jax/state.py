"""What training, sampling and evaluation all need: the train state, the optimizer, and building
the diffusion, model and optimizer from a config (so none of them imports another's loop).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion as dm
from ddpm_jax import parallel
from ddpm_jax import streams
from ddpm_jax.models import unet


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array  # uint32 data of the run's base key (jax.random.key_data), stored as a plain array


def make_optimizer(training_config):
  """Adam after global-norm clipping, with linear warmup from 0 (the official recipe). Returns (tx,
  lr_fn)."""
  c = training_config
  lr_fn = (
    optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    if c.warmup_steps > 0
    else optax.constant_schedule(c.learning_rate)
  )
  tx = optax.chain(
    optax.clip_by_global_norm(c.grad_clip),
    optax.adam(lr_fn, b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps),
  )
  return tx, lr_fn


class Built(NamedTuple):
  """What a config describes: the diffusion, the U-Net, the optimizer and its learning-rate
  schedule."""

  diffusion: dm.Diffusion
  model: unet.UNet
  tx: optax.GradientTransformation
  lr_fn: Any


def build(config) -> Built:
  """The diffusion, model and optimizer a config describes; every setting is checked here, early."""
  d = dm.from_config(config.diffusion)
  model = unet.create_model(
    config.model,
    image_size=config.data.image_size,
    num_channels=config.data.num_channels,
    learned_variance=d.learned_variance,
  )
  tx, lr_fn = make_optimizer(config.training)
  return Built(diffusion=d, model=model, tx=tx, lr_fn=lr_fn)


def image_shape(config):
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def init_state(model, tx, *, seed: int, shape) -> TrainState:
  """Fresh parameters (the official initialisation), EMA equal to them, optimizer state, the base
  key."""
  x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  params = model.init(
    {"params": streams.key(seed, streams.PARAMS)}, x, jnp.zeros((1,), jnp.int32), train=False
  )
  return state_from_params(params, tx, seed=seed)


def state_from_params(params, tx, *, seed: int, step: int = 0) -> TrainState:
  """A train state at `step` holding `params` (EMA equal to them), fresh optimizer state, the base
  key."""
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    key=jax.random.key_data(streams.key(seed, streams.TRAINING)),
  )


def abstract_state(model, tx, *, shape, mesh):
  """Shapes, dtypes and (replicated) shardings of a train state, for restoring without
  initialising."""
  abstract = jax.eval_shape(lambda: init_state(model, tx, seed=0, shape=shape))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
