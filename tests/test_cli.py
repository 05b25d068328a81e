"""`python -m ddpm_jax.main` end to end: train, sample, preemption, and every user error."""

import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config

TINY = config_flags(tiny_config(), "data", "model", "diffusion", "training", "sampling")


def cli(workdir, *extra, mode="train"):
  return run_cli(
    "--config=configs/digits.py", f"--workdir={workdir}", f"--mode={mode}", *TINY, *extra
  )


def test_train_then_sample_writes_valid_files(tmp_path):
  result = cli(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 4/4" in result.stderr
  if (
    sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
  ):  # xla_cpu's host-memory setting
    assert "CPU: synchronous dispatch, freed host memory kept" in result.stderr
  grid = tmp_path / "samples" / "step_4.png"
  assert Image.open(grid).size[0] >= 256
  assert os.path.exists(tmp_path / "config.json")
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))

  result = cli(tmp_path, mode="sample")
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / "samples" / "ckpt_4_n6_seed0_ancestral10"
  arr = np.load(out / "samples.npz")["arr_0"]
  assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
  for name in ("grid.png", "progressive_x0.png", "chain_xt.png"):
    Image.open(out / name).verify()
  # A second dump never overwrites the first.
  assert cli(tmp_path, mode="sample").returncode == 0
  assert os.path.exists(tmp_path / "samples" / "ckpt_4_n6_seed0_ancestral10_1" / "samples.npz")


def test_sigterm_leaves_a_checkpoint_to_resume_from(tmp_path):
  args = [
    "--config=configs/digits.py",
    f"--workdir={tmp_path}",
    *TINY,
    "--config.training.num_steps=100000",
    "--config.training.log_every=1",
    "--config.training.checkpoint_every=0",
  ]
  proc = subprocess.Popen(
    [sys.executable, "-m", "ddpm_jax.main", *args],
    cwd=REPO,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  lines = []
  deadline = time.time() + 300
  while time.time() < deadline:
    line = proc.stderr.readline()
    lines.append(line)
    if "step 3/" in line:
      break
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-2000:]
  assert "Stopped by SIGTERM" in rest
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 3
  result = cli(tmp_path, f"--config.training.num_steps={steps[0] + 2}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {steps[0]}" in result.stderr
  assert f"step {steps[0] + 2}/{steps[0] + 2}" in result.stderr


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--mode=evaluate"], "value should be one of"),
    (["--config.data.dataset=mnist"], "mnist"),
    (["--config.training.batch_size=6"], "not divisible by the number of devices"),
    (["--config.diffusion.beta_schedule=cosin"], "cosin"),
    (["--config.model.attn_resolutions=(3,)"], "3"),
    (["--config.trainig.batch_size=8"], "trainig"),
    (
      ["--config.sampling.num_step=3"],
      'unknown config key in the command line overrides: num_step Did you mean "num_steps"',
    ),
  ],
)
def test_user_errors_give_one_sentence_and_exit_nonzero(tmp_path, extra, message):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = run_cli("--config=configs/digits.py", f"--workdir={tmp_path}", *TINY, *extra, env=env)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_workdir_and_no_checkpoint(tmp_path):
  result = run_cli("--config=configs/digits.py")
  assert result.returncode != 0 and "--workdir" in result.stderr
  result = cli(tmp_path / "empty", mode="sample")
  assert result.returncode == 1
  assert "No checkpoint found" in result.stderr and "Traceback" not in result.stderr


def test_dataset_errors_reach_the_user_as_one_sentence(tmp_path):
  """DatasetError (here: a missing image folder) ends the CLI with its message; the offline TFDS
  message itself is checked in test_data.py, where the network can be switched off."""
  result = cli(
    tmp_path / "w",
    "--config.data.dataset=image_folder",
    f"--config.data.image_folder={tmp_path / 'nope'}",
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "nope" in result.stderr, result.stderr[-2000:]
