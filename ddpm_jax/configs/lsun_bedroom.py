"""LSUN bedroom (no flip, as in the paper), 2.4M steps; the 114M 256x256 model, eps / fixedsmall /
L_simple, lr 2e-5, batch 64."""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "lsun/bedroom"
  default.set_256_model(config)
  config.data.random_flip = False
  config.training.num_steps = 2_400_000
  return config
