"""`python -m ddpm_jax.convert import SRC --config=configs/cifar10.py --workdir=DIR [--raw]
[--overwrite]` and `python -m ddpm_jax.convert export --workdir=DIR OUT [--raw] [--overwrite]
[--step=N]`.

SRC is a diffusers model directory (a Hub snapshot such as google/ddpm-cifar10-32) or an official TF
checkpoint (`.../model.ckpt-790000` or its folder). Nothing is downloaded. Every user mistake ends
the program with one sentence on stderr and exit status 1.
"""

import sys

from ddpm_jax import process_env

process_env.apply()  # before the libraries below read the environment

# pylint: disable=g-import-not-at-top
from absl import app
from absl import flags
from ml_collections import config_flags

from ddpm_jax import console
from ddpm_jax import data
from ddpm_jax.convert import workdir as workdir_lib
from ddpm_jax.errors import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "import: the config the model was trained with, e.g. "
  "configs/cifar10.py (written to WORKDIR/config.json).",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "import: the workdir to write; export: the workdir to read.")
flags.DEFINE_bool(
  "raw",
  False,
  "import: a TF checkpoint's raw weights instead of their EMA copies; "
  "export: the raw params instead of the EMA params.",
)
flags.DEFINE_bool(
  "overwrite", False, "import: replace the checkpoints of WORKDIR; export: replace OUT."
)
flags.DEFINE_integer("step", -1, "export: the checkpoint step to export (-1: the newest).")
flags.mark_flags_as_required(["workdir"])

USAGE = (
  "usage: python -m ddpm_jax.convert import SRC --config=CONFIG --workdir=DIR [--raw] "
  "[--overwrite]\n"
  "       python -m ddpm_jax.convert export --workdir=DIR OUT [--raw] [--overwrite] [--step=N]"
)


def _import(src: str) -> None:
  if FLAGS.config is None:
    raise app.UsageError(
      "import needs --config, the config the model was trained with (e.g. configs/cifar10.py)."
    )
  if workdir_lib.detect_format(src)[0] == workdir_lib.TF:
    # TensorFlow only reads the checkpoint; JAX keeps the devices
    data.hide_accelerators_from_tensorflow()
  done = workdir_lib.import_checkpoint(
    src, config=FLAGS.config, workdir=FLAGS.workdir, raw=FLAGS.raw, overwrite=FLAGS.overwrite
  )
  config_file = config_flags.get_config_filename(FLAGS["config"])
  print(
    f"Imported {done.num_params:,} parameters from {done.description} into "
    f"{done.checkpoint_dir} (step {done.step}).\nSample with: python -m ddpm_jax.main "
    f"--mode=sample --config={config_file} "
    f"--workdir={FLAGS.workdir} (and the same --config overrides)"
  )


def _export(out: str) -> None:
  out, step = workdir_lib.export_diffusers(
    FLAGS.workdir, out, raw=FLAGS.raw, step=FLAGS.step, overwrite=FLAGS.overwrite
  )
  print(
    f"Exported the {'raw' if FLAGS.raw else 'EMA'} params of step {step} to {out} "
    "(load with diffusers' UNet2DModel.from_pretrained or DDPMPipeline.from_pretrained)."
  )


def main(argv):
  if len(argv) != 3 or argv[1] not in ("import", "export"):
    raise app.UsageError(f"expected a command and one path.\n{USAGE}")
  console.quiet_command_line(verbose=False)
  try:
    (_import if argv[1] == "import" else _export)(argv[2])
  except (ConfigError, OSError) as e:
    print(f"ddpm_jax.convert: error: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl's parser, with a misspelt --config.x.y override reported as one sentence."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
  except (KeyError, AttributeError) as e:
    print(
      f"ddpm_jax.convert: error: unknown config key in the command line overrides: {e}",
      file=sys.stderr,
    )
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
