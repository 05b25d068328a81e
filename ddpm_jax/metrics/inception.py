"""The FID Inception network in Flax linen, its weights file, and a batched, sharded feature
function.

The network is the TF graph `inception-2015-12-05` that FID and IS are defined with (TTUR, the DDPM
paper), in the block structure of pytorch-fid's FIDInception* / torch-fidelity's
FeatureExtractorInceptionV3: batch norm without scale (eps 1e-3), average pools that do not count
padded zeros, and max pooling in the last block's pool branch, as the TF graph has them.
Parameter names follow those ports (`Mixed_5b/branch1x1/conv/kernel`), so their state dicts map
one-to-one (`convert_inception.py`).

Outputs per image: `pool3` (2048, the FID features), `logits_unbiased` (pool3 @ W, 1008: what the
Inception Score uses in OpenAI's original code and torch-fidelity) and `logits` (+ bias).
"""

import functools
import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ddpm_jax import errors
from ddpm_jax import parallel
from ddpm_jax import storage
from ddpm_jax.metrics import preprocess

FORMAT = "ddpm_jax-fid-inception-2015-12-05-v1"
NUM_FEATURES = 2048
NUM_CLASSES = 1008
# TF computes these convolutions in full float32; keep accelerators from using TF32/bf16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (eps 1e-3, inference statistics), ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=[(p, p) for p in self.padding],
      use_bias=False,
      precision=_PRECISION,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """TF's SAME average pool: the mean over the window's pixels inside the image only."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Factorised 7x7 convolutions at 17x17."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Expanded filter bank at 8x8; the TF graph's second one (Mixed_7c) max-pools its pool branch."""

  pool: str  # "avg" or "max"

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = [
      BasicConv(384, **row, name="branch3x3_2a")(b3),
      BasicConv(384, **col, name="branch3x3_2b")(b3),
    ]
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [
      BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
      BasicConv(384, **col, name="branch3x3dbl_3b")(bd),
    ]
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class Logits(nn.Module):
  """The 1008-way classifier on pool3; returns the logits without and with the bias."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(x, kernel, precision=_PRECISION)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """float32 [N, 299, 299, 3] in [-1, 1] -> {"pool3": [N, 2048], and with_logits: "logits_unbiased",
  "logits": [N, 1008]}."""

  with_logits: bool = True

  @nn.compact
  def __call__(self, x):
    assert x.shape[1:] == (preprocess.INPUT_SIZE, preprocess.INPUT_SIZE, 3), x.shape
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # 73
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3_stride2(x)  # 35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    out = {"pool3": pool3}
    if self.with_logits:
      out["logits_unbiased"], out["logits"] = Logits(name="fc")(pool3)
    return out


# ---------------------------------------------------------------------------------------------
# The weights file: this project's .npz, written by convert_inception.py.


class InceptionParams(NamedTuple):
  """Weights as loaded: the Flax variables, whether the classifier (needed for IS) is there, and
  `weights_hash`, which every statistics file records."""

  variables: dict
  has_logits: bool
  weights_hash: str


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> shape, for every variable of the full network."""
  x = jax.ShapeDtypeStruct((1, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE, 3), jnp.float32)
  variables = jax.eval_shape(InceptionV3(with_logits=True).init, jax.random.key(0), x)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def is_logits_key(key: str) -> bool:
  return key.startswith("params/fc/")


def check_arrays(arrays: dict, *, source: str) -> bool:
  """Checks flat arrays against the network's shapes (the classifier may be absent); returns
  has_logits."""
  expected = expected_shapes()
  unknown = sorted(set(arrays) - set(expected))
  if unknown:
    raise errors.ConfigError(
      f"{source} has {len(unknown)} arrays the FID Inception network does not have, "
      f"e.g. {unknown[:3]}."
    )
  missing = sorted(k for k in expected if k not in arrays and not is_logits_key(k))
  if missing:
    raise errors.ConfigError(
      f"{source} lacks {len(missing)} arrays of the FID Inception network, e.g. {missing[:3]}."
    )
  for key, value in arrays.items():
    if tuple(value.shape) != expected[key]:
      raise errors.ConfigError(
        f"{source}: {key} has shape {tuple(value.shape)}, the network needs {expected[key]}."
      )
  logits = [k for k in expected if is_logits_key(k)]
  present = [k in arrays for k in logits]
  if any(present) and not all(present):
    raise errors.ConfigError(f"{source} has only part of the classifier ({', '.join(logits)}).")
  return all(present)


def hash_arrays(arrays: dict) -> str:
  """sha256 (first 16 hex digits) of the pool3 network's float32 weights, in sorted key order.

  The classifier is left out, so a pool3-only file and a full file of the same network share the
  hash (FID statistics depend on pool3 only).
  """
  digest = hashlib.sha256()
  for key in sorted(k for k in arrays if not is_logits_key(k)):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
  return digest.hexdigest()[:16]


def _read_npz(path: str) -> dict:
  if not storage.is_file(path):
    raise errors.ConfigError(
      f"Inception weights file {path!r} does not exist; convert one with "
      "`python -m ddpm_jax.metrics.convert_inception SRC OUT.npz` "
      '(docs/evaluation.md, "Inception weights").'
    )
  try:
    arrays = storage.load_npz(path)
  except (OSError, ValueError, EOFError) as e:
    raise errors.ConfigError(f"{path!r} is not a readable .npz weights file ({e}).") from None
  if str(arrays.pop("format", "")) != FORMAT:
    raise errors.ConfigError(
      f"{path!r} is not an Inception weights file of this project; convert the .pth / "
      "TorchScript file with `python -m ddpm_jax.metrics.convert_inception SRC OUT.npz`."
    )
  arrays.pop("source", None)
  return arrays


def load_params(path: str) -> InceptionParams:
  """Reads and validates a weights .npz; ConfigError naming the file when it is not one."""
  arrays = _read_npz(path)
  has_logits = check_arrays(arrays, source=repr(path))
  variables = traverse_util.unflatten_dict(
    {tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  )
  return InceptionParams(
    variables=variables, has_logits=has_logits, weights_hash=hash_arrays(arrays)
  )


def weights_hash(path: str) -> str:
  """The hash statistics files record for the weights in `path` (see `hash_arrays`)."""
  return hash_arrays(_read_npz(path))


def save_params(path: str, arrays: dict, *, source: str) -> str:
  """Writes flat float32 arrays (validated) as this project's weights .npz."""
  check_arrays(arrays, source=source)
  return storage.save_npz(
    path,
    format=np.array(FORMAT),
    source=np.array(source),
    **{k: np.asarray(v, np.float32) for k, v in arrays.items()},
  )


# ---------------------------------------------------------------------------------------------
# Features of many images, batch sharded over devices.


def _as_nhwc(images) -> np.ndarray:
  """uint8 images, or float32 ones in [0, 255] (unrounded samples), as [N, H, W, 1 or 3]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if (
    images.dtype not in (np.uint8, np.float32) or images.ndim != 4 or images.shape[-1] not in (1, 3)
  ):
    raise errors.ConfigError(
      "Inception input must be uint8 (or float32 0..255) [N, H, W, 1 or 3] images, got "
      f"{images.dtype} {images.shape}."
    )
  return images


def make_feature_fn(
  params: InceptionParams, *, resize: str = "tf", mesh=None, batch_size: int = 64
):
  """Returns `features(images, *, progress=False) -> (pool3, logits)` for uint8 [N, H, W, 1|3]
  images.

  pool3 is float64 [N, 2048]; logits are the IS logits (pool3 @ W, no bias: `logits_unbiased`) as
  float64 [N, 1008], or None when the weights have no classifier. Images go through the network in
  global batches of `batch_size` (the last one padded), sharded over the mesh's devices: one
  compiled program per image shape. With several processes, each passes its own share (equal counts
  on every process) and every process gets all features, batch by batch, each batch in process
  order.
  """
  preprocess.check_resize(resize)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  parallel.check_batch_size(batch_size, what="the Inception batch size")
  local_batch = batch_size // jax.process_count()
  model = InceptionV3(with_logits=params.has_logits)
  variables = parallel.replicate(params.variables, mesh)

  def per_device(variables, images):
    out = model.apply(variables, preprocess.inception_input(images, resize=resize))
    return out["pool3"], out.get("logits_unbiased", jnp.zeros((images.shape[0], 0)))

  step = parallel.data_parallel(
    per_device,
    mesh,
    in_specs=(P(), P(parallel.AXIS)),
    out_specs=(P(parallel.AXIS), P(parallel.AXIS)),
  )

  def valid_rows(x, n):
    x = parallel.to_host(x).astype(np.float64)
    blocks = x.reshape((jax.process_count(), local_batch) + x.shape[1:])  # one block per process
    return blocks[:, :n].reshape((jax.process_count() * n,) + x.shape[1:])

  def features(images, *, progress: bool = False):
    images = _as_nhwc(images)
    pool3, logits, pending = [], [], None
    with tqdm.tqdm(total=len(images), unit="img", desc="Inception", disable=not progress) as bar:
      for start in range(0, len(images), local_batch):
        chunk = images[start : start + local_batch]
        padded = np.zeros((local_batch,) + images.shape[1:], images.dtype)
        padded[: len(chunk)] = chunk
        outputs = step(
          variables, parallel.global_batch(padded, mesh)
        )  # dispatched; runs while we copy
        if pending is not None:
          _collect(pending, pool3, logits, valid_rows, bar)
        pending = (outputs, len(chunk))
      if pending is not None:
        _collect(pending, pool3, logits, valid_rows, bar)
    dim = (0, NUM_FEATURES)
    pool3 = np.concatenate(pool3) if pool3 else np.zeros(dim)
    if not params.has_logits:
      return pool3, None
    return pool3, (np.concatenate(logits) if logits else np.zeros((0, NUM_CLASSES)))

  return features


def _collect(pending, pool3, logits, valid_rows, bar):
  (p, lg), n = pending
  pool3.append(valid_rows(p, n))
  logits.append(valid_rows(lg, n))
  bar.update(n)
