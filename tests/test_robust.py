"""Runs you can trust (issue 9), each test doing what a user did, from the command line:
a broken config file, out-of-range values, corrupted checkpoints (resume from the previous intact
one, bitwise), a full disk, lost permissions, a vanished workdir, a NaN stop; every failure is one
sentence with a non-zero exit, no traceback, and no TensorFlow/XLA/orbax start-up lines.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import config_flags
from conftest import run_cli
from conftest import tiny_config
from ddpm_jax import checkpoint
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError

CONFIG = tiny_config(training__num_steps=6, training__num_grid_samples=0)
FLAGS = config_flags(CONFIG, "data", "model", "diffusion", "training", "sampling")
# Lines a clean run may print: our own log lines (train.py, checkpoint.py, samples.py), a progress
# bar, and the one-sentence message of a failure.
OUR_LINE = re.compile(
  r"^([IW]\d{4} [\d:.]+ +\d+ (main|train|checkpoint|samples|bpd|fid|watch)\.py:\d+\] "
  r"|ddpm_jax: |sampling: )"
)


def cli(workdir, *extra, mode="train", **kwargs):
  return run_cli(
    "--config=configs/digits.py", f"--workdir={workdir}", f"--mode={mode}", *FLAGS, *extra, **kwargs
  )


def assert_clean(stderr: str):
  """Only our own lines: no traceback, no background-thread report, no start-up output of other
  libraries."""
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
  stray = [line for line in stderr.splitlines() if line.strip() and not OUR_LINE.match(line)]
  assert not stray, "\n".join(stray[:20])


def last_sentence(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("ddpm_jax: ")]
  assert lines, stderr[-3000:]
  return lines[-1]


def params_of(workdir, step):
  """The params and EMA params of a checkpoint, as NumPy leaves."""
  built = state_lib.build(CONFIG)
  manager = checkpoint.make_manager(str(workdir), keep=10, read_only=True)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(CONFIG), mesh=parallel.make_mesh()
  )
  state = checkpoint.restore(manager, abstract_state=abstract, step=step)
  assert int(state.step) == step
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One uninterrupted 6-step run with checkpoints at steps 2, 4 and 6, shared by the tests (copied
  per test)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = cli(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_clean(result.stderr)
  return workdir


def copy_of(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def largest_array_file(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  return max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)


# -------------------------------------------------------------------------- config files and values


@pytest.mark.parametrize(
  "body,line,kind",
  [
    (
      "from ddpm_jax.configs import digits\ndef get_config():\n  c = digits.get_config(\n"
      "  return c\n",
      3,
      "SyntaxError",
    ),
    (
      "from ddpm_jax.configs import digits\ndef get_config():\n  c = digits.get_config()\n"
      "  c.training.batch_size = 1 / 0\n"
      "  return c\n",
      4,
      "ZeroDivisionError",
    ),
  ],
)
def test_a_config_file_that_fails_to_import_is_one_sentence_with_file_and_line(
  tmp_path, body, line, kind
):
  path = tmp_path / "my_config.py"
  path.write_text(body)
  result = run_cli(f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 1
  assert result.stderr.strip() == last_sentence(result.stderr), result.stderr[-3000:]
  assert f"{path}, line {line}" in result.stderr and kind in result.stderr
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.training.batch_size=-8", "config.training.batch_size = -8 must be an integer >= 1."),
    (
      "--config.training.learning_rate=-0.001",
      "config.training.learning_rate = -0.001 must be a finite number > 0.",
    ),
  ],
)
def test_out_of_range_values_are_refused_by_key_and_value_before_anything_starts(
  tmp_path, override, message
):
  result = cli(tmp_path, override)
  assert result.returncode == 1
  # The whole output is the sentence: no TensorFlow/XLA start-up lines before it.
  assert result.stderr.strip() == f"ddpm_jax: error: {message}", result.stderr[-3000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_verbose_shows_what_the_quiet_start_up_hides(tmp_path):
  result = cli(tmp_path, "--config.training.learning_rate=-0.001", "--verbose")
  assert result.returncode == 1
  assert last_sentence(result.stderr).endswith("must be a finite number > 0.")
  assert (
    len(result.stderr.strip().splitlines()) > 1
  )  # TensorFlow's start-up lines, only when asked for


@pytest.mark.parametrize(
  "key,value,words",
  [
    ("training.batch_size", 0, ">= 1"),
    ("training.learning_rate", 0.0, "> 0"),
    ("training.learning_rate", float("inf"), "finite"),
    ("training.ema_decay", 1.0, "[0, 1)"),
    ("training.adam_b2", -0.1, "[0, 1)"),
    ("training.warmup_steps", -1, ">= 0"),
    ("training.log_every", -5, ">= 0"),
    ("training.checkpoint_every", 3, "multiple of training.steps_per_dispatch = 2"),
    ("training.keep_checkpoints", 0, ">= 1"),
    ("training.grad_clip", 0.0, "> 0"),
    ("sampling.batch_size", 0, ">= 1"),
    ("sampling.checkpoint_step", -2, ">= -1"),
    ("evaluation.num_examples", 0, ">= 1"),
    ("diffusion.var_type", "fixed", "'fixedlarge'"),
    ("diffusion.beta_end", 2.0, "(0, 1]"),
    ("data.num_channels", 2, "1, 3"),
    ("distributed.initialize", "yes", "'auto'"),
    ("model.dropout", 1.0, "[0, 1)"),
  ],
)
def test_every_section_is_checked_and_the_message_names_key_and_value(key, value, words):
  config = tiny_config()
  config.training.steps_per_dispatch = 2
  config.training.log_every = config.training.checkpoint_every = 2
  validation.validate(config, mode="train")  # the tiny config itself is valid
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as error:
    validation.validate(config, mode="train")
  assert (
    name in str(error.value)
    and repr(value).strip("'") in str(error.value)
    and words in str(error.value)
  )


def test_sample_counts_are_checked_where_they_are_used():
  config = tiny_config(sampling__num_samples=0)
  validation.validate(config, mode="train")  # training draws no samples from config.sampling
  with pytest.raises(ConfigError, match=r"config\.sampling\.num_samples = 0"):
    validation.validate(config, mode="sample")


@pytest.mark.parametrize(
  "mode,key,value",
  [
    ("train", "sampling.method", "plms"),
    ("train", "sampling.num_steps", 11),  # T = 10
    ("sample", "sampling.eta", -1.0),
    ("train", "sampling.spacing", "ddimx"),
    ("train", "evaluation.fid_resize", "bicubic"),
    ("train", "evaluation.sample_chunk_size", 0),
    ("train", "evaluation.watch_modes", ("nll",)),
    ("train", "evaluation.watch_poll_secs", 0),
    ("fid", "evaluation.num_fid_samples", 1),
    ("interpolate", "interpolation.timesteps", (11,)),
  ],
)
def test_sampler_evaluation_and_interpolation_keys_are_checked_before_any_work(mode, key, value):
  config = tiny_config()
  config.interpolation.timesteps = (5, 10)
  validation.validate(config, mode=mode)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=rf"config\.{section}\.{name}"):
    validation.validate(config, mode=mode)


# ---------------------------------------------------------------------------- corrupted checkpoints


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def zero_header(path):
  with open(path, "r+b") as f:
    f.write(bytes(64))


def zero_middle(path):
  """4 KiB of zeros in the middle of the file, where the bytes were not all zero already."""
  with open(path, "r+b") as f:
    content = f.read()
    offset = len(content) // 2
    while not any(content[offset : offset + 4096]):
      offset += 4096
    f.seek(offset)
    f.write(bytes(4096))


@pytest.mark.parametrize(
  "corrupt,reason",
  [
    (truncate, "bytes instead of"),
    (zero_header, "changed after it was written (SHA-256 mismatch)"),
    (zero_middle, "changed after it was written (SHA-256 mismatch)"),
    (os.remove, "is missing"),
  ],
)
def test_training_skips_a_corrupt_newest_checkpoint_and_resumes_bitwise(
  trained, tmp_path, corrupt, reason
):
  workdir = copy_of(trained, tmp_path)
  corrupt(largest_array_file(workdir, 6))
  result = cli(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_clean(result.stderr)
  assert re.search(
    r"Skipping a checkpoint: The checkpoint of step 6 in \S+ is corrupt: \S+ "
    rf".*{re.escape(reason)}",
    result.stderr,
  ), result.stderr[-3000:]
  assert "Resumed from the checkpoint of step 4" in result.stderr
  # Kept, not deleted: set aside, so that the resumed run could write step 6 again.
  set_aside = workdir / "corrupt_checkpoints" / "6"
  assert f"Moved it to {set_aside}" in result.stderr
  assert checkpoint.find_damage(str(set_aside))
  # The resumed run ends exactly where the uninterrupted one did.
  for a, b in zip(params_of(workdir, 6), params_of(trained, 6)):
    np.testing.assert_array_equal(a, b)


def test_sampling_names_a_corrupt_checkpoint_it_was_asked_for_and_stops(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  zero_middle(largest_array_file(workdir, 6))
  result = cli(workdir, "--config.sampling.checkpoint_step=6", mode="sample")
  assert result.returncode == 1
  assert_clean(result.stderr)
  assert re.fullmatch(
    r"ddpm_jax: error: The checkpoint of step 6 in \S+ is corrupt: the contents of \S+ changed "
    r"after it was written \(SHA-256 mismatch\); choose another step \(2, 4\)\.",
    last_sentence(result.stderr),
  ), result.stderr[-2000:]
  assert not os.path.exists(workdir / "samples")
  assert os.path.isdir(workdir / "checkpoints" / "6")  # a reader never moves or deletes anything


def test_sampling_without_a_step_takes_the_newest_intact_checkpoint_and_says_so(
  trained, tmp_path, caplog
):
  workdir = copy_of(trained, tmp_path)
  truncate(largest_array_file(workdir, 6))
  manager = checkpoint.make_manager(str(workdir), keep=1, read_only=True)
  assert checkpoint.resolve_step(manager, str(workdir)) == 4
  assert "The checkpoint of step 6" in caplog.text and "using an older one" in caplog.text


def test_a_checkpoint_without_digests_is_still_checked_by_reading_it(trained, tmp_path):
  """A run killed between orbax's commit and the digest record: orbax's own read errors decide."""
  workdir = copy_of(trained, tmp_path)
  os.remove(workdir / "checkpoints" / "6" / checkpoint.DIGEST_FILE)
  truncate(largest_array_file(workdir, 6))
  built = state_lib.build(CONFIG)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(CONFIG), mesh=parallel.make_mesh()
  )
  manager = checkpoint.make_manager(str(workdir), keep=1, read_only=True)
  with pytest.raises(ConfigError, match=r"step 6 .* cannot be read \(ValueError: OUT_OF_RANGE"):
    checkpoint.restore(manager, abstract_state=abstract, step=6)
  assert int(checkpoint.restore(manager, abstract_state=abstract).step) == 4


# ----------------------------------------------------------------------------- storage failures


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
      check=True,
      capture_output=True,
    )
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(
      "cannot mount a tmpfs here to fill a disk "
      f"({getattr(e, 'stderr', b'').decode().strip() or e})"
    )


def test_a_full_disk_is_one_sentence_and_keeps_the_earlier_checkpoints(trained, tmp_path):
  disk = tmp_path / "disk"
  _mount_tmpfs(disk, "64m")
  try:
    workdir = disk / "run"
    shutil.copytree(
      trained, workdir, ignore=lambda folder, names: ["6"] if folder.endswith("checkpoints") else []
    )
    used = shutil.disk_usage(disk).used
    subprocess.run(
      ["mount", "-o", f"remount,size={used + 4 * 2**20}", str(disk)], check=True
    )  # half a checkpoint
    before = {s: checkpoint.find_damage(str(workdir / "checkpoints" / str(s))) for s in (2, 4)}
    result = cli(workdir)
    assert result.returncode == 1
    assert_clean(result.stderr)
    assert re.fullmatch(
      rf"ddpm_jax: error: Could not (start )?write the checkpoint of step 6 in "
      rf"{re.escape(str(workdir / 'checkpoints'))}: No space left on device; the earlier "
      r"checkpoints \(steps 2, 4\) were not touched\.",
      last_sentence(result.stderr),
    ), result.stderr[-2000:]
    assert before == {2: None, 4: None}
    assert {
      s: checkpoint.find_damage(str(workdir / "checkpoints" / str(s))) for s in (2, 4)
    } == before
  finally:
    subprocess.run(["umount", str(disk)], check=False)


def _train_and_interfere(workdir, interfere, prefix=()):
  """Resumes the run to step 1000 (checkpoints every 6 steps), calls interfere() once step 7 is
  logged."""
  args = [
    "--config=configs/digits.py",
    f"--workdir={workdir}",
    *FLAGS,
    "--config.training.num_steps=1000",
    "--config.training.log_every=1",
    "--config.training.checkpoint_every=6",
  ]
  proc = subprocess.Popen(
    [*prefix, sys.executable, "-m", "ddpm_jax.main", *args],
    cwd=REPO,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  lines, deadline = [], time.time() + 300
  while time.time() < deadline:
    line = proc.stderr.readline()
    lines.append(line)
    if "step 7/" in line or not line:
      break
  interfere()
  _, rest = proc.communicate(timeout=300)
  return proc.returncode, "".join(lines) + rest


def test_lost_permission_mid_run_is_one_sentence_and_keeps_the_earlier_checkpoints(
  trained, tmp_path
):
  workdir = copy_of(trained, tmp_path)
  # root ignores permissions: run without the capabilities that let it, as an ordinary user would
  # be.
  drop = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
  ]
  if (
    shutil.which("setpriv") is None
    or subprocess.run([*drop, "true"], capture_output=True).returncode
  ):
    pytest.skip("setpriv cannot drop the capabilities that let root ignore permissions here")
  readonly = lambda: subprocess.run(
    ["chmod", "-R", "a-w", str(workdir / "checkpoints")], check=True
  )
  try:
    returncode, stderr = _train_and_interfere(workdir, readonly, prefix=drop)
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir / "checkpoints")], check=True)
  assert returncode == 1, stderr[-3000:]
  assert_clean(stderr)
  assert re.fullmatch(
    r"ddpm_jax: error: Could not .* checkpoint of step 12 in \S+: Permission denied; the earlier "
    r"checkpoints \(steps 2, 4, 6\) were not touched\.",
    last_sentence(stderr),
  ), stderr[-2000:]
  for step in (2, 4, 6):
    assert checkpoint.find_damage(str(workdir / "checkpoints" / str(step))) is None


def test_a_vanished_workdir_is_one_sentence_and_nothing_is_written_in_its_place(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  moved = tmp_path / "moved"
  returncode, stderr = _train_and_interfere(workdir, lambda: os.rename(workdir, moved))
  assert returncode == 1, stderr[-3000:]
  assert_clean(stderr)
  assert last_sentence(stderr) == (
    f"ddpm_jax: error: Could not write the checkpoint of step 12: {workdir / 'checkpoints'} was "
    "removed or replaced during the run; restore it (or start again with a new --workdir)."
  )
  assert not os.path.exists(workdir / "checkpoints")
  assert sorted(os.listdir(moved / "checkpoints")) == ["2", "4", "6"]


# ----------------------------------------------------------------------------- the NaN stop


def write_nan_checkpoint(workdir, *, from_step, step):
  """The state of `from_step` with NaN parameters, saved as `step` the way training saves (digests
  included), so that training diverges at step + 1 with the program it already compiled."""
  built = state_lib.build(CONFIG)
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(CONFIG), mesh=parallel.make_mesh()
  )
  manager = checkpoint.make_manager(str(workdir), keep=10)
  state = checkpoint.restore(manager, abstract_state=abstract, step=from_step)
  nan = state._replace(
    step=jnp.full_like(state.step, step), params=jax.tree.map(lambda p: p * jnp.nan, state.params)
  )
  checkpoint.save(manager, state=nan, config=CONFIG)
  manager.close()


def test_the_nan_stop_names_the_newest_checkpoint_on_disk(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  write_nan_checkpoint(workdir, from_step=6, step=8)
  result = cli(workdir, "--config.training.num_steps=12", "--config.training.log_every=1")
  assert result.returncode == 1
  assert_clean(result.stderr)
  assert last_sentence(result.stderr) == (
    "ddpm_jax: training stopped: Non-finite loss (nan) or gradient norm (nan) at step 9; stopped "
    "without writing a checkpoint. The newest checkpoint on disk is step 8 "
    f"({workdir / 'checkpoints' / '8'})."
  )
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [2, 4, 6, 8]
