"""Runs documented command lines of the package in this one process (for tests/test_docs.py), so
that each costs no interpreter start or import:
`python tests/docs_runner.py COMMANDS.json OUT.json`.

COMMANDS.json is a list of {"id", "kind", "argv"}; kind is the module whose `main` runs: "main"
(ddpm_jax.main), "metrics" (python -m ddpm_jax.metrics), "convert" (python -m ddpm_jax.convert) or
"convert_inception". "main", "metrics" and "convert" each define absl flags of their own, so one
process runs the commands of one of them (plus "convert_inception", which has none). Each
command's flags are parsed afresh, from sys.argv as the command line would have it (ml_collections
reads its `--config.a.b` overrides there). OUT.json gets {"id", "ok", "status", "error"} per
command, in order; a command that fails does not stop the ones after it. FID's matrix square root
is the low-rank one (`fast_frechet_distance`).
"""

import importlib
import json
import sys
import time
import traceback

from ddpm_jax import process_env

process_env.apply()  # what each command line does first

# after process_env.apply
from absl import flags  # noqa: E402
from test_evaluate import low_rank_frechet_distance  # noqa: E402

from ddpm_jax.metrics import fid as fid_lib  # noqa: E402

MODULES = {
  "main": "ddpm_jax.main",
  "metrics": "ddpm_jax.metrics.__main__",
  "convert": "ddpm_jax.convert.__main__",
  "convert_inception": "ddpm_jax.metrics.convert_inception",
}


def run_one(kind: str, argv: list[str]) -> int:
  """The exit status the command line `argv` would end with."""
  module = importlib.import_module(MODULES[kind])
  sys.argv = list(argv)
  if kind == "convert_inception":
    return module.main(argv) or 0
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if "." in n]:  # the last command's --config.a.b overrides
    delattr(flags.FLAGS, name)
  parse = getattr(module, "parse_flags", flags.FLAGS)
  try:
    rest = parse(argv)
  except flags.Error as e:  # what absl's app.run reports as a usage error
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
    return 1
  return module.main(rest) or 0


def fast_frechet_distance() -> None:
  """FID's 2048x2048 matrix square root (twice, for the singular covariances of a few images) takes
  minutes on a loaded 2-core machine; the low-rank form, exact for statistics of fewer than 64
  images, takes milliseconds. tests/test_evaluate.py checks it against the full one."""
  fid_lib.frechet_distance = low_rank_frechet_distance


def main(argv):
  commands_path, out_path = argv[1:]
  fast_frechet_distance()
  with open(commands_path) as f:
    commands = json.load(f)
  results = []
  for command in commands:
    print(f"docs_runner: {command['id']}: {' '.join(command['argv'])}", file=sys.stderr, flush=True)
    error, start = "", time.time()
    try:
      status = run_one(command["kind"], command["argv"])
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # pylint: disable=broad-except
      status, error = 1, traceback.format_exc()[-3000:]
    seconds = round(time.time() - start, 1)
    results.append(
      {"id": command["id"], "ok": status == 0, "status": status, "error": error, "secs": seconds}
    )
    print(f"docs_runner: {command['id']}: status {status} after {seconds} s", file=sys.stderr)
    with open(out_path, "w") as f:  # after each command: a crash keeps what ran
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
