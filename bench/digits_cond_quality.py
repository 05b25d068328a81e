"""Does a conditional digits run draw the digit it is asked for? The digits classifier of
bench/digits_quality.py judges class-balanced samples at several guidance scales w.

usage: python bench/digits_cond_quality.py WORKDIR [NUM_SAMPLES] [--scales=0,1,3] [--out=FILE.json]
Samples NUM_SAMPLES (default 500, sample i asks for digit i % 10) from the newest checkpoint's EMA
weights at each w (classifier-free guidance, Ho & Salimans 2022), and prints a table: the share
classified as the requested digit, the classifier's mean confidence (its top probability) and its
mean probability of the requested digit, against held-out real digits; writes the class grid of
each w (row k = digit k) beside the JSON record.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from digits_quality import classifier  # pylint: disable=g-import-not-at-top  (this folder)
from digits_quality import to_8x8  # pylint: disable=g-import-not-at-top  (this folder)
from ml_collections import ConfigDict

from common import write_json  # pylint: disable=g-import-not-at-top  (this folder)
from ddpm_jax import checkpoint
from ddpm_jax import images
from ddpm_jax import labels as labels_lib
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import state as state_lib


def judge(clf, images_uint8, wanted) -> dict:
  """Share classified as `wanted`, mean top probability, mean probability of `wanted`."""
  p = clf.predict_proba(to_8x8(images_uint8))
  return {
    "n": len(p),
    "accuracy": float((p.argmax(1) == wanted).mean()),
    "mean_confidence": float(p.max(1).mean()),
    "mean_p_requested": float(p[np.arange(len(p)), wanted].mean()),
  }


def draw(config, built, mesh, params, *, spec, num_samples, scale):
  """Samples 0 .. num_samples-1 with labels `spec` at guidance scale w; (images, labels, s/img)."""
  config.sampling.guidance_scale = float(scale)
  table = sampling.config_label_table(config, num_samples=num_samples, spec=spec)
  fn = sampling.from_config(config, built, mesh, label_table=table)
  start = time.perf_counter()
  imgs = sampling.generate(
    fn, params, key=jax.random.key(123), num_samples=num_samples, batch_size=100, mesh=mesh
  )
  seconds = time.perf_counter() - start
  return imgs, labels_lib.of_ids(table, np.arange(num_samples)), seconds / num_samples


def main(workdir, num_samples, *, scales, out):
  config = ConfigDict(checkpoint.read_config(workdir))
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  params, step = checkpoint.restore_ema_params(config, workdir, built=built, mesh=mesh)
  clf, real16, real_labels = classifier()
  rows = {"real (held out)": judge(clf, real16, real_labels)}
  grids = {}
  for w in scales:
    imgs, wanted, per_image = draw(
      config, built, mesh, params, spec="all", num_samples=num_samples, scale=w
    )
    rows[f"w = {w:g}"] = dict(judge(clf, imgs, wanted), seconds_per_sample=per_image)
    grid, _, _ = draw(config, built, mesh, params, spec="grid", num_samples=100, scale=w)
    path = os.path.splitext(out)[0] + f"_grid_w{w:g}.png"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images.save_png(path, images.make_grid(grid, ncols=10))
    grids[f"{w:g}"] = path
  method, T = sampling.record(config)["method"], config.diffusion.num_timesteps
  print(f"step {step}, sampler {method}, T = {T}")
  print("| images | n | share = requested digit | mean confidence | mean p(requested) |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    print(
      f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['mean_confidence']:.3f} | "
      f"{r['mean_p_requested']:.3f} |"
    )
  write_json(out, {"workdir": workdir, "step": step, "rows": rows, "grids": grids})


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("num_samples", nargs="?", type=int, default=500)
  parser.add_argument("--scales", default="0,1,3")
  parser.add_argument("--out", default="bench/results/digits_cond_quality.json")
  args = parser.parse_args()
  main(
    args.workdir,
    args.num_samples,
    scales=[float(w) for w in args.scales.split(",")],
    out=args.out,
  )
