"""The only module that talks to orbax: step-numbered train-state checkpoints under
WORKDIR/checkpoints.

Each checkpoint holds two items: `state` (step, params, EMA params, optimizer state, key) and
`config` (the resolved config as JSON), so evaluation needs nothing but the checkpoint. The data
position is the step itself (global batch s is a function of the seed and s: `data.train_iterator`),
so training resumes exactly on any number of devices, processes or Grain workers. Every file goes
through `storage`, so the workdir may be a gs:// bucket.

Once orbax has committed a step, the size and SHA-256 of each of its files go into DIGEST_FILE in
the step folder; restoring checks them, so a truncated or altered checkpoint is found before use.
File-system failures while writing (full disk, lost permission, a vanished folder) become one
OSError sentence; orbax writes each step in a new folder, so earlier checkpoints stay intact.
"""

import contextlib
import json
import logging as std_logging
import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax.errors import CheckpointError

# Sections whose change makes a checkpoint a different model (data.* shapes included).
MODEL_KEYS = ("model", "diffusion", "data.image_size", "data.num_channels")
# How the model computes, not what it computes: a run may resume or be evaluated with other values.
COMPUTE_ONLY_KEYS = ("model.remat", "model.dtype")
# Keys added after checkpoints were first written, and the value a config.json without them means.
ADDED_KEYS = {"model.num_classes": 0}
# In each step folder: the size and SHA-256 of every other file, written once orbax has committed
# the step.
DIGEST_FILE = "ddpm_jax_digests.json"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute; URLs such as gs://bucket/run stay as they are."""
  return storage.join(storage.resolve(workdir), "checkpoints")


def _is_read_only_notice(record) -> bool:
  return record.levelno == std_logging.WARNING and "read only" in record.getMessage()


def corrupt_dir(workdir: str) -> str:
  """Where training moves corrupt checkpoints newer than the one it resumes from (never deleted)."""
  return storage.join(storage.resolve(workdir), "corrupt_checkpoints")


# ----------------------------------------------------------------------------- integrity


def _step_dir(manager, step: int) -> str:
  return storage.join(str(manager.directory), str(step))


def _files(directory: str):
  """Paths (relative, sorted) of every file under `directory` but the digest record."""
  return [f for f in storage.files_under(directory) if f != DIGEST_FILE]


def record_digests(directory: str) -> None:
  """Writes DIGEST_FILE (size and SHA-256 of every file) into a committed checkpoint folder."""
  digests = {}
  for f in _files(directory):
    path = storage.join(directory, f)
    digests[f] = dict(size=storage.size(path), sha256=storage.sha256(path))
  # atomic: a reader sees the whole record or none
  storage.write_json(storage.join(directory, DIGEST_FILE), dict(files=digests), indent=1)


def find_damage(directory: str) -> str | None:
  """What is wrong with a checkpoint folder compared with its digest record (None: intact).

  Raises FileNotFoundError when the folder has no record (written by a run that stopped first).
  """
  record = storage.join(directory, DIGEST_FILE)
  if not storage.is_file(record):
    raise FileNotFoundError(record)
  try:
    expected = storage.read_json(record)["files"]
  except (ValueError, KeyError, TypeError):
    return f"its digest record {DIGEST_FILE} is unreadable"
  for name, want in sorted(expected.items()):
    path = storage.join(directory, name)
    if not storage.is_file(path):
      return f"{name} is missing"
    size = storage.size(path)
    if size != want["size"]:
      return f"{name} has {size:,} bytes instead of {want['size']:,} (cut short or overwritten)"
    if storage.sha256(path) != want["sha256"]:
      return f"the contents of {name} changed after it was written (SHA-256 mismatch)"
  return None


# ----------------------------------------------------------------------------- storage failures


def _os_reason(error: BaseException) -> str | None:
  """The storage failure behind an exception (e.g. 'No space left on device', 'permission denied
  (...)'), or None when it is not one."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return error.strerror or str(error)
    match = _OS_ERROR_CODE.search(str(error))
    if match:  # TensorStore reports file errors as ValueError('... [os_error_code=28]')
      return os.strerror(int(match.group(1)))
    reason = storage.remote_reason(error)
    if reason is not None:  # a bucket's answer (gcsfs's OSError, TensorStore's status codes)
      return reason
    error = error.__cause__ or error.__context__
  return None


def _innermost(error: BaseException) -> str:
  """'Type: first line' of the deepest cause (orbax wraps TensorStore's precise message)."""
  seen = set()
  while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def _storage_errors(what: str, manager):
  """Turns a file-system failure inside orbax into one OSError sentence; anything else stays a
  bug."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    reason = _os_reason(e)
    if reason is None:
      raise
    raise OSError(
      f"Could not {what} in {manager.directory}: {reason}; {_earlier(manager)}."
    ) from None


def _earlier(manager) -> str:
  """What a failed write left behind: orbax writes each step in a new folder and removes old ones
  only after."""
  if manager.vanished():
    return "that folder was removed or replaced during the run"
  steps = [s for s in sorted(manager.all_steps()) if storage.is_dir(_step_dir(manager, s))]
  if not steps:
    return "there is no earlier checkpoint"
  return (
    f"the earlier checkpoints (step{'s' * (len(steps) > 1)} {', '.join(map(str, steps))}) "
    "were not touched"
  )


class Manager(ocp.CheckpointManager):
  """orbax's async manager, plus: a digest record for each step once its write has committed
  (the main thread adds it when it next waits or polls), and storage failures as one OSError."""

  def __init__(self, directory: str, *, options: ocp.CheckpointManagerOptions):
    super().__init__(directory, options=options)
    self._identity = storage.identity(directory)
    self._unsealed = []  # steps this process saved whose digests are not recorded yet
    self._in_flight = None
    self._damage = {}  # step -> find_damage verdict, computed once per manager

  def vanished(self) -> bool:
    """Whether the checkpoint folder was deleted, moved or replaced since this manager opened it.

    A bucket prefix exists only once something is written under it: until then nothing can vanish.
    """
    return self._identity is not None and storage.identity(self.directory) != self._identity

  def save(self, step: int, *args, **kwargs) -> bool:
    # orbax would wait here anyway; this also records the previous digests
    self.wait_until_finished()
    if self.vanished():  # orbax would create it again and carry on writing into an empty run
      raise OSError(
        f"Could not write the checkpoint of step {step}: {self.directory} was removed or replaced "
        "during the run; restore it (or start again with a new --workdir)."
      )
    self._in_flight = step
    with _storage_errors(f"start writing the checkpoint of step {step}", self):
      saved = super().save(step, *args, **kwargs)
    if saved:
      self._unsealed.append(step)
    return saved

  def wait_until_finished(self):
    with _storage_errors(f"write the checkpoint of step {self._in_flight}", self):
      super().wait_until_finished()
    self._record_finished()

  def seal_finished(self) -> None:
    """Records the digests of a save that has finished in the background (cheap when none has)."""
    if self._unsealed and not self.is_saving_in_progress():
      self.wait_until_finished()

  def _record_finished(self):
    steps, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in steps:
      directory = _step_dir(self, step)
      if not storage.is_dir(directory):  # keep_checkpoints never removes the newest step at once
        raise OSError(
          f"Could not write the checkpoint of step {step} in {self.directory}: orbax did not "
          f"commit it (--verbose shows its report); {_earlier(self)}."
        )
      with _storage_errors(f"record the digests of the checkpoint of step {step}", self):
        record_digests(directory)
      self.forget(step)
    if steps and self._identity is None:  # a bucket prefix that has just come into being
      self._identity = storage.identity(self.directory)

  def forget(self, step: int) -> None:
    """Drops the cached verdict of a step whose folder was just written or moved."""
    self._damage.pop(step, None)

  def damage(self, step: int) -> str | None:
    """find_damage of a step (cached); FileNotFoundError when it has no digest record."""
    if step not in self._damage:
      self._damage[step] = find_damage(_step_dir(self, step))
    return self._damage[step]


def make_manager(workdir: str, *, keep: int, read_only: bool = False) -> Manager:
  """An async manager keeping the newest `keep` checkpoints, or a read-only one (for
  sampling/evaluation)."""
  # Step folders are created in the calling thread: created in the background, a refused mkdir
  # leaves the save waiting minutes for a signal that never comes.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else keep,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=not read_only,
    save_interval_steps=0 if read_only else 1,
    async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
  )
  # orbax warns that a read-only manager is read only; that is what was asked for, not news for the
  # log.
  drop = lambda record: not _is_read_only_notice(record)
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(drop)
  try:
    return Manager(checkpoint_dir(workdir), options=options)
  finally:
    absl_logger.removeFilter(drop)


def save(manager: Manager, *, state, config, force: bool = False) -> None:
  """Starts writing a checkpoint of `state` at its step (returns before the write ends)."""
  step = int(jax.device_get(state.step))
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
  manager.save(step, args=ocp.args.Composite(**items), force=force)


def _restore_one(manager: Manager, step: int, *, abstract_state):
  """The state of `step`; CheckpointError naming the step and the damage when it is corrupt."""
  where = f"The checkpoint of step {step} in {manager.directory}"
  try:
    damage, recorded = manager.damage(step), True
  except (
    FileNotFoundError
  ):  # written by a run that stopped before recording it: orbax decides below
    damage, recorded = None, False
  if damage:
    raise CheckpointError(f"{where} is corrupt: {damage}.")
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if recorded:  # verified: a failure now is a bug, not damage
    return manager.restore(step, args=ocp.args.Composite(**items)).state
  logging.warning(
    "%s has no digest record (the run stopped before writing it), so only orbax can tell "
    "whether it is intact.",
    where,
  )
  try:
    return manager.restore(step, args=ocp.args.Composite(**items)).state
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{where} cannot be read ({_innermost(e)}).") from e


def _set_aside(manager: Manager, step: int, workdir: str) -> str:
  """Moves a corrupt step folder out of orbax's sight (training would write that step again)."""
  target = storage.join(corrupt_dir(workdir), str(step))
  if jax.process_index() == 0:
    target = storage.move(_step_dir(manager, step), storage.fresh_path(target))
  manager.forget(step)
  return target


def restore(
  manager: Manager,
  *,
  abstract_state,
  step: int | None = None,
  set_aside_corrupt: bool = False,
):
  """The train state of `step`, or of the newest intact checkpoint.

  A named step that is corrupt is a CheckpointError. Without a step, corrupt checkpoints are skipped
  with a warning that names each and says why; with set_aside_corrupt (training) each skipped one is
  moved to WORKDIR/corrupt_checkpoints/ so that training can write its step again. Nothing is
  deleted.
  """
  if step is not None:
    return _restore_one(manager, step, abstract_state=abstract_state)
  workdir = storage.parent(str(manager.directory))
  skipped = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      state = _restore_one(manager, candidate, abstract_state=abstract_state)
    except CheckpointError as e:
      skipped.append(str(e))
      note = ""
      if set_aside_corrupt:
        note = f" Moved it to {_set_aside(manager, candidate, workdir)} (kept, not deleted)."
      logging.warning("Skipping a checkpoint: %s%s", e, note)
      continue
    if set_aside_corrupt and skipped:
      _sync_processes("ddpm_jax_set_aside")
      manager.reload()
    return state
  raise CheckpointError(
    f"No intact checkpoint in {manager.directory}: {' '.join(skipped)} Move the folder "
    "away to start from scratch, or restore it from a copy."
  )


def _sync_processes(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def resolve_step(manager: Manager, workdir: str, step: int = -1) -> int:
  """The newest intact step (step = -1) or the named one; a clear error when there is none or it is
  corrupt."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(
      f"No checkpoint found in {checkpoint_dir(workdir)}: train first "
      f"(--mode=train --workdir={workdir}) or point --workdir at a run with checkpoints."
    )
  if step >= 0 and step not in steps:
    raise CheckpointError(
      f"No checkpoint for step {step} in {checkpoint_dir(workdir)}; "
      f"available steps: {sorted(steps)}."
    )
  candidates = [step] if step >= 0 else sorted(steps, reverse=True)
  for candidate in candidates:
    try:
      damage = manager.damage(candidate)
    except FileNotFoundError:
      damage = None  # unrecorded: restore() lets orbax decide
    if not damage:
      return candidate
    where = f"The checkpoint of step {candidate} in {checkpoint_dir(workdir)} is corrupt: {damage}"
    if step >= 0:
      others = [s for s in sorted(steps) if s != step]
      raise CheckpointError(
        f"{where}; choose another step{' (' + ', '.join(map(str, others)) + ')' if others else ''}."
      )
    logging.warning("%s; using an older one.", where)
  raise CheckpointError(
    f"No intact checkpoint in {checkpoint_dir(workdir)}: every one is corrupt "
    "(see the warnings above)."
  )


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir` now (a fresh read-only listing, no
  locks)."""
  if not storage.is_dir(checkpoint_dir(workdir)):
    return []
  return sorted(make_manager(workdir, keep=1, read_only=True).all_steps())


def restore_ema_params(config, workdir: str, *, built, mesh, step: int = -1):
  """The EMA parameters of a checkpoint in `workdir` (the newest intact one when step = -1) and its
  step, after checking that `config` describes the model the checkpoint was trained as."""
  manager = make_manager(workdir, keep=1, read_only=True)
  step = resolve_step(manager, workdir, step)
  saved = read_config(workdir)
  if saved is not None:
    check_compatible(saved, config, source=f"the checkpoint in {workdir}")
  abstract = state_lib.abstract_state(
    built.model, built.tx, shape=state_lib.image_shape(config), mesh=mesh
  )
  state = restore(manager, abstract_state=abstract, step=step)
  return state.ema_params, step


def newest_on_disk(manager: Manager) -> str:
  """A sentence naming the newest committed checkpoint (after any write in flight has finished)."""
  manager.wait_until_finished()
  step = manager.latest_step()
  if step is None:
    return f"There is no checkpoint in {manager.directory} yet."
  return f"The newest checkpoint on disk is step {step} ({_step_dir(manager, step)})."


def _get(config_dict, dotted):
  for part in dotted.split("."):
    config_dict = config_dict.get(part, {}) if isinstance(config_dict, dict) else None
  return config_dict


def _normalise(value):
  return json.loads(json.dumps(value))  # tuples and lists compare equal after a JSON round trip


def check_compatible(saved: dict, config: ml_collections.ConfigDict, *, source: str) -> None:
  """Refuses a config whose model or diffusion settings differ from those a checkpoint was trained
  with."""
  current = config.to_dict()
  diffs = []
  for key in MODEL_KEYS:
    old, new = _normalise(_get(saved, key)), _normalise(_get(current, key))
    if isinstance(old, dict) and isinstance(new, dict):
      diffs += [
        f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k, ADDED_KEYS.get(f"{key}.{k}")) != new.get(k, ADDED_KEYS.get(f"{key}.{k}"))
        and f"{key}.{k}" not in COMPUTE_ONLY_KEYS
      ]
    elif old != new:
      diffs.append(f"{key}: {old!r} -> {new!r}")
  if diffs:
    raise CheckpointError(
      f"The config differs from the one {source} was trained with in "
      f"{', '.join(diffs)}; use a new --workdir or the original settings."
    )


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config as WORKDIR/config.json, atomically (process 0 only)."""
  path = storage.join(storage.resolve(workdir), "config.json")
  if jax.process_index() == 0:
    storage.write_json(path, config.to_dict())
  return path


def read_config(workdir: str) -> dict | None:
  path = storage.join(storage.resolve(workdir), "config.json")
  if not storage.exists(path):
    return None
  try:
    return storage.read_json(path)
  except ValueError as e:
    raise CheckpointError(
      f"{path} is not valid JSON ({e}); restore it from the newest checkpoint's "
      "config item or a copy."
    ) from None
