"""CIFAR10, 32x32: the paper's 35.7M-parameter model, eps / fixedlarge / L_simple, 800k steps."""

from ddpm_jax.configs import default


def get_config():
  return default.get_config()
