"""--mode=evaluate_watch: a worker beside the trainer that evaluates every new checkpoint once.

It lists the checkpoints read-only (it holds no lock the trainer needs), runs the evaluations named
in config.evaluation.watch_modes on each step not yet done, in increasing order, and records what is
done in WORKDIR/eval/done.json, so a restarted worker skips it.
"""

import time

import jax
from absl import logging

from ddpm_jax import checkpoint
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import validation
from ddpm_jax.evaluation import bpd
from ddpm_jax.evaluation import fid
from ddpm_jax.evaluation import results

EVALUATORS = {"bpd": bpd.BpdEvaluator, "fid": fid.FidEvaluator}


def done_path(workdir: str) -> str:
  return storage.join(results.eval_dir(workdir), "done.json")


def read_done(workdir: str) -> dict:
  """{"<step>": {"<mode>": result file name in WORKDIR/eval}} of the evaluation worker."""
  path = done_path(workdir)
  return storage.read_json(path) if storage.exists(path) else {}


def watch(config, workdir: str, *, sleep=time.sleep, clock=time.monotonic) -> dict:
  """Evaluates every new checkpoint of a (running) training workdir once; returns the done record.

  Polls every watch_poll_secs. A checkpoint that the trainer deletes while it is read is logged and
  skipped. Stops once the step config.training.num_steps is evaluated, or after watch_timeout_secs
  (> 0) without a new checkpoint.
  """
  validation.check(config, mode="evaluate_watch")
  ev = config.evaluation
  built, mesh, scalars = state_lib.build(config), parallel.make_mesh(), results.Scalars(workdir)
  evaluators = {
    mode: EVALUATORS[mode](config, workdir, built=built, mesh=mesh, scalars=scalars)
    for mode in ev.watch_modes
  }
  for evaluator in evaluators.values():  # missing files now, not after the first checkpoint
    evaluator.prepare()
  done = read_done(workdir)
  final = int(config.training.num_steps)
  last_progress = clock()
  logging.info(
    "Watching %s for checkpoints: %s of each, until step %d is done.",
    checkpoint.checkpoint_dir(workdir),
    " and ".join(evaluators),
    final,
  )
  while True:
    for step in checkpoint.checkpoint_steps(workdir):
      pending = [m for m in evaluators if m not in done.get(str(step), {})]
      if not pending:
        continue
      try:
        params, _ = checkpoint.restore_ema_params(
          config, workdir, built=built, mesh=mesh, step=step
        )
      except Exception:  # pylint: disable=broad-except
        if step in checkpoint.checkpoint_steps(workdir):
          raise
        logging.warning(
          "The checkpoint of step %d was deleted while it was read (the trainer keeps only the "
          "newest); skipping it.",
          step,
        )
        continue
      for mode in pending:
        path = evaluators[mode].run(params, step)
        done.setdefault(str(step), {})[mode] = storage.name(path) if path else ""
        if jax.process_index() == 0:
          storage.write_json(done_path(workdir), done)
      last_progress = clock()
    if all(m in done.get(str(final), {}) for m in evaluators):
      logging.info("Step %d (config.training.num_steps) is evaluated; the worker stops.", final)
      return done
    if ev.watch_timeout_secs and clock() - last_progress > ev.watch_timeout_secs:
      logging.info(
        "No new checkpoint for %d s (config.evaluation.watch_timeout_secs); the worker stops.",
        ev.watch_timeout_secs,
      )
      return done
    sleep(ev.watch_poll_secs)
