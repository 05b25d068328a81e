"""--mode=fid: FID against the reference statistics of each dataset split named in
config.evaluation.fid_reference_splits, and the Inception Score, of a checkpoint's EMA samples.

Conventions (recorded in every result file):
- FID: pool3 of the TF Inception graph of 2015-12-05 (the paper's), its own bilinear resize to 299
  (`fid_resize = "tf"`), statistics of the whole split. The samples reach the network rounded to
  uint8, as image files hold them (`fid_input = "uint8"`, what pytorch-fid and torch-fidelity see
  from files), or unrounded (`fid_input = "float"`, clipped to [0, 255]: what the paper's TF code
  fed the network).
- Inception Score: softmax of the logits without the classifier's bias, rows shuffled with
  RandomState(2020), `is_splits` splits: 10 is torch-fidelity's convention (the default), 1 the
  paper's (TF-GAN's score over all samples at once).

Samples are drawn chunk by chunk into WORKDIR/eval (resumable: a rerun keeps every finished chunk),
and sample i depends only on the seed and i, as in --mode=sample. A class-conditional model's
samples are class-balanced (sample i asks for class i % num_classes) and guided with
config.sampling.guidance_scale; both are recorded.
"""

import hashlib

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import checkpoint
from ddpm_jax import data
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib
from ddpm_jax import storage
from ddpm_jax import validation
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import results
from ddpm_jax.evaluation import samples as samples_lib
from ddpm_jax.metrics import fid as fid_lib
from ddpm_jax.metrics import inception

FID_INPUTS = ("uint8", "float")
FID_LABELS = "all"  # a conditional model's FID samples: an equal share of each class
_HOW_TO_GET_WEIGHTS = (
  "get the standard weights file and convert it once with `python -m "
  "ddpm_jax.metrics.convert_inception SRC OUT.npz` (docs/evaluation.md, 'Inception weights')"
)


def conventions(config) -> dict:
  """What the numbers of a result follow, in words (stored in the result file)."""
  ev = config.evaluation
  rounded = {
    "uint8": "samples rounded to uint8, as image files hold them",
    "float": "unrounded float samples clipped to [0, 255], as the paper's TF code fed them",
  }[ev.fid_input]
  splits = int(ev.is_splits)
  return {
    "fid": f"pool3 of the TF Inception graph 2015-12-05, resize {ev.fid_resize!r}, {rounded}",
    "inception_score": (
      f"softmax of the logits without bias over {splits} split{'s' * (splits > 1)} "
      + ("(the paper's TF-GAN convention)" if splits == 1 else "(torch-fidelity's convention)")
    ),
  }


def _inception_score_record(logits, splits: int) -> dict:
  """{"inception_score": {mean, std, splits}} of IS logits, or None and a note saying why not."""
  if logits is None:
    return {
      "inception_score": None,
      "inception_score_note": "unavailable: the Inception weights have no classifier (pool3 only); "
      "convert a file with logits (pytorch-fid / torch-fidelity .pth)",
    }
  if len(logits) < splits:
    return {
      "inception_score": None,
      "inception_score_note": f"unavailable: fewer samples ({len(logits)}) than splits ({splits})",
    }
  mean, std = fid_lib.inception_score(logits, splits)
  return {"inception_score": {"mean": mean, "std": std, "splits": splits}}


def stats_dir(config, workdir: str) -> str:
  """Where reference statistics are cached: config.evaluation.stats_dir, or fid_stats/ beside
  WORKDIR (shared by the runs there)."""
  return config.evaluation.stats_dir or storage.join(storage.parent(workdir), "fid_stats")


class FidEvaluator:
  """FID and IS of any checkpoint's EMA samples; the sampler and the network are compiled once."""

  def __init__(self, config, workdir: str, *, built, mesh, scalars: results.Scalars):
    self.config, self.workdir, self.built, self.mesh = config, workdir, built, mesh
    self.scalars = scalars
    self._sample_fn = self._inception = None

  def sampler_record(self) -> dict:
    """The sampler's record; a conditional model's FID samples are class-balanced (labels 'all':
    sample i asks for class i % num_classes)."""
    return sampling.record(self.config, labels=FID_LABELS)

  def prepare(self) -> None:
    """Loads the Inception weights and sizes each reference split now: a missing file or an unknown
    split fails before any sample is drawn."""
    for split in self.config.evaluation.fid_reference_splits:
      self._reference_count(split)
    self._load_inception()

  def _load_inception(self):
    """(InceptionParams, feature_fn), loaded once; a missing weights file is one sentence."""
    if self._inception is not None:
      return self._inception
    ev = self.config.evaluation
    if not ev.inception_weights:
      raise ConfigError(
        "FID needs the Inception weights: set --config.evaluation.inception_weights=PATH.npz; "
        f"{_HOW_TO_GET_WEIGHTS}."
      )
    if not storage.is_file(ev.inception_weights):
      raise ConfigError(
        f"config.evaluation.inception_weights = {ev.inception_weights!r} does not exist; "
        f"{_HOW_TO_GET_WEIGHTS}."
      )
    try:
      params = inception.load_params(ev.inception_weights)
    except ValueError as e:
      raise ConfigError(f"config.evaluation.inception_weights: {e}") from None
    feature_fn = inception.make_feature_fn(
      params, resize=ev.fid_resize, mesh=self.mesh, batch_size=ev.batch_size
    )
    self._inception = (params, feature_fn)
    return self._inception

  def _reference_count(self, split: str) -> int:
    ev = self.config.evaluation
    size = len(data.load_images(self.config.data, split=split))
    if ev.num_fid_reference > size:
      raise ConfigError(
        f"config.evaluation.num_fid_reference = {ev.num_fid_reference} exceeds the {size} images "
        f"of split {split!r} of {self.config.data.dataset!r}."
      )
    count = ev.num_fid_reference or size
    if count % jax.process_count():
      raise ConfigError(
        f"{count} reference images of split {split!r} do not split evenly over "
        f"{jax.process_count()} processes; set config.evaluation.num_fid_reference to a multiple."
      )
    return count

  def _dataset_id(self) -> str:
    c = self.config.data
    if c.dataset == "image_folder":
      digest = hashlib.sha256(storage.resolve(c.image_folder).encode()).hexdigest()[:10]
      return f"folder-{digest}"
    return c.dataset.replace("/", "-")

  def reference_stats(self, split: str):
    """The pool3 statistics of a dataset split: read from the cache, or computed once and cached.

    The cache file's name and its recorded metadata both carry the convention (dataset, split, image
    count, image size, weights hash, resize); a file whose metadata differs from what is needed is
    an error.
    """
    params, feature_fn = self._load_inception()
    ev, c = self.config.evaluation, self.config.data
    count = self._reference_count(split)
    meta = {
      "dataset": self._dataset_id(),
      "split": split,
      "count": count,
      "image_size": int(c.image_size),
      "num_channels": int(c.num_channels),
      "weights_hash": params.weights_hash,
      "resize": ev.fid_resize,
    }
    if c.dataset == "image_folder":
      meta["image_folder"] = storage.resolve(c.image_folder)
    path = storage.join(
      stats_dir(self.config, self.workdir),
      f"{meta['dataset']}_{split}_{c.image_size}px_n{count}_"
      f"{ev.fid_resize}_{params.weights_hash}.npz",
    )
    if storage.exists(path):
      try:
        stats = fid_lib.load_stats(path)
      except ValueError as e:
        raise ConfigError(
          f"Cached reference statistics {path}: {e} Move the file away to recompute it."
        ) from None
      diffs = [
        f"{k} = {stats.meta.get(k)!r} (needed: {v!r})"
        for k, v in meta.items()
        if stats.meta.get(k) != v
      ]
      if diffs:
        raise ConfigError(
          f"Cached reference statistics {path} record {', '.join(diffs)}; they are not used "
          "silently: move the file away to recompute it, or set config.evaluation.stats_dir "
          "elsewhere."
        )
      logging.info(
        "Reference statistics of %s/%s (%d images) from the cache %s.",
        c.dataset,
        split,
        count,
        path,
      )
      return stats, path
    logging.info(
      "Computing reference statistics of %s/%s (%d images, once; cached in %s).",
      c.dataset,
      split,
      count,
      path,
    )
    batches = (
      parallel.process_rows(b)
      for b in data.eval_batches(c, split=split, batch_size=ev.batch_size, num_examples=count)
    )
    stats, _ = fid_lib.stats_and_logits(
      feature_fn, batches, meta=meta, total=count, progress=jax.process_index() == 0
    )
    if jax.process_index() == 0:
      fid_lib.save_stats(path, stats)
    return stats, path

  def samples_dir(self, step: int) -> str:
    """eval/fid_<step>_<sampler>_seed<seed> (+ '_float' for unrounded samples)."""
    ev = self.config.evaluation
    tag = sampling.tag(self.sampler_record())
    suffix = "" if ev.fid_input == "uint8" else f"_{ev.fid_input}"
    return storage.join(
      results.eval_dir(self.workdir), f"fid_{step}_{tag}_seed{self.config.seed}{suffix}"
    )

  def sample_chunks(self, params, step: int) -> tuple[str, list[str]]:
    """Draws the FID samples into samples_dir/chunk_<first>_<end>.npz, keeping every chunk already
    on disk (never re-drawn). Returns the folder and the chunk paths in order."""
    ev, c = self.config.evaluation, self.config.sampling
    out = self.samples_dir(step)
    settings = {
      "step": step,
      "seed": int(self.config.seed),
      "sampler": self.sampler_record(),
      "clip_denoised": bool(c.clip_denoised),
      "image_shape": list(state_lib.image_shape(self.config)),
    }
    if ev.fid_input != "uint8":
      settings["fid_input"] = ev.fid_input
    results.check_parts_dir(out, settings, what="samples")
    n, size = int(ev.num_fid_samples), int(ev.sample_chunk_size)
    ranges = [(start, min(start + size, n)) for start in range(0, n, size)]
    paths = [storage.join(out, f"chunk_{a:07d}_{b:07d}.npz") for a, b in ranges]
    missing = np.array([not storage.exists(p) for p in paths])
    if (
      jax.process_count() > 1
    ):  # every process must draw the same chunks (process 0's view decides)
      missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    todo = int(sum(b - a for (a, b), m in zip(ranges, missing) if m))
    logging.info(
      "FID samples of step %d in %s: %d of %d to draw (%d chunks kept).",
      step,
      out,
      todo,
      n,
      int((~missing).sum()),
    )
    if todo:
      if self._sample_fn is None:
        self._sample_fn = sampling.from_config(
          self.config,
          self.built,
          self.mesh,
          as_uint8=ev.fid_input == "uint8",
          label_table=sampling.config_label_table(self.config, spec=FID_LABELS),
        )
      with tqdm.tqdm(
        total=todo, unit="img", desc="sampling", disable=jax.process_index() != 0
      ) as bar:
        for (first, end), path, draw in zip(ranges, paths, missing):
          if draw:
            chunk = self._draw(params, first, end, progress=bar.update)
            if jax.process_index() == 0:
              storage.save_npz(path, arr_0=chunk, first_id=np.array(first))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("fid sample chunks written")
    return out, paths

  def _draw(self, params, first: int, end: int, *, progress) -> np.ndarray:
    """Samples first .. end-1 in batches of config.sampling.batch_size (the last one cut): uint8
    NHWC, or float32 in [0, 255] unrounded."""
    batch_size = self.config.sampling.batch_size
    key = samples_lib.sample_key(self.config)
    out = []
    for start in range(first, end, batch_size):
      ids = sampling.sample_ids(start, batch_size, self.mesh)
      batch = parallel.to_host(self._sample_fn(params, key, ids))[: end - start]
      if batch.dtype != np.uint8:
        batch = np.clip((batch.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)
      out.append(batch)
      progress(len(out[-1]))
    return np.concatenate(out)

  def run(self, params, step: int) -> str:
    """Writes eval/fid_<step>_<sampler>.json (FID vs each reference split, IS), a grid and
    TensorBoard scalars; returns the JSON path (on process 0; "" elsewhere)."""
    ev = self.config.evaluation
    inception_params, feature_fn = self._load_inception()
    references = {split: self.reference_stats(split) for split in ev.fid_reference_splits}
    samples_dir, paths = self.sample_chunks(params, step)

    grid = []

    def chunks():
      for path in paths:
        chunk = storage.load_npz(path)["arr_0"]
        if len(grid) < 100:
          grid.extend(np.round(chunk[: 100 - len(grid)]).astype(np.uint8))
        yield parallel.process_rows(chunk)

    record = self.sampler_record()
    meta = {
      "dataset": "samples",
      "step": step,
      "sampler": record,
      "weights_hash": inception_params.weights_hash,
      "resize": ev.fid_resize,
    }
    stats, logits = fid_lib.stats_and_logits(
      feature_fn,
      chunks(),
      meta=meta,
      total=int(ev.num_fid_samples),
      progress=jax.process_index() == 0,
    )
    try:
      fids = {split: fid_lib.fid_from_stats(stats, ref) for split, (ref, _) in references.items()}
    except ValueError as e:
      raise ConfigError(f"FID of step {step}: {e}") from None
    result = {
      "step": step,
      "num_samples": stats.count,
      "sampler": record,
      "seed": int(self.config.seed),
      "clip_denoised": bool(self.config.sampling.clip_denoised),
      "inception": {
        "weights": storage.resolve(ev.inception_weights),
        "weights_hash": inception_params.weights_hash,
        "resize": ev.fid_resize,
        "has_logits": inception_params.has_logits,
      },
      "fid_input": ev.fid_input,
      "conventions": conventions(self.config),
      "fid": fids,
      "reference": {
        split: {
          "path": path,
          "count": ref.count,
          "dataset": ref.meta.get("dataset"),
          "split": split,
        }
        for split, (ref, path) in references.items()
      },
      "samples_dir": storage.name(samples_dir),
    }
    result.update(_inception_score_record(logits, int(ev.is_splits)))
    result["settings"] = {
      k: result[k] for k in ("step", "num_samples", "sampler", "seed", "clip_denoised")
    }
    result["settings"].update(
      weights_hash=inception_params.weights_hash,
      resize=ev.fid_resize,
      reference={s: r["path"] for s, r in result["reference"].items()},
    )
    if ev.fid_input != "uint8" or int(ev.is_splits) != fid_lib.IS_SPLITS:
      result["settings"].update(fid_input=ev.fid_input, is_splits=int(ev.is_splits))
    if jax.process_index() != 0:
      return ""
    folder = results.eval_dir(self.workdir)
    path = results.result_path(folder, f"fid_{step}_{sampling.tag(record)}", result["settings"])
    grid_path = images.save_png(
      path[: -len(".json")] + "_samples.png", images.make_grid(np.stack(grid))
    )
    result["grid"] = storage.name(grid_path)
    storage.write_json(path, result)
    scalars = {f"fid/vs_{split}": value for split, value in fids.items()}
    scalars["fid/inception_score"] = (result["inception_score"] or {}).get("mean")
    self.scalars.write(scalars, step)
    score = result["inception_score"]
    logging.info(
      "Step %d: FID %s over %d samples (%s, resize %s, %s input), IS %s; wrote %s",
      step,
      ", ".join(f"{v:.3f} vs {s}" for s, v in fids.items()),
      stats.count,
      sampling.tag(record),
      ev.fid_resize,
      ev.fid_input,
      "n/a" if score is None else f"{score['mean']:.3f} ({score['splits']} splits)",
      path,
    )
    return path


def evaluate(config, workdir: str) -> str:
  """--mode=fid: FID (vs every reference split) and IS of samples of config.evaluation's
  checkpoint_step; the result's path."""
  validation.check(config, mode="fid")
  built, mesh = state_lib.build(config), parallel.make_mesh()
  evaluator = FidEvaluator(
    config, workdir, built=built, mesh=mesh, scalars=results.Scalars(workdir)
  )
  evaluator.prepare()
  params, step = checkpoint.restore_ema_params(
    config, workdir, built=built, mesh=mesh, step=config.evaluation.checkpoint_step
  )
  return evaluator.run(params, step)
