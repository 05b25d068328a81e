"""The file layer: every file a run reads or writes (its workdir, a TFDS data dir, FID statistics,
Inception weights, an export target) goes through here, on a local disk or in a gs:// bucket alike.

Built on etils.epath, the path library orbax and TFDS use, so one process reaches a bucket one way.
Local paths keep their POSIX guarantees: an atomic write is a temporary file, fsync and a rename,
and moving a folder is one rename. On an object store an object appears whole when its upload
ends (a write is atomic as it is), and moving a folder copies then deletes each object.

Storage failures leave here as OSError with one sentence (where it happened, and why), whatever the
backend raised (gcsfs reports HTTP and connection failures with its own exception types).
"""

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import posixpath
import uuid

import numpy as np
from etils import epath

from ddpm_jax.errors import ConfigError

_CHUNK = 1 << 20  # bytes read at a time when hashing or copying
_GCS_EXTRA = "pip install 'ddpm-jax[gcs]'"


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://bucket/...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """An absolute local path (with ~ expanded), or the URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(*parts) -> str:
  """Joins path parts; a URL is joined with '/', whatever the operating system."""
  first = os.fspath(parts[0])
  return (
    posixpath.join(first, *map(os.fspath, parts[1:])) if is_remote(first) else os.path.join(*parts)
  )


def parent(path) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def name(path) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/"))


def check_supported(path, *, what: str) -> None:
  """ConfigError unless `path` is local or a gs:// URL that this installation can reach."""
  path = os.fspath(path)
  if not is_remote(path):
    return
  if not path.startswith("gs://"):
    raise ConfigError(
      f"{what} = {path!r}: only local paths and gs:// URLs are supported "
      f"(scheme {path.split('://')[0]!r})."
    )
  if importlib.util.find_spec("gcsfs") is None:
    raise ConfigError(f"{what} = {path!r} is a gs:// URL, which needs gcsfs: {_GCS_EXTRA}.")


def check_reachable(p, *, what: str) -> None:
  """For a gs:// URL: OSError with one sentence now, before any work, when its bucket does not
  exist, may not be read, or cannot be reached (nothing to check for a local path)."""
  if not is_remote(p):
    return
  bucket = os.fspath(p).split("://", 1)[1].split("/", 1)[0]
  with errors(f"reach the bucket of {what} = {p}"):
    found = path(f"gs://{bucket}").exists()
  if not found:
    raise OSError(
      f"{what} = {p}: the bucket gs://{bucket} does not exist (or these credentials cannot see "
      f"it); create it first (gcloud storage buckets create gs://{bucket})."
    )


# How object stores answer: gcsfs's messages, TensorStore's status codes, aiohttp's errors.
_REMOTE_REASONS = (
  (("Forbidden", "PERMISSION_DENIED", "403"), "permission denied"),
  (("Unauthorized", "UNAUTHENTICATED", "401"), "the credentials were refused"),
  (
    ("Cannot connect", "Connection refused", "Connect call failed", "UNAVAILABLE"),
    "the storage service cannot be reached",
  ),
  (("DEADLINE_EXCEEDED", "Timeout"), "the storage service did not answer in time"),
  (("NOT_FOUND", "No such bucket", "404"), "not found"),
)


def remote_reason(error: BaseException) -> str | None:
  """A short reason for an object store's refusal or silence, from the exception's first line (None
  when it is not one of those)."""
  first = (str(error).strip().splitlines() or [""])[0][:300]
  for markers, reason in _REMOTE_REASONS:
    if any(marker in first for marker in markers):
      return f"{reason} ({first})"
  return None


def _reason(error: BaseException) -> str:
  """A one-line reason for a storage failure, from the backend's exception."""
  remote = remote_reason(error)
  if remote is not None:
    return remote
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def errors(what: str):
  """Turns any storage failure inside the block into OSError('Could not WHAT: reason.')."""
  try:
    yield
  except ConfigError:
    raise
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"Could not {what}: no such file, folder or bucket ({_reason(e)})."
    ) from None
  # gcsfs, aiohttp and google-auth raise their own types
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, (AssertionError, TypeError, NameError, AttributeError)):
      raise  # a bug, not storage
    raise OSError(f"Could not {what}: {_reason(e)}.") from None


def path(p) -> epath.Path:
  """The epath.Path of a local path or URL (local paths absolute)."""
  return epath.Path(resolve(p))


# ----------------------------------------------------------------------------- looking


def exists(p) -> bool:
  with errors(f"look for {p}"):
    return path(p).exists()


def is_dir(p) -> bool:
  with errors(f"look for the folder {p}"):
    return path(p).is_dir()


def is_file(p) -> bool:
  with errors(f"look for the file {p}"):
    return path(p).is_file()


def list_names(p) -> list[str]:
  """Sorted names of the entries of folder `p`; [] when it does not exist."""
  with errors(f"list {p}"):
    folder = path(p)
    if not folder.is_dir():
      return []
    return sorted(child.name for child in folder.iterdir())


def _key(p) -> str:
  """A path without its scheme: how backends name the roots they walk (gcsfs: 'bucket/...')."""
  p = os.fspath(p)
  return (p.split("://", 1)[1] if "://" in p else p).rstrip("/")


def files_under(p) -> list[str]:
  """Sorted paths, relative to `p` and '/'-separated, of every file anywhere under folder `p`."""
  base, found = _key(resolve(p)), []
  with errors(f"list the files under {p}"):
    for root, _, names in path(p).walk():
      relative = _key(root)[len(base) :].strip("/").replace(os.sep, "/")
      found += [f"{relative}/{n}" if relative else n for n in names]
  return sorted(found)


def size(p) -> int:
  with errors(f"read the size of {p}"):
    return int(path(p).stat().length)


def identity(p):
  """What tells a local folder from its replacement ((device, inode)), or None when it is missing.

  Object stores have no folders to replace: a URL's identity is the URL while anything is under it.
  """
  if is_remote(p):
    return resolve(p) if exists(p) else None
  try:
    info = os.stat(resolve(p))
  except FileNotFoundError:
    return None
  return info.st_dev, info.st_ino


# ----------------------------------------------------------------------------- reading


def read_bytes(p) -> bytes:
  with errors(f"read {p}"):
    return path(p).read_bytes()


def read_text(p) -> str:
  with errors(f"read {p}"):
    return path(p).read_text()


def read_json(p):
  """The JSON value in file `p` (ValueError when it is not valid JSON)."""
  return json.loads(read_text(p))


def open_read(p):
  """A binary file object reading `p` (streamed, for large files); use it as a context manager."""
  with errors(f"open {p}"):
    return path(p).open("rb")


def load_npz(p) -> dict:
  """Every array of an .npz file (no pickles), read in one request."""
  data = read_bytes(p)
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {key: npz[key] for key in npz.files}


def sha256(p) -> str:
  """The SHA-256 hex digest of a file, streamed in 1 MiB chunks (nothing is copied locally)."""
  digest = hashlib.sha256()
  with errors(f"read {p}"), path(p).open("rb") as f:
    for chunk in iter(functools.partial(f.read, _CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def make_dirs(p) -> str:
  """Creates folder `p` and its parents (object stores have no folders: nothing to do there)."""
  if not is_remote(p):
    with errors(f"create the folder {p}"):
      os.makedirs(resolve(p), exist_ok=True)
  return resolve(p)


def write_bytes(p, data: bytes) -> str:
  """Writes `data` to `p` atomically: readers see the old file or the whole new one, never a part.

  Locally: a temporary file beside it, fsync, rename. In a bucket: one object upload, which is
  visible only once complete.
  """
  target = resolve(p)
  if is_remote(target):
    with errors(f"write {target}"):
      path(target).write_bytes(data)
    return target
  make_dirs(parent(target))
  tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
  with errors(f"write {target}"):
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return target


def write_text(p, text: str) -> str:
  return write_bytes(p, text.encode())


def write_json(p, value, *, indent: int = 2) -> str:
  """JSON (keys sorted), written atomically."""
  return write_text(p, json.dumps(value, indent=indent, sort_keys=True))


def save_npz(p, **arrays) -> str:
  """np.savez into memory, then one atomic write (zip files need seeking, which uploads lack)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(p, buffer.getvalue())


def append_bytes(p, data: bytes) -> None:
  """Appends to a local file (created when missing); objects cannot be appended to (`summaries`)."""
  assert not is_remote(p), p
  with errors(f"write {p}"), open(resolve(p), "ab") as f:
    f.write(data)


# ----------------------------------------------------------------------------- moving and removing


def move(src, dst) -> str:
  """Moves a file or folder to `dst` (which must not exist): a rename locally; in a bucket a copy
  then a delete of each object."""
  src, dst = resolve(src), resolve(dst)
  if not is_remote(src) and not is_remote(dst):
    with errors(f"move {src} to {dst}"):
      os.makedirs(parent(dst), exist_ok=True)
      os.rename(src, dst)
    return dst
  with errors(f"move {src} to {dst}"):
    if path(src).is_file():
      path(src).copy(path(dst))
      path(src).unlink()
      return dst
  for name in files_under(src):  # every object copied before any is deleted
    with errors(f"copy {src}/{name} to {dst}"):
      path(join(src, name)).copy(path(join(dst, name)))
  remove_tree(src)
  return dst


def remove_tree(p) -> None:
  """Deletes a folder and everything under it (nothing when it does not exist)."""
  with errors(f"delete {p}"):
    folder = path(p)
    if folder.exists():
      folder.rmtree()


def fresh_path(p) -> str:
  """`p`, or the first of `p_1`, `p_2`, ... that does not exist: nothing earlier is overwritten."""
  candidate, i = resolve(p), 0
  while exists(candidate):
    i += 1
    candidate = f"{resolve(p)}_{i}"
  return candidate
