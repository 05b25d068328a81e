"""How digit-like are a digits run's samples? A classifier trained on the real digits judges them.

usage: python bench/digits_quality.py WORKDIR [NUM_SAMPLES] [--method=ddim] [--num_steps=50]
                                       [--spacing=uniform] [--eta=0.0]
Samples NUM_SAMPLES (default 500) from the newest checkpoint's EMA weights with the given sampler
(default: ancestral over all T steps), shrinks them back to the original 8x8 / 0..16 scale, and
prints a table: the classifier's mean confidence and the class histogram for the samples versus
held-out real digits, and the sampler's throughput (samples/s after compilation).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from ml_collections import ConfigDict
from PIL import Image
from sklearn import datasets
from sklearn import linear_model
from sklearn import model_selection

from ddpm_jax import checkpoint
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib


def to_8x8(images_uint8):
  """16x16 uint8 samples -> the 8x8, 0..16 features the classifier was trained on."""
  small = [
    np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.BILINEAR), np.float64)
    for im in images_uint8
  ]
  return np.stack(small).reshape(len(small), -1) * 16.0 / 255.0


def classifier():
  """The judge: logistic regression on 70% of the real 8x8 digits; returns it, the other 30% as
  16x16 uint8 images (through the same 16x16 round trip as the samples) and their labels."""
  digits = datasets.load_digits()
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    digits.data, digits.target, test_size=0.3, random_state=0
  )
  clf = linear_model.LogisticRegression(max_iter=5000).fit(x_train, y_train)
  real16 = np.stack(
    [
      np.asarray(
        Image.fromarray(np.uint8(x.reshape(8, 8) * 255 / 16)).resize((16, 16), Image.BILINEAR)
      )
      for x in x_test
    ]
  )[..., None]
  return clf, real16, y_test


def main(workdir, num_samples, *, sampling_overrides):
  config = ConfigDict(checkpoint.read_config(workdir))
  for name, value in sampling_overrides.items():
    config.sampling[name] = value
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  params, step = checkpoint.restore_ema_params(config, workdir, built=built, mesh=mesh)
  fn = sampling.from_config(config, built, mesh)
  jax.block_until_ready(fn(params, jax.random.key(0), sampling.sample_ids(0, 100, mesh)))  # compile
  start = time.perf_counter()
  samples = sampling.generate(
    fn, params, key=jax.random.key(123), num_samples=num_samples, batch_size=100, mesh=mesh
  )
  per_second = num_samples / (time.perf_counter() - start)
  clf, real16, _ = classifier()
  rows = []
  for name, feats in (
    ("real (held out)", to_8x8(real16)),
    (f"samples (step {step})", to_8x8(samples)),
  ):
    p = clf.predict_proba(feats)
    hist = np.bincount(p.argmax(1), minlength=10) / len(p)
    rows.append(
      (name, len(p), p.max(1).mean(), (p.max(1) > 0.9).mean(), " ".join(f"{h:.2f}" for h in hist))
    )
  how = sampling.record(config)
  print(
    f"sampler: {how}; {per_second:.1f} samples/s on "
    f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  )
  print("| images | n | mean confidence | share > 0.9 | class shares 0..9 |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]} |")


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("num_samples", nargs="?", type=int, default=500)
  parser.add_argument("--method", default="ancestral")
  parser.add_argument("--num_steps", type=int, default=-1)
  parser.add_argument("--spacing", default="uniform")
  parser.add_argument("--eta", type=float, default=0.0)
  args = parser.parse_args()
  main(
    args.workdir,
    args.num_samples,
    sampling_overrides={
      "method": args.method,
      "num_steps": args.num_steps,
      "spacing": args.spacing,
      "eta": args.eta,
    },
  )
