"""How digit-like are a digits run's samples? A classifier trained on the real digits judges them.

usage: python bench/digits_quality.py WORKDIR [NUM_SAMPLES]
Samples NUM_SAMPLES (default 500) from the newest checkpoint's EMA weights, shrinks them back to the
original 8x8 / 0..16 scale, and prints a table: the classifier's mean confidence and the class histogram
for the samples versus held-out real digits.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image
from sklearn import datasets, linear_model, model_selection

from ddpm_jax import checkpoint, evaluate, parallel, sampling
from ddpm_jax import state as state_lib
from ml_collections import ConfigDict


def to_8x8(images_uint8):
  """16x16 uint8 samples -> the 8x8, 0..16 features the classifier was trained on."""
  small = [np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.BILINEAR), np.float64) for im in images_uint8]
  return np.stack(small).reshape(len(small), -1) * 16.0 / 255.0


def main(workdir, num_samples="500"):
  config = ConfigDict(checkpoint.read_config(workdir))
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  params, step = evaluate.restore_ema_params(config, workdir, model=model, tx=tx, mesh=mesh)
  fn = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
  samples = sampling.generate(fn, params, key=jax.random.key(123), num_samples=int(num_samples),
                              batch_size=100, mesh=mesh)
  digits = datasets.load_digits()
  x_train, x_test, y_train, _ = model_selection.train_test_split(digits.data, digits.target, test_size=0.3,
                                                                 random_state=0)
  clf = linear_model.LogisticRegression(max_iter=5000).fit(x_train, y_train)
  # Real digits pass through the same 16x16 round trip as the samples.
  real16 = np.stack([np.asarray(Image.fromarray(np.uint8(x.reshape(8, 8) * 255 / 16)).resize((16, 16), Image.BILINEAR))
                     for x in x_test])[..., None]
  rows = []
  for name, feats in (("real (held out)", to_8x8(real16)), (f"samples (step {step})", to_8x8(samples))):
    p = clf.predict_proba(feats)
    hist = np.bincount(p.argmax(1), minlength=10) / len(p)
    rows.append((name, len(p), p.max(1).mean(), (p.max(1) > 0.9).mean(), " ".join(f"{h:.2f}" for h in hist)))
  print(f"| images | n | mean confidence | share > 0.9 | class shares 0..9 |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]} |")


if __name__ == "__main__":
  main(*sys.argv[1:])
