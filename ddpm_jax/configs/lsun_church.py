"""LSUN church, 1.2M steps; the 114M 256x256 model, eps / fixedsmall / L_simple, lr 2e-5, batch
64."""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "lsun/church_outdoor"
  default.set_256_model(config)
  config.data.random_flip = True
  config.training.num_steps = 1_200_000
  return config
