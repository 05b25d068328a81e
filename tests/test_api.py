"""The library API a notebook uses: no global side effects, no absl flags, quiet and URL-friendly
I/O."""

import json
import logging
import os
import subprocess
import sys

from conftest import REPO
from ddpm_jax import checkpoint
from ddpm_jax import sampling
from ddpm_jax.configs import digits

# Run in a fresh interpreter: the libraries ddpm_jax builds on are imported first (JAX, Grain, orbax
# and TensorFlow define absl flags, and JAX and TensorFlow set environment variables of their own);
# then everything ddpm_jax adds is measured, on import and after training and sampling through the
# Python entry points.
_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import conftest
from absl import flags
import flax, grain, jax, ml_collections, optax, orbax.checkpoint, tqdm
import tensorflow, flax.metrics.tensorboard  # imported by the TensorBoard writer of process 0
flags_before, env_before = set(flags.FLAGS), dict(os.environ)

def changes():
  env = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
  return dict(new_flags=sorted(set(flags.FLAGS) - flags_before), env=env,
              env_removed=sorted(set(env_before) - set(os.environ)), parsed=flags.FLAGS.is_parsed())

from ddpm_jax import checkpoint, data, diffusion, images, parallel, sampling, state, train
from ddpm_jax.evaluation import samples
from ddpm_jax.configs import digits
on_import = changes()
config = conftest.tiny_config(training__num_steps=2, training__num_grid_samples=2, sampling__progressive_every=0)
final = train.train(config, sys.argv[2])
folder = samples.dump_samples(config, sys.argv[2])
print(json.dumps(dict(on_import=on_import, after_run=changes(), step=int(final.step), folder=folder)))
"""  # noqa: E501 (the child's source, kept as written)


def test_entry_points_run_without_flags_and_change_no_global_state(tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", _SCRIPT, REPO, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  nothing = dict(new_flags=[], env={}, env_removed=[], parsed=False)
  assert report["on_import"] == nothing
  assert report["after_run"] == nothing
  assert report["step"] == 2
  # progressive_every = 0: about ten frames, here every step of T = 10.
  with open(os.path.join(report["folder"], "chain_timesteps.txt")) as f:
    assert f.read().split() == [str(t) for t in range(9, -1, -1)]


def test_progressive_picture_of_the_digits_config_has_ten_frames():
  c = digits.get_config()
  every = sampling.record_interval(c.diffusion.num_timesteps, c.sampling.progressive_every)
  assert list(sampling.record_timesteps(c.diffusion.num_timesteps, every)) == list(
    range(180, -1, -20)
  )
  assert sampling.record_interval(1000, 0) == 100 and sampling.record_interval(5, 0) == 1
  assert sampling.record_interval(200, 50) == 50


def test_a_read_only_manager_logs_no_warnings(tmp_path, caplog):
  checkpoint.make_manager(str(tmp_path), keep=2)  # creates WORKDIR/checkpoints
  with caplog.at_level(logging.INFO):
    manager = checkpoint.make_manager(str(tmp_path), keep=2, read_only=True)
  assert manager.all_steps() == []
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
    r.getMessage() for r in caplog.records
  ]
