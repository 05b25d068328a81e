"""What the command line shows: a config file that fails to import as one sentence, and a quiet
start-up.

Only `main` calls these: they replace a flag's parser, redirect file descriptor 2 for a moment,
and install logging filters and exception hooks for the whole process. (`data` borrows
`native_stderr_hidden` for TensorFlow's import.)
"""

import contextlib
import logging as std_logging
import os
import sys
import threading
import traceback

import ml_collections
from absl import logging


class ConfigFileError(Exception):
  """A config file that cannot be imported or whose get_config() fails; shown as one sentence."""


def _failure_site(path: str, error: BaseException) -> str:
  """'FILE, line N (`code`): Type: message' at the config file's innermost frame (else the innermost
  frame)."""
  message = (str(error).strip().splitlines() or [""])[0]
  if isinstance(error, SyntaxError) and error.filename:
    filename, lineno, code, message = error.filename, error.lineno, error.text, error.msg
  else:
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)] or frames
    filename, lineno, code = (
      (mine[-1].filename, mine[-1].lineno, mine[-1].line) if mine else (path, "?", "")
    )
  code = f" (`{code.strip()}`)" if code and code.strip() else ""
  return f"{filename}, line {lineno}{code}: {type(error).__name__}: {message}".rstrip(": ")


def checked_config_parser(parser):
  """ml_collections' config-file parser (`parser`), raising ConfigFileError with the file and line
  when the file is missing, does not compile, or its get_config() raises or returns something
  else."""

  class CheckedParser(type(parser)):
    def parse(self, path):
      file = path.split(":", 1)[0]
      if not os.path.isfile(file):
        raise ConfigFileError(f"--config={path}: there is no file {file!r}.")
      try:
        config = super().parse(path)
      except Exception as e:  # pylint: disable=broad-except
        # ml_collections re-raises TypeError/ValueError with the traceback as text; report the
        # original.
        original = (e.__context__ or e) if "Error whilst parsing" in str(e) else e
        raise ConfigFileError(
          f"The config file {file} failed at {_failure_site(file, original)}."
        ) from None
      if not isinstance(config, ml_collections.ConfigDict):
        deferred = getattr(
          config, "_error", None
        )  # ml_collections defers an OSError of get_config to first use
        if deferred is not None:
          raise ConfigFileError(
            f"The config file {file} failed at {_failure_site(file, deferred)}."
          )
        raise ConfigFileError(
          f"get_config() in {file} returned {type(config).__name__}, not a ConfigDict."
        )
      return config

  checked = CheckedParser.__new__(CheckedParser)
  checked.__dict__.update(parser.__dict__)  # the same name and lock_config as the flag's own parser
  return checked


@contextlib.contextmanager
def native_stderr_hidden(hide: bool = True):
  """Sends what native libraries write to file descriptor 2 meanwhile (TensorFlow's start-up lines)
  to /dev/null."""
  if not hide:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _is_background_noise(record: std_logging.LogRecord) -> bool:
  """orbax's reports (start-up notes, per-save chatter, and its threads' tracebacks when a write
  fails, after which the main thread raises one sentence) and asyncio's 'Task exception was never
  retrieved'."""
  return "/orbax/" in record.pathname or record.name == "asyncio"


def _from_background(tb) -> bool:
  return any(
    "/orbax/" in f.filename or "/asyncio/" in f.filename
    for f in (traceback.extract_tb(tb) if tb else [])
  )


def quiet_background(verbose: bool) -> None:
  """Imports TensorFlow (for TFDS) with its start-up lines hidden unless verbose; unless verbose,
  also drops orbax's, asyncio's and gcsfs's log records and the exceptions that orbax's
  threads leave behind when a write fails (event loop closed, interpreter shutting down). Errors
  reach the user as the one sentence the main thread raises."""
  with native_stderr_hidden(not verbose):
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    except ImportError:
      pass
  if verbose:
    return
  logging.get_absl_handler().addFilter(lambda record: not _is_background_noise(record))
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  # gcsfs logs each failed request with its traceback; the failure reaches the user as a sentence.
  std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
  unraisable_hook, thread_hook, except_hook = (
    sys.unraisablehook,
    threading.excepthook,
    sys.excepthook,
  )
  sys.unraisablehook = lambda info: (
    None if _from_background(info.exc_traceback) else unraisable_hook(info)
  )
  threading.excepthook = lambda args: (
    None if _from_background(args.exc_traceback) else thread_hook(args)
  )

  def excepthook(kind, value, tb):  # TensorStore's threads print a failed asyncio callback this way
    if threading.current_thread() is threading.main_thread() or not _from_background(tb):
      except_hook(kind, value, tb)

  sys.excepthook = excepthook


def quiet_command_line(verbose: bool) -> None:
  """What every command line of the package shows: its own INFO lines and everyone's warnings (not
  JAX's backend probing, orbax's every save, gcsfs's caches), and `quiet_background`."""
  quiet_background(verbose)
  if verbose:
    return
  ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
  logging.get_absl_handler().addFilter(
    lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(ours)
  )


def unknown_key_sentence(error: BaseException) -> str:
  """One sentence for a misspelt --config.a.b override (ml_collections raises a KeyError, or an
  AttributeError holding one, whose text is a repr with a newline and a suggestion)."""
  while isinstance(error, (KeyError, AttributeError)) and error.args:
    inner = error.args[0]
    if not isinstance(inner, BaseException):
      break
    error = inner
  text = str(error.args[0]) if error.args else str(error)
  text = " ".join(text.replace("'", "").split())
  return f"unknown config key in the command line overrides: {text}"
