"""The only module that talks to orbax: step-numbered train-state checkpoints under WORKDIR/checkpoints.

Each checkpoint holds three items: `state` (step, params, EMA params, optimizer state, key),
`data` (the Grain iterator position of every process) and `config` (the resolved config
as JSON), so training resumes exactly and evaluation needs nothing but the checkpoint.
"""

import json
import logging as std_logging
import os

import jax
from absl import logging
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from ddpm_jax.errors import CheckpointError

# Sections whose change makes a checkpoint a different model (data.* shapes included).
MODEL_KEYS = ("model", "diffusion", "data.image_size", "data.num_channels")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute; URLs such as gs://bucket/run stay as they are."""
  return os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "checkpoints")


def _is_read_only_notice(record) -> bool:
  return record.levelno == std_logging.WARNING and "read only" in record.getMessage()


def make_manager(workdir: str, *, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """An async manager keeping the newest `keep` checkpoints, or a read-only one (for sampling/evaluation)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                         read_only=read_only, save_interval_steps=0 if read_only else 1,
                                         enable_async_checkpointing=not read_only)
  # orbax warns that a read-only manager is read only; that is what was asked for, not news for the log.
  drop = lambda record: not _is_read_only_notice(record)
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(drop)
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
  finally:
    absl_logger.removeFilter(drop)


def save(manager: ocp.CheckpointManager, *, state, data_iterator, config, force: bool = False) -> None:
  """Starts writing a checkpoint of `state` at its step (returns before the write ends)."""
  step = int(jax.device_get(state.step))
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
  if data_iterator is not None:
    items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, *, abstract_state, data_iterator=None, step: int | None = None):
  """The train state (and iterator position) of `step`, or of the newest checkpoint."""
  step = manager.latest_step() if step is None else step
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  # An imported checkpoint (ddpm_jax.convert) holds no iterator position: the data order then starts afresh.
  if data_iterator is not None and "data" in manager.item_metadata(step).keys():
    items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items)).state


def resolve_step(manager: ocp.CheckpointManager, workdir: str, step: int = -1) -> int:
  """The newest step (step = -1) or the named one; a clear error when there is none."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"No checkpoint found in {checkpoint_dir(workdir)}: train first "
                          f"(--mode=train --workdir={workdir}) or point --workdir at a run with checkpoints.")
  if step < 0:
    return max(steps)
  if step not in steps:
    raise CheckpointError(f"No checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                          f"available steps: {sorted(steps)}.")
  return step


def _get(config_dict, dotted):
  for part in dotted.split("."):
    config_dict = config_dict.get(part, {}) if isinstance(config_dict, dict) else None
  return config_dict


def _normalise(value):
  return json.loads(json.dumps(value))  # tuples and lists compare equal after a JSON round trip


def check_compatible(saved: dict, config: ml_collections.ConfigDict, *, source: str) -> None:
  """Refuses a config whose model or diffusion settings differ from those a checkpoint was trained with."""
  current = config.to_dict()
  diffs = []
  for key in MODEL_KEYS:
    old, new = _normalise(_get(saved, key)), _normalise(_get(current, key))
    if isinstance(old, dict) and isinstance(new, dict):
      diffs += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    elif old != new:
      diffs.append(f"{key}: {old!r} -> {new!r}")
  if diffs:
    raise CheckpointError(f"The config differs from the one {source} was trained with in "
                          f"{', '.join(diffs)}; use a new --workdir or the original settings.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config as WORKDIR/config.json (process 0 only; WORKDIR may be a gs:// URL)."""
  path = epath.Path(workdir) / "config.json"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / "config.json.tmp"
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    tmp.replace(path)  # readers never see a half-written file
  return os.fspath(path)


def read_config(workdir: str) -> dict | None:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  return json.loads(path.read_text())
