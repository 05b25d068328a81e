"""User mistakes: the one exception family `main` shows as a single sentence without a traceback.

Anything else that goes wrong is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A config value, flag or path the user can fix; the message names it."""


class DatasetError(ConfigError):
  """A data configuration the pipeline cannot serve; the message says which key or path to fix."""


class CheckpointError(ConfigError):
  """A missing, incompatible or unreadable checkpoint."""
