"""Where evaluation results go: WORKDIR/eval, file names that never overwrite a result computed with
other settings, folders of resumable parts that remember their settings, TensorBoard scalars.
"""

import jax
import numpy as np

from ddpm_jax import storage
from ddpm_jax import summaries
from ddpm_jax.errors import ConfigError


def eval_dir(workdir: str) -> str:
  return storage.join(storage.resolve(workdir), "eval")


def result_path(folder: str, stem: str, settings: dict) -> str:
  """folder/stem.json, or stem_1.json, ...: a result computed with other settings is never
  overwritten (the same settings give the same numbers, so that file is simply rewritten)."""
  for i in range(1000):
    path = storage.join(folder, f"{stem}{'' if i == 0 else f'_{i}'}.json")
    if not storage.exists(path) or storage.read_json(path).get("settings") == settings:
      return path
  raise ConfigError(f"{folder} holds 1000 results named {stem}_*.json; move some away.")


def check_parts_dir(path: str, settings: dict, *, what: str) -> None:
  """Starts a folder of resumable parts with its settings.json (process 0 writes it), or checks that
  an existing one was made with the same settings."""
  meta = storage.join(path, "settings.json")
  if storage.exists(meta):
    saved = storage.read_json(meta)
    if saved != settings:
      diffs = ", ".join(
        f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now"
        for k in sorted(set(saved) | set(settings))
        if saved.get(k) != settings.get(k)
      )
      raise ConfigError(
        f"{path} holds {what} computed with other settings ({diffs}); move it away to "
        "start afresh, or evaluate with its settings."
      )
    return
  if jax.process_index() == 0:
    storage.write_json(meta, settings)


def mean_and_stderr(values) -> dict:
  """Mean and standard error of the mean (std with ddof 1 / sqrt(n); null for one value),
  float64."""
  values = np.asarray(values, np.float64)
  stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
  return {"mean": float(values.mean()), "stderr": stderr}


class Scalars:
  """TensorBoard scalars of evaluations in WORKDIR/eval (process 0; one event file per job)."""

  def __init__(self, workdir: str):
    self._dir = eval_dir(workdir)
    self._writer = None

  def write(self, scalars: dict, step: int) -> None:
    if self._writer is None:
      self._writer = summaries.writer(self._dir)
    if self._writer is None:
      return
    for name, value in scalars.items():
      if value is not None:
        self._writer.scalar(name, value, step)
    self._writer.flush()
