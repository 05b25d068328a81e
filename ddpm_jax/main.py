"""Entry point: `python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR
[--mode=train|sample|inpaint|bpd|fid|...]`.

`--config.training.batch_size=64`-style flags override any key of the config file. Every user
mistake ends the program with one sentence on stderr and exit status 1. TensorFlow's start-up
lines and orbax's background-thread reports are shown only with --verbose.
"""

import sys

from ddpm_jax import process_env

process_env.apply()  # before the libraries below read the environment

# pylint: disable=g-import-not-at-top
import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpm_jax import console
from ddpm_jax import data
from ddpm_jax import inpaint
from ddpm_jax import interpolate
from ddpm_jax import parallel
from ddpm_jax import storage
from ddpm_jax import train
from ddpm_jax import validation
from ddpm_jax import xla_cpu
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import samples
from ddpm_jax.evaluation import watch

# What each --mode runs: f(config, workdir).
MODES = {
  "train": train.train,
  "sample": samples.dump_samples,
  "interpolate": interpolate.run,
  "inpaint": inpaint.run,
  "bpd": bpd.evaluate,
  "fid": fid.evaluate,
  "evaluate_watch": watch.watch,
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to a config file, e.g. configs/cifar10.py.", lock_config=True
)
flags.DEFINE_string(
  "workdir",
  None,
  "Directory (or gs:// URL) for checkpoints, samples, TensorBoard events and config.json.",
)
flags.DEFINE_enum(
  "mode",
  "train",
  list(MODES),
  "train: train or resume; sample: sample from a checkpoint; interpolate: the paper's "
  "interpolations (Figures 8, 9); inpaint: fill in the masked part of images (RePaint); bpd: the "
  "NLL bound in bits/dim; fid: FID and Inception Score "
  "of samples; evaluate_watch: evaluate every new checkpoint of a training run once.",
)
flags.mark_flags_as_required(["config", "workdir"])

flags.DEFINE_bool(
  "verbose", False, "Also show TensorFlow/XLA start-up lines and orbax's background reports."
)
# config-file import errors as one sentence
FLAGS["config"].parser = console.checked_config_parser(FLAGS["config"].parser)

# bad config values, bad paths, full disks; anything else is a bug
USER_ERRORS = (ConfigError, OSError)


def run(config, workdir: str, mode: str):
  """Runs one mode (what `main` does after flag parsing and process set-up)."""
  if mode not in MODES:
    raise ConfigError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
  return MODES[mode](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir.strip():
    raise app.UsageError("--workdir must not be empty.")
  console.quiet_command_line(FLAGS.verbose)
  data.hide_accelerators_from_tensorflow()
  try:
    storage.check_supported(FLAGS.workdir, what="--workdir")
    # every key, before any device or file is touched
    validation.validate(FLAGS.config, mode=FLAGS.mode)
    storage.check_reachable(FLAGS.workdir, what="--workdir")  # a missing bucket: now, not later
    # before JAX's backends start (bench/README.md "What was tried")
    xla_cpu.synchronous_dispatch()
    parallel.maybe_initialize_distributed(FLAGS.config.distributed)
    if jax.process_index() > 0:  # one log for the whole job: process 0's
      logging.set_verbosity(logging.WARNING)
    if xla_cpu.retain_freed_memory_on_one_cpu():  # each train step reuses the last one's pages
      logging.info(
        "CPU: synchronous dispatch, freed host memory kept for reuse "
        '(bench/README.md "What was tried").'
      )
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except train.NonFiniteError as e:
    print(f"ddpm_jax: training stopped: {e}", file=sys.stderr)
    sys.exit(1)
  except USER_ERRORS as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl's parser, with a misspelt --config.x.y override reported as one sentence."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
  except console.ConfigFileError as e:
    print(f"ddpm_jax: error: {e}", file=sys.stderr)
  except (KeyError, AttributeError) as e:
    print(f"ddpm_jax: error: {console.unknown_key_sentence(e)}", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
