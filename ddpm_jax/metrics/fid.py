"""FID and Inception Score from Inception outputs: streamed statistics, stats files, the two
metrics.

Statistics are accumulated as float64 sums (count, sum, sum of outer products), so 50,000 features
never need to be held at once; the covariance is the unbiased one (np.cov), as in TTUR and
pytorch-fid. A stats file records the convention its numbers depend on (`CONVENTION_KEYS`), and two
statistics whose conventions differ are never compared.
"""

import json
import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.special
import tqdm
from absl import logging

from ddpm_jax import errors
from ddpm_jax import storage

STATS_FORMAT = "ddpm_jax-fid-stats-v1"
# Splits of the Inception Score by default: torch-fidelity's (and most tools'); the paper's TF code
# scored all samples at once (1 split).
IS_SPLITS = 10
# Metadata that changes pool3 statistics: comparing across different values is meaningless.
CONVENTION_KEYS = ("weights_hash", "resize")


class FeatureSums(NamedTuple):
  """Running float64 sums of features x: n, sum x, sum x x^T."""

  count: int
  total: np.ndarray
  total_outer: np.ndarray


class Stats(NamedTuple):
  """Mean and covariance of pool3 features, the number of images, and the recorded metadata."""

  mu: np.ndarray
  sigma: np.ndarray
  count: int
  meta: dict


def feature_sums(dim: int = 2048) -> FeatureSums:
  return FeatureSums(0, np.zeros(dim), np.zeros((dim, dim)))


def accumulate(sums: FeatureSums, features) -> FeatureSums:
  """Adds a chunk of features [n, dim] to the sums."""
  x = np.asarray(features, np.float64)
  assert x.ndim == 2 and x.shape[1] == sums.total.shape[0], (x.shape, sums.total.shape)
  return FeatureSums(sums.count + len(x), sums.total + x.sum(0), sums.total_outer + x.T @ x)


def mean_and_cov(sums: FeatureSums) -> tuple[np.ndarray, np.ndarray]:
  """The mean and the unbiased covariance (divisor n - 1) of everything accumulated."""
  if sums.count < 2:
    raise errors.ConfigError(f"FID statistics need at least 2 images, got {sums.count}.")
  mu = sums.total / sums.count
  sigma = (sums.total_outer - sums.count * np.outer(mu, mu)) / (sums.count - 1)
  return mu, (sigma + sigma.T) / 2


def stats_from_sums(sums: FeatureSums, *, meta: dict) -> Stats:
  mu, sigma = mean_and_cov(sums)
  return Stats(mu, sigma, sums.count, dict(meta, count=sums.count))


def stats_from_features(features, *, meta: dict) -> Stats:
  return stats_from_sums(accumulate(feature_sums(np.shape(features)[1]), features), meta=meta)


def stats_and_logits(
  feature_fn, batches, *, meta: dict, total: int | None = None, progress: bool = False
):
  """Streams uint8 image batches through `feature_fn` (inception.make_feature_fn): (Stats, IS
  logits).

  Only the running sums and the IS logits (None without a classifier) are kept, never the images.
  """
  sums, logits = None, []
  with tqdm.tqdm(total=total, unit="img", desc="Inception", disable=not progress) as bar:
    for batch in batches:
      pool3, batch_logits = feature_fn(batch)
      sums = accumulate(sums if sums is not None else feature_sums(pool3.shape[1]), pool3)
      if batch_logits is not None:
        logits.append(batch_logits)
      bar.update(len(batch))
  if sums is None:
    raise errors.ConfigError(
      f"No images to compute statistics of ({meta.get('dataset', 'input')})."
    )
  return stats_from_sums(sums, meta=meta), (np.concatenate(logits) if logits else None)


# ---------------------------------------------------------------------------------------------
# Stats files.


def save_stats(path: str, stats: Stats | FeatureSums, *, meta: dict | None = None) -> str:
  """Writes mu, sigma, count and the metadata (JSON) as .npz.

  `meta` should name at least the convention (`CONVENTION_KEYS`) and what the images are (dataset,
  split, ...); for a `Stats`, it is merged over the stats' own metadata.
  """
  if isinstance(stats, FeatureSums):
    stats = stats_from_sums(stats, meta=meta or {})
  else:
    stats = stats._replace(meta=dict(stats.meta, **(meta or {})))
  missing = [k for k in CONVENTION_KEYS if k not in stats.meta]
  if missing:
    raise errors.ConfigError(
      f"Statistics for {path!r} lack the convention keys {missing} in their metadata."
    )
  return storage.save_npz(
    path,
    format=np.array(STATS_FORMAT),
    mu=stats.mu,
    sigma=stats.sigma,
    count=np.array(stats.count),
    meta=np.array(json.dumps(stats.meta, sort_keys=True)),
  )


def is_stats_file(path: str) -> bool:
  """True for a .npz with `mu` and `sigma` (this project's stats, or TTUR / pytorch-fid ones)."""
  try:
    npz = storage.load_npz(path)
  except (OSError, ValueError, EOFError):
    return False
  return "mu" in npz and "sigma" in npz


def load_stats(path: str) -> Stats:
  """Reads a stats .npz. Files of other tools (mu and sigma only) load with empty metadata, which
  `check_same_convention` refuses unless told to trust them."""
  try:
    npz = storage.load_npz(path)
    if not {"mu", "sigma"} <= set(npz):
      raise errors.ConfigError(f"{path!r} is not a statistics file: it has no 'mu' and 'sigma'.")
    mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
    meta = json.loads(str(npz["meta"])) if "meta" in npz else {}
    count = int(npz["count"]) if "count" in npz else int(meta.get("count", 0))
  except (OSError, EOFError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"{path!r} is not a readable statistics .npz ({e}).") from None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise errors.ConfigError(
      f"{path!r}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance."
    )
  return Stats(mu, sigma, count, dict(meta, source=path))


def check_same_convention(a: Stats, b: Stats, *, trust_unlabelled: bool = False) -> None:
  """Refuses (ConfigError naming the key and both values) statistics computed under different
  conventions.

  With `trust_unlabelled`, a side that records no convention at all (another tool's file) is
  accepted.
  """
  for stats in (a, b):
    if not any(k in stats.meta for k in CONVENTION_KEYS) and not trust_unlabelled:
      raise errors.ConfigError(
        f"Statistics {_name(stats)} record no Inception weights hash or resize convention, "
        "so they cannot be checked against the other side; recompute them with this "
        "project, or pass --trust_unlabelled_stats if you know they match."
      )
  if not all(any(k in s.meta for k in CONVENTION_KEYS) for s in (a, b)):
    return
  for key in CONVENTION_KEYS:
    if a.meta.get(key) != b.meta.get(key):
      raise errors.ConfigError(
        f"The statistics differ in {key}: {a.meta.get(key)!r} ({_name(a)}) vs "
        f"{b.meta.get(key)!r} ({_name(b)}); FID between them would be meaningless."
      )


def _name(stats: Stats) -> str:
  return str(stats.meta.get("source") or stats.meta.get("dataset") or "(unnamed)")


# ---------------------------------------------------------------------------------------------
# The metrics.


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

  As TTUR and pytorch-fid: when the square root of the product is not finite (a singular product),
  eps * I is added to both covariances; a complex square root is accepted, as its real part, only
  when the imaginary part of its diagonal is negligible (< 1e-3), else it is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise errors.ConfigError(
      f"Mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}."
    )
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning(
      "FID: the product of the covariances is singular; adding %g to their diagonals.", eps
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.abs(np.diagonal(covmean).imag).max()
    if imaginary > 1e-3:
      raise ValueError(
        f"FID: the square root of the covariance product has an imaginary component "
        f"{imaginary:.3g}; the statistics are not valid covariances."
      )
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a):
  """scipy's matrix square root; its warning for singular input is the caller's business."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(a)


def fid_from_stats(a: Stats, b: Stats, *, trust_unlabelled: bool = False) -> float:
  """FID between two statistics, after checking that they were computed under the same
  convention."""
  check_same_convention(a, b, trust_unlabelled=trust_unlabelled)
  dim = a.mu.shape[0]
  for stats in (a, b):
    if 0 < stats.count <= dim:
      logging.warning(
        "FID from %d images of %s, not more than the %d feature dimensions: its covariance is "
        "singular and the value is biased (the paper uses 50,000 samples).",
        stats.count,
        _name(stats),
        dim,
      )
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(
  logits, splits: int = 10, *, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) of IS logits [N, 1008], as torch-fidelity computes
  it.

  The logits are pool3 @ W without the bias (torch-fidelity's `logits_unbiased`, the OpenAI code's
  choice); rows are shuffled with `np.random.RandomState(seed).permutation` first (torch-fidelity's
  default, seed 2020); split i is rows [i N // splits, (i + 1) N // splits); each split scores
  exp(mean_x KL(p(y|x) || mean p(y))); the std is NumPy's (ddof 0).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise errors.ConfigError(
      f"The Inception Score needs at least {splits} rows of logits, got shape {logits.shape}."
    )
  n = len(logits)
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(n)]
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    chunk = log_p[i * n // splits : (i + 1) * n // splits]
    log_marginal = np.log(np.exp(chunk).mean(axis=0, keepdims=True))
    kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
