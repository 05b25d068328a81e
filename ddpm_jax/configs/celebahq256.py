"""CelebA-HQ 256x256: the 114M model, eps / fixedsmall / L_simple, lr 2e-5, batch 64, 0.5M steps."""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "celeb_a_hq"
  config.data.image_size = 256
  default.set_256_model(config)
  config.training.num_steps = 500_000
  config.evaluation.num_fid_reference = 0  # all 30,000 images
  return config
