"""FID (and IS) between two sets of images:
`python -m ddpm_jax.metrics --inception_weights=W.npz A [B]`.

Each input is a samples .npz (uint8 NHWC under `arr_0`, what `--mode=sample` writes), a folder of
PNG/JPEG images (all the same size), or a statistics .npz (from `--save_stats`, or mu/sigma of
another tool with `--trust_unlabelled_stats`). Prints the FID of A vs B and the Inception Score of
each image input when the weights have the classifier; `--json` writes the same. One input:
statistics and IS only. Bad input ends with one sentence on stderr and exit status 1.
"""

import sys

from ddpm_jax import process_env

process_env.apply()  # before the libraries below read the environment

# pylint: disable=g-import-not-at-top
import numpy as np
from absl import app
from absl import flags
from PIL import Image

from ddpm_jax import console
from ddpm_jax import data
from ddpm_jax import errors
from ddpm_jax import storage
from ddpm_jax.metrics import fid as fid_lib
from ddpm_jax.metrics import inception
from ddpm_jax.metrics import preprocess

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "inception_weights",
  None,
  "This project's Inception .npz (python -m "
  "ddpm_jax.metrics.convert_inception SRC OUT.npz makes one).",
)
flags.DEFINE_enum(
  "resize",
  "tf",
  list(preprocess.RESIZE_MODES),
  "tf: the TF graph's bilinear resize (the paper's convention); pytorch: pytorch-fid's.",
)
flags.DEFINE_integer(
  "batch_size", 64, "Images per Inception batch (a multiple of the device count)."
)
flags.DEFINE_integer("is_splits", 10, "Splits of the Inception Score.")
flags.DEFINE_list(
  "save_stats", [], "Where to write the statistics of each input, in order (empty = skip)."
)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.DEFINE_bool("trust_unlabelled_stats", False, "Accept stats files that record no convention.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHUNK = 512  # images decoded at a time from a folder


def _folder_batches(paths):
  """uint8 [n, H, W, C] chunks of a folder's images: L stays one channel, anything else becomes
  RGB."""
  first = None
  for start in range(0, len(paths), _CHUNK):
    chunk = []
    for path in paths[start : start + _CHUNK]:
      with storage.open_read(path) as f, Image.open(f) as image:
        array = np.asarray(image if image.mode == "L" else image.convert("RGB"), np.uint8)
      array = array[..., None] if array.ndim == 2 else array
      first = first if first is not None else (path, array.shape)
      if array.shape != first[1]:
        raise errors.ConfigError(
          f"{path} is {array.shape}, but {first[0]} is {first[1]}: the images of a folder "
          "must all have one size and channel count."
        )
      chunk.append(array)
    yield np.stack(chunk)


def read_input(path: str):
  """('stats', Stats) or ('images', batches, count, description) for one command-line input."""
  if storage.is_dir(path):
    paths = data.image_paths_under(path)
    if not paths:
      raise errors.ConfigError(f"The folder {path!r} contains no .png/.jpg/.jpeg images.")
    return "images", _folder_batches(paths), len(paths), "image folder"
  if not storage.is_file(path):
    raise errors.ConfigError(f"Input {path!r} does not exist.")
  if fid_lib.is_stats_file(path):
    return "stats", fid_lib.load_stats(path)
  try:
    images = storage.load_npz(path).get("arr_0")
  except (OSError, EOFError, ValueError) as e:
    raise errors.ConfigError(
      f"Input {path!r} is neither a folder of images nor a readable .npz ({e})."
    ) from None
  if images is None:
    raise errors.ConfigError(
      f"{path!r} has neither 'arr_0' (samples) nor 'mu'/'sigma' (statistics)."
    )
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.ConfigError(
      f"{path!r}: 'arr_0' must be uint8 [N, H, W, 1 or 3] images, got {images.dtype} "
      f"{images.shape}."
    )
  batches = (images[i : i + _CHUNK] for i in range(0, len(images), _CHUNK))
  return "images", batches, len(images), "samples npz"


def _inception_score(logits) -> dict:
  if logits is None:
    return {
      "inception_score": None,
      "inception_score_note": "unavailable: the Inception weights have no classifier (pool3 only)",
    }
  if len(logits) < FLAGS.is_splits:
    return {
      "inception_score": None,
      "inception_score_note": (
        f"unavailable: fewer images ({len(logits)}) than splits ({FLAGS.is_splits})"
      ),
    }
  mean, std = fid_lib.inception_score(logits, FLAGS.is_splits)
  return {"inception_score": mean, "inception_score_std": std}


def compute(inputs: list[str]) -> dict:
  """Reads every input first (bad paths fail before anything is computed), then computes."""
  if len(FLAGS.save_stats) > len(inputs):
    raise errors.ConfigError(
      f"--save_stats names {len(FLAGS.save_stats)} files for {len(inputs)} inputs."
    )
  saves = FLAGS.save_stats + [""] * (len(inputs) - len(FLAGS.save_stats))
  read = [read_input(path) for path in inputs]
  for path, (kind, *_), save_to in zip(inputs, read, saves):
    if kind == "stats" and save_to:
      raise errors.ConfigError(f"--save_stats: {path!r} is already a statistics file.")
  stats_inputs = [r[1] for r in read if r[0] == "stats"]
  if len(stats_inputs) == 2:
    fid_lib.check_same_convention(*stats_inputs, trust_unlabelled=FLAGS.trust_unlabelled_stats)
  results = {"resize": FLAGS.resize, "inputs": []}
  feature_fn = params = None
  if len(stats_inputs) < len(inputs):  # some images: the network is needed
    if not FLAGS.inception_weights:
      raise errors.ConfigError(
        "--inception_weights is required for image inputs; how to get the file: "
        'docs/evaluation.md, "Inception weights".'
      )
    params = inception.load_params(FLAGS.inception_weights)
    feature_fn = inception.make_feature_fn(params, resize=FLAGS.resize, batch_size=FLAGS.batch_size)
    results.update(inception_weights=FLAGS.inception_weights, weights_hash=params.weights_hash)
  all_stats = []
  for path, (kind, *rest), save_to in zip(inputs, read, saves):
    record = {"path": path}
    if kind == "stats":
      stats = rest[0]
      record.update(kind="stats", count=stats.count, meta=stats.meta)
    else:
      batches, count, description = rest
      meta = {
        "dataset": storage.resolve(path),
        "split": description,
        "weights_hash": params.weights_hash,
        "resize": FLAGS.resize,
        "features": "pool3",
      }
      stats, logits = fid_lib.stats_and_logits(
        feature_fn, batches, meta=meta, total=count, progress=FLAGS.progress
      )
      record.update(kind=description, count=stats.count, **_inception_score(logits))
      if save_to:
        record["saved_stats"] = fid_lib.save_stats(save_to, stats)
    all_stats.append(stats)
    results["inputs"].append(record)
  if len(all_stats) == 2:
    results["fid"] = fid_lib.fid_from_stats(
      *all_stats, trust_unlabelled=FLAGS.trust_unlabelled_stats
    )
  return results


def _report(results: dict) -> None:
  for record in results["inputs"]:
    line = f"{record['path']}: {record['count']} images ({record['kind']})"
    if record.get("inception_score") is not None:
      line += f", IS {record['inception_score']:.4f} +- {record['inception_score_std']:.4f}"
    elif "inception_score_note" in record:
      line += f", IS {record['inception_score_note']}"
    print(line)
  if "fid" in results:
    print(f"FID: {results['fid']:.4f}")


def main(argv):
  console.quiet_command_line(verbose=False)
  inputs = argv[1:]
  if len(inputs) not in (1, 2):
    raise app.UsageError(
      "Give one or two inputs: python -m ddpm_jax.metrics --inception_weights=W.npz A [B]"
    )
  try:
    results = compute(inputs)
    if FLAGS.json:
      storage.write_json(FLAGS.json, results)
  except (ValueError, OSError) as e:
    print(f"ddpm_jax.metrics: {e}", file=sys.stderr)
    sys.exit(1)
  _report(results)


if __name__ == "__main__":
  app.run(main)
