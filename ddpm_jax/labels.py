"""Class labels of conditional sampling: `config.sampling.labels` -> the label of every sample id.

The label of sample i is `table[i % len(table)]`, a function of i alone (like its noise), so sample
i of a dump is reproducible alone and does not depend on the batch size or the device count.
"all" is an equal share of each class (label i % K), "grid" one row per class of a grid with
`grid_columns` columns, and class ids "1,7,7" repeat in turn.
"""

import math
from collections.abc import Sequence

import numpy as np

from ddpm_jax.errors import ConfigError

SPECS = ("all", "grid")


def parse(spec, *, num_classes: int) -> str | tuple[int, ...]:
  """The spec as 'all', 'grid', or the class ids of a '1,7,7'-style string or a sequence of ints;
  ConfigError for anything else or an id outside [0, num_classes)."""
  if isinstance(spec, str) and spec.strip() in SPECS:
    return spec.strip()
  ids = spec.split(",") if isinstance(spec, str) else spec
  if isinstance(ids, int) and not isinstance(ids, bool):  # --config.sampling.labels=3
    ids = (ids,)
  try:
    if not isinstance(ids, Sequence) or any(isinstance(i, (bool, float)) for i in ids):
      raise ValueError
    ids = tuple(int(i) for i in ids)
  except (TypeError, ValueError):
    ids = ()
  if not ids:
    raise ConfigError(
      f"config.sampling.labels = {spec!r} must be 'all', 'grid' or class ids such as '3' or "
      "'1,7,7'."
    )
  bad = [i for i in ids if not 0 <= i < num_classes]
  if bad:
    raise ConfigError(
      f"config.sampling.labels = {spec!r} holds class {bad[0]}, outside [0, "
      f"config.model.num_classes = {num_classes})."
    )
  return ids


def grid_columns(num_classes: int, num_samples: int) -> int:
  """Columns of a class grid of num_samples images: ceil(N / K), so row k holds class k."""
  return max(1, math.ceil(num_samples / num_classes))


def grid_picture_ids(
  num_classes: int, num_samples: int, *, max_images: int = 256
) -> tuple[np.ndarray, int]:
  """(ids, c): the sample ids, row-major, of a picture of a class grid of num_samples with c columns
  and row k = class k: samples k * ceil(N / K) + j for j < c = min(ceil(N / K), max_images // K)
  (ids past the samples drawn left out, so a short last row ends early). The first max_images
  samples instead would show only the first few classes once N > max_images."""
  ncols = grid_columns(num_classes, num_samples)
  c = max(1, min(ncols, max_images // num_classes))
  ids = (np.arange(num_classes)[:, None] * ncols + np.arange(c)[None, :]).ravel()
  return ids[ids < num_samples], c


def table(spec, *, num_classes: int, num_samples: int) -> np.ndarray:
  """The int32 label table of a spec: sample i has label table[i % len(table)]."""
  parsed = parse(spec, num_classes=num_classes)
  if parsed == "all":
    return np.arange(num_classes, dtype=np.int32)
  if parsed == "grid":
    return np.repeat(np.arange(num_classes, dtype=np.int32), grid_columns(num_classes, num_samples))
  return np.asarray(parsed, np.int32)


def of_ids(label_table, ids):
  """The labels [B] of sample ids [B] (NumPy or JAX arrays alike)."""
  return label_table[ids % len(label_table)]


def describe(spec) -> str:
  """A folder-name-safe form of a spec: 'all', 'grid', '1-7-7'."""
  if isinstance(spec, str):
    return spec.strip().replace(",", "-").replace(" ", "")
  if isinstance(spec, int):
    return str(spec)
  return "-".join(str(int(i)) for i in spec)
