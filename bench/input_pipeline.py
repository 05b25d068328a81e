"""The training input pipeline alone (no model): images/s with 0 and N Grain worker processes.

The data is generated: --num_images CIFAR10-shaped images (32x32x3, smooth random textures), stored
as PNG bytes and decoded per example like TFDS's ArrayRecord source does, served through this
project's own pipeline (`data.train_iterator`: TfdsImageSource, shuffle, random flip, batch,
per-host shard, `mp_prefetch` workers). What is not measured: reading the ArrayRecord files from
disk (the bytes here are in memory). For the accelerator target (bench/README.md "Accelerators"),
the trainer eats 60 steps/s x 128 = 7,680 CIFAR10 images/s.

usage: python bench/input_pipeline.py [--workers=0,2,4] [--batch=128] [--batches=200]
         [--num_images=10000]
"""

import argparse
import io
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from common import write_json  # pylint: disable=g-import-not-at-top  (this folder)
from ddpm_jax import data  # pylint: disable=g-import-not-at-top
from ddpm_jax.configs import cifar10  # pylint: disable=g-import-not-at-top


class PngSource:
  """A random-access source like `tfds.data_source`'s: example i is {'image': uint8 [H, W, 3]}
  decoded from PNG."""

  def __init__(self, pngs):
    self._pngs = pngs

  def __len__(self):
    return len(self._pngs)

  def __getitem__(self, index):
    with Image.open(io.BytesIO(self._pngs[index])) as image:
      return {"image": np.asarray(image.convert("RGB"))}


def make_pngs(num_images, size=32, seed=0):
  """PNG bytes of smooth random RGB images (upsampled noise: about as compressible as photos)."""
  rng = np.random.default_rng(seed)
  pngs = []
  for _ in range(num_images):
    small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    noisy = np.clip(
      np.asarray(image, np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255
    ).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  return pngs


def measure(source, *, workers, batch, batches, warmup):
  """Images/s of data.train_iterator over `source` with `workers` Grain worker processes."""
  config = cifar10.get_config().data
  config.num_workers = workers
  original = data._tfds_source  # pylint: disable=protected-access
  data._tfds_source = lambda dataset, *, split, data_dir: source  # pylint: disable=protected-access
  try:
    iterator = data.train_iterator(config, global_batch_size=batch, seed=0)
  finally:
    data._tfds_source = original  # pylint: disable=protected-access
  t0 = time.perf_counter()
  for _ in range(warmup):  # worker start-up and the first prefetches
    next(iterator)
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(iterator)
  seconds = time.perf_counter() - t0
  assert b.shape == (batch, 32, 32, 3) and b.dtype == np.uint8, (b.shape, b.dtype)
  return dict(workers=workers, images_per_s=batches * batch / seconds, startup_s=startup)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--workers", default=f"0,{max(1, (os.cpu_count() or 2) // 2)},{os.cpu_count() or 2}"
  )
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=200, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--num_images", type=int, default=10_000)
  parser.add_argument(
    "--json", default=os.path.join(REPO, "bench", "results", "input_pipeline.json")
  )
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags

  pngs = make_pngs(args.num_images)
  source = PngSource(pngs)
  t0 = time.perf_counter()
  for i in range(min(2000, len(source))):
    source[i]  # pylint: disable=pointless-statement
  decode_rate = min(2000, len(source)) / (time.perf_counter() - t0)
  print(
    f"{len(pngs)} PNGs of 32x32x3, {np.mean([len(p) for p in pngs]):.0f} bytes each; "
    f"PNG decoding alone, one process: {decode_rate:.0f} images/s; {os.cpu_count()} CPU cores",
    flush=True,
  )
  print(
    "\n| Grain workers | images/s | start-up s | 60 steps/s x 128 (7,680 images/s) |"
    "\n|---|---|---|---|"
  )
  results = []
  for workers in (int(w) for w in args.workers.split(",")):
    r = measure(source, workers=workers, batch=args.batch, batches=args.batches, warmup=args.warmup)
    results.append(r)
    print(
      f"| {workers} | {r['images_per_s']:.0f} | {r['startup_s']:.1f} | "
      f"{'keeps up' if r['images_per_s'] >= 7680 else 'too slow'} |",
      flush=True,
    )
  write_json(
    args.json,
    dict(
      args=vars(args),
      png_decode_images_per_s=decode_rate,
      cpu_count=os.cpu_count(),
      results=results,
    ),
  )


if __name__ == "__main__":
  main()
