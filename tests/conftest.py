"""Shared test set-up: CPU only, a persistent compilation cache, tiny configs, and a CLI runner."""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled programs are reused across tests and subprocesses (same HLO -> same executable).
CACHE_DIR = os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddpm_jax_test_compile_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def tiny_config(**overrides):
  """The digits config shrunk for tests: 8x8 images, a 2-level 32-channel U-Net, T = 10."""
  from ddpm_jax.configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config()
  config.data.image_size = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 10
  config.diffusion.beta_start = 0.01
  config.diffusion.beta_end = 0.5
  config.training.batch_size = 8
  config.training.num_steps = 4
  config.training.warmup_steps = 2
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.keep_checkpoints = 10
  config.training.num_grid_samples = 4
  config.sampling.batch_size = 4
  config.sampling.num_samples = 6
  config.sampling.progressive_every = 3
  config.sampling.num_progressive = 2
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def config_flags(config, *sections):
  """--config.a.b=value flags that turn configs/digits.py into `config` (for CLI runs)."""
  flags = []
  for section in sections:
    for key, value in config[section].items():
      if isinstance(value, tuple):
        value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
      flags.append(f"--config.{section}.{key}={value}")
  return flags


def run_cli(*args, env=None, timeout=600, **kwargs):
  """Runs `python -m ddpm_jax.main ARGS` in the repository root; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.main", *args],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


@pytest.fixture
def tiny():
  return tiny_config
