"""The main job of README.md ("The main job: what to expect"): a 1.1M-parameter U-Net on the
built-in offline dataset (scikit-learn's 1,797 handwritten digits, upscaled to 16x16, one channel),
3,000 steps of batch 32 (about four minutes on a 2-core CPU), then a grid of 100 samples from the
EMA weights.

The paper's recipe (eps prediction, fixed large variances, L_simple, Adam with warmup and clipping,
an EMA of the weights) on a smaller network and a shorter, steeper schedule (T = 200). How it was
tuned, with bench/digits_quality.py: bench/README.md "Summary".
"""

from ddpm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 16
  config.data.num_channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)  # 16, 8, 4: the 4x4 level shapes whole digits
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0  # no dropout: a short run does not overfit, and each step is cheaper
  # The paper's linear schedule stretched to T = 200 (betas x 5): the same abar_T, 5x faster
  # sampling.
  config.diffusion.num_timesteps = 200
  config.diffusion.beta_start = 5e-4
  config.diffusion.beta_end = 0.1
  config.training.batch_size = 32
  config.training.num_steps = 3000
  config.training.learning_rate = 1e-3
  config.training.warmup_steps = 100
  config.training.ema_decay = 0.999
  config.training.log_every = 100
  config.training.sample_every = 0  # no grid during training; one at the end
  config.training.num_grid_samples = 100
  config.training.checkpoint_every = 1000
  config.sampling.batch_size = 100
  config.sampling.num_samples = 100
  config.interpolation.timesteps = (
    50,
    100,
    150,
    200,
  )  # the paper's 250 .. 1000 of T = 1000, at T = 200
  config.evaluation.split = "train"
  config.evaluation.batch_size = 100
  config.evaluation.num_examples = 500
  config.evaluation.num_fid_samples = 1000
  config.evaluation.sample_chunk_size = 500
  config.evaluation.fid_reference_splits = (
    "train",
  )  # the digits' train and test splits are the same images
  return config
