"""Every faster path computes what the plain float32 path computes: fused attention, remat, the
train step's XLA:CPU options, the dense layers' and GroupNorm's written-out gradients, bfloat16
compute (loosely), and batches prefetched to the devices; and the host-memory setting does what it
is
for."""

import functools
import math
import os
import platform
import resource
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from ddpm_jax import data
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax import train
from ddpm_jax import xla_cpu
from ddpm_jax.models import unet


def random_params(params, seed):
  """The same tree with every leaf random and O(1)-preserving (near-zero layers become active)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  out = []
  for leaf in leaves:
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    out.append(noise / math.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1.0 + 0.1 * noise)
  return jax.tree.unflatten(treedef, out)


def tiny_model(**overrides):
  config = tiny_config(**{f"model__{k}": v for k, v in overrides.items()})
  model = state_lib.build(config).model
  x = jnp.zeros((1, 8, 8, 1))
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), train=False)
  )
  return model, random_params(params, seed=1)


def inputs(batch=4, seed=2):
  x = jax.random.uniform(jax.random.key(seed), (batch, 8, 8, 1), minval=-1, maxval=1)
  return x, jnp.arange(batch) * 3


# ----------------------------------------------------------------------------- attention


def explicit_attention(params, x):
  """REFERENCE.md's attention block written out: GroupNorm(32), q/k/v, softmax(q k^T / sqrt(C)) v,
  proj, residual."""
  b, h, w, c = x.shape
  groups = x.reshape(b, h, w, 32, c // 32)
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = ((groups - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  normed = ((groups - mean) / jnp.sqrt(var + 1e-6)).reshape(b, h, w, c) * params["norm"][
    "scale"
  ] + params["norm"]["bias"]
  dense = lambda name, v: v @ params[name]["kernel"] + params[name]["bias"]
  q, k, v = (dense(n, normed).reshape(b, h * w, c) for n in "qkv")
  weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
  return x + dense("proj_out", jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c))


def test_fused_attention_block_equals_the_explicit_formulation():
  block = unet.AttnBlock()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
  params = random_params(jax.eval_shape(block.init, jax.random.key(0), x), seed=3)["params"]
  apply = jax.jit(lambda p, x: block.apply({"params": p}, x))
  reference = jax.jit(explicit_attention)
  np.testing.assert_allclose(apply(params, x), reference(params, x), rtol=1e-5, atol=1e-5)
  grad = jax.jit(
    jax.grad(lambda p, x: jnp.sum(jnp.sin(block.apply({"params": p}, x))), argnums=(0, 1))
  )
  grad_ref = jax.jit(
    jax.grad(lambda p, x: jnp.sum(jnp.sin(explicit_attention(p, x))), argnums=(0, 1))
  )
  grads, grads_ref = jax.tree.leaves(grad(params, x)), jax.tree.leaves(grad_ref(params, x))
  scale = max(
    float(np.abs(g).max()) for g in grads_ref
  )  # (the k bias's gradient is 0 up to rounding)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize(
  "platform, capability, dtype, head_dim, expected",
  [
    ("cpu", None, jnp.bfloat16, 256, "xla"),
    ("gpu", "9.0", jnp.bfloat16, 256, "cudnn"),  # H100: head dims up to 256
    ("gpu", "9.0", jnp.float16, 128, "cudnn"),
    ("gpu", "9.0", jnp.float32, 256, "xla"),  # cuDNN's fused kernel takes 16-bit inputs only
    ("gpu", "9.0", jnp.bfloat16, 512, "xla"),  # the 256x256 model's 512-channel attention
    ("gpu", "8.0", jnp.bfloat16, 256, "xla"),  # A100: up to 128
    ("gpu", "8.0", jnp.bfloat16, 128, "cudnn"),
    ("gpu", "8.0", jnp.bfloat16, 100, "xla"),  # not a multiple of 8
    ("gpu", "7.5", jnp.bfloat16, 64, "xla"),  # pre-Ampere
    ("gpu", "gfx90a", jnp.bfloat16, 64, "xla"),  # ROCm
    ("tpu", None, jnp.bfloat16, 256, "xla"),
  ],
)
def test_attention_uses_cudnn_only_where_cudnn_takes_the_call(
  platform, capability, dtype, head_dim, expected
):
  assert (
    unet.attention_implementation(
      platform=platform, compute_capability=capability, dtype=dtype, head_dim=head_dim
    )
    == expected
  )


# ----------------------------------------------------------------------------- remat


def test_remat_changes_neither_params_nor_outputs_nor_gradients():
  plain, params = tiny_model(dropout=0.1)
  remat, _ = tiny_model(dropout=0.1, remat=True)
  assert remat.remat and not plain.remat
  x, t = inputs()
  shapes = lambda m: jax.tree.map(
    lambda a: a.shape, jax.eval_shape(lambda: m.init(jax.random.key(0), x, t, train=False))
  )
  assert shapes(plain) == shapes(remat)  # same names: checkpoints and converters keep working

  keys = jax.random.split(jax.random.key(5), len(t))

  def loss(model):  # dropout on, both sources of masks: remat must redraw the same ones
    rngs = {"dropout": jax.random.key(6)}
    per_batch = lambda p: jnp.mean(model.apply(p, x, t, train=True, rngs=rngs) ** 2)
    per_example = lambda p: jnp.mean(model.apply(p, x, t, train=True, dropout_keys=keys) ** 2)
    return jax.jit(jax.value_and_grad(lambda p: per_batch(p) + per_example(p)))

  jaxpr = lambda model: str(jax.make_jaxpr(lambda p: model.apply(p, x, t, train=False))(params))
  assert " remat" in jaxpr(remat) and " remat" not in jaxpr(
    plain
  )  # remat is really applied (primitive remat2)
  (value, grads), (value_r, grads_r) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_resumes_with_other_compute_settings_but_not_another_model():
  """remat and the compute dtype change how the same parameters are used; a checkpoint written
  before model.remat existed (no such key) must still resume. Another width must still be
  refused."""
  from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  saved = tiny_config().to_dict()
  del saved["model"]["remat"]
  saved["model"]["dtype"] = "bfloat16"
  checkpoint.check_compatible(saved, tiny_config(model__remat=True), source="step 2")
  with pytest.raises(checkpoint.CheckpointError, match=r"model\.ch: 32 -> 64"):
    checkpoint.check_compatible(
      saved, tiny_config(model__ch=64, model__remat=True), source="step 2"
    )


# ----------------------------------------------------------------------------- per-example dropout


def test_per_example_dropout_depends_on_the_example_key_only():
  """The train step's dropout (no vmap over the network): a batch gives what its halves give, per
  example."""
  model, params = tiny_model(dropout=0.3)
  x, t = inputs(batch=4)
  keys = jax.random.split(jax.random.key(7), 4)
  apply = jax.jit(lambda p, x, t, k: model.apply(p, x, t, train=True, dropout_keys=k))
  whole = apply(params, x, t, keys)
  halves = jnp.concatenate(
    [apply(params, x[:2], t[:2], keys[:2]), apply(params, x[2:], t[2:], keys[2:])]
  )
  np.testing.assert_allclose(whole, halves, rtol=1e-5, atol=1e-5)
  other = apply(params, x, t, keys[::-1])  # other keys, other masks (dropout is on) ...
  assert float(jnp.abs(other - whole).max()) > 1e-3
  evaluation = jax.jit(lambda p: model.apply(p, x, t, train=False))(params)
  assert float(jnp.abs(evaluation - whole).max()) > 1e-3
  # ... and an example's output depends on its own key alone: swap two examples with their keys.
  swapped = apply(
    params, x[jnp.array([1, 0, 2, 3])], t[jnp.array([1, 0, 2, 3])], keys[jnp.array([1, 0, 2, 3])]
  )
  np.testing.assert_allclose(swapped[jnp.array([1, 0, 2, 3])], whole, rtol=1e-5, atol=1e-5)


def test_dropout_keeps_each_value_with_probability_1_minus_rate_and_rescales():
  dropout = unet.Dropout(0.25)
  x = jnp.ones((64, 8, 8, 4))
  keys = jax.random.split(jax.random.key(0), 64)
  y = dropout.apply({}, x, deterministic=False, keys=keys)
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert not np.array_equal(kept[0], kept[1])  # examples get different masks
  np.testing.assert_array_equal(dropout.apply({}, x, deterministic=True, keys=keys), x)


def test_each_dropout_layer_draws_its_own_masks_from_the_same_keys():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x, keys):
      return unet.Dropout(0.5, name="a")(x, deterministic=False, keys=keys), unet.Dropout(
        0.5, name="b"
      )(x, deterministic=False, keys=keys)

  keys = jax.random.split(jax.random.key(0), 4)
  a, b = Two().apply({}, jnp.ones((4, 8, 8, 4)), keys)
  assert not np.array_equal(np.asarray(a) != 0, np.asarray(b) != 0)


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_compute_is_close_to_float32_in_outputs_and_gradients():
  """Stated tolerance: outputs within 5% of the output scale, gradients with cosine similarity >=
  0.99."""
  model32, params = tiny_model()
  model16, _ = tiny_model(dtype="bfloat16")
  x, t = inputs()
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.mean((m.apply(p, x, t, train=False) - x) ** 2)))(
    params
  )
  out32 = jax.jit(lambda p: model32.apply(p, x, t, train=False))(params)
  out16 = jax.jit(lambda p: model16.apply(p, x, t, train=False))(params)
  assert out16.dtype == jnp.float32
  assert float(jnp.abs(out16 - out32).max()) <= 0.05 * float(jnp.abs(out32).max())
  g32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad(model32))])
  g16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad(model16))])
  assert g16.dtype == jnp.float32
  cosine = float(g16 @ g32 / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine >= 0.99, cosine


# ----------------------------------------------------------------------------- XLA:CPU options


def test_the_train_step_cpu_options_change_the_program_not_the_step():
  """The train step compiled with and without xla_cpu.train_step_options: a different optimized
  program (XLA's convolutions instead of YNNPACK's), the same loss and gradient norm to float32
  rounding."""
  config = tiny_config(model__dropout=0.1)
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  shape = state_lib.image_shape(config)
  if not xla_cpu.train_step_options(mesh):
    pytest.skip(
      "no train-step options here (another jaxlib, not CPU, or XLA_FLAGS sets the option)"
    )
  state = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=0, shape=shape),
    out_shardings=parallel.replicated(mesh),
  )()
  images = (
    np.random.default_rng(0)
    .integers(0, 256, (1, config.training.batch_size) + shape)
    .astype(np.uint8)
  )
  batches = parallel.global_batch(images, mesh, batch_axis=1)
  programs, metrics = {}, {}
  for on in (True, False):
    step = (
      train.make_train_step(
        built.model,
        built.diffusion,
        built.tx,
        mesh,
        ema_decay=0.999,
        lr_fn=built.lr_fn,
        cpu_options=on,
      )
      .lower(state, batches)
      .compile()
    )
    programs[on] = step.as_text().split("\n", 1)[1]  # without the module name line
    _, metrics[on] = step(jax.tree.map(jnp.copy, state), batches)
  assert programs[True] != programs[False]
  for name in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[True][name], metrics[False][name], rtol=1e-5)


def test_cpu_options_apply_on_cpu_with_a_measured_jaxlib_and_never_over_the_users_flags():
  cpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="cpu")] * 2))
  gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
  measured = xla_cpu.MEASURED_JAXLIB[0] + "0"
  assert (
    xla_cpu.train_step_options(cpu, jaxlib_version_string=measured, xla_flags="")
    == xla_cpu.TRAIN_STEP_OPTIONS
  )
  assert xla_cpu.train_step_options(gpu, jaxlib_version_string=measured, xla_flags="") is None
  assert xla_cpu.train_step_options(cpu, jaxlib_version_string="99.0.0", xla_flags="") is None
  mine = f"--xla_force_host_platform_device_count=2 --{xla_cpu.OPTION}=-reduce"
  assert xla_cpu.train_step_options(cpu, jaxlib_version_string=measured, xla_flags=mine) is None
  other = "--xla_force_host_platform_device_count=2"
  assert (
    xla_cpu.train_step_options(cpu, jaxlib_version_string=measured, xla_flags=other)
    == xla_cpu.TRAIN_STEP_OPTIONS
  )


_FAULTS_PROBE = """
import ctypes, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, as without transparent huge pages
import jax, jax.numpy as jnp
from ddpm_jax import xla_cpu
if sys.argv[1] == "on":
  assert xla_cpu.keep_host_memory()
f = jax.jit(lambda x: jnp.flip(jnp.cumsum(x, axis=0), 0).sum(axis=0))  # temporaries: 132 MiB, the cumsum 64
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", min(faults[1:]))
"""  # noqa: E501 (the child's source, kept as written)


@pytest.mark.skipif(
  not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
  reason="the host-memory setting is glibc's",
)
def test_keep_host_memory_lets_each_call_reuse_the_last_ones_pages():
  """A computation with 132 MiB of temporaries, called repeatedly in a fresh process: by default
  every call faults them in anew (about 34,000 pages; at least the cumsum's 16,384); with
  xla_cpu.keep_host_memory() the calls after the first reuse them (synchronous dispatch and glibc
  keeping freed memory are both needed). Counts, not times: a busy machine changes neither much."""
  pages = 4096 * 4096 * 4 // resource.getpagesize()
  env = {
    k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
  }
  faults = {}
  for mode in ("off", "on"):
    result = subprocess.run(
      [sys.executable, "-c", _FAULTS_PROBE, mode],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=dict(env, JAX_PLATFORMS="cpu"),
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    faults[mode] = int(result.stdout.split("FAULTS")[1])
  assert faults["off"] > pages // 2, faults  # the probe really allocates its temporaries per call
  # Kept: the call's own temporaries are reused. What remains is other threads' pages, which grow on
  # a loaded machine (2,051 seen once), far below a call's worth; the fewest of 7 calls counts.
  assert faults["on"] < min(pages // 4, faults["off"] // 4), faults


def test_keep_host_memory_after_the_backends_started_changes_nothing_and_says_so():
  jax.devices()  # started (as in any test process)
  with pytest.warns(UserWarning, match="after JAX's backends started"):
    assert not xla_cpu.keep_host_memory()
  assert jax.config.values["jax_cpu_enable_async_dispatch"]  # the flag left as it was


# ----------------------------------------------------------------------------- prefetching


def test_prefetched_batches_are_the_batches_and_rewind_restores_the_position():
  config = tiny_config(training__batch_size=8)
  fresh = lambda: data.train_iterator(config.data, global_batch_size=8, seed=0)
  expected = [next(it) for it in [fresh()] for _ in range(7)]
  mesh = parallel.make_mesh()
  iterator = fresh()
  batches = parallel.DevicePrefetcher(iterator, mesh)
  got = [batches.take(1)]
  batches.prefetch(1)
  got.append(batches.take(1))
  batches.prefetch(2)
  got.append(batches.take(2))  # steps 3 and 4 in one dispatch
  batches.prefetch(2)  # read ahead: steps 5 and 6 ...
  batches.rewind()  # ... given back: the iterator stands after step 4
  reference = fresh()
  for _ in range(4):
    next(reference)
  assert iterator.get_state() == reference.get_state()
  batches.prefetch(1)
  got.append(batches.take(2))  # a different count than prefetched: read again, same batches
  got.append(batches.take(1))
  flat = [np.asarray(g)[i] for g in got for i in range(g.shape[0])]
  assert len(flat) == 7 and all(g.shape == (8, 8, 8, 1) for g in flat)
  for a, b in zip(flat, expected):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- Dense


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 4, 64)])
def test_dense_equals_flax_dense_in_values_and_gradients(shape):
  """unet.Dense (its gradient written out as 2-D products) against nn.Dense: the same parameters
  from the same key, the same output, and the same gradients for the input, kernel and bias."""
  x = jax.random.normal(jax.random.key(0), shape)
  ours, flax_dense = (cls(32, kernel_init=unet.default_init(1.0)) for cls in (unet.Dense, nn.Dense))
  params = ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, flax_dense.init(jax.random.key(1), x))
  params = random_params(params, seed=2)
  weights = jax.random.normal(jax.random.key(3), shape[:-1] + (32,))
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * weights)
  np.testing.assert_allclose(
    ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6, atol=1e-6
  )
  ours_grads, flax_grads = (
    jax.grad(loss(m), argnums=(0, 1))(params, x) for m in (ours, flax_dense)
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours_grads, flax_grads
  )


def test_dense_in_bfloat16_is_close_to_float32():
  """bfloat16 compute (float32 parameters): output and gradients within bfloat16's precision of
  float32."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
  params = random_params(unet.Dense(32).init(jax.random.key(1), x), seed=2)
  weights = jax.random.normal(jax.random.key(3), (2, 8, 8, 32))
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module = unet.Dense(32, dtype=dtype, kernel_init=unet.default_init(1.0))
    loss = lambda p, x, module=module: jnp.sum(module.apply(p, x).astype(jnp.float32) * weights)
    y = module.apply(params, x)
    assert y.dtype == dtype  # computed in dtype
    results[dtype] = (y.astype(jnp.float32), jax.grad(loss, argnums=(0, 1))(params, x))
  (y32, g32), (y16, g16) = results[jnp.float32], results[jnp.bfloat16]
  assert all(
    g.dtype == jnp.float32 for g in jax.tree.leaves(g16)
  )  # float32 parameters and input: float32 grads
  for a, b in zip(jax.tree.leaves((y16, g16)), jax.tree.leaves((y32, g32))):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


# ----------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize(
  "shape, dtype",
  [((2, 8, 8, 64), "float32"), ((3, 4, 4, 256), "float32"), ((2, 8, 8, 64), "bfloat16")],
)
def test_group_norm_equals_flax_group_norm(shape, dtype):
  """Same function and parameter tree as nn.GroupNorm(32, eps 1e-6, two-pass variance); bfloat16 to
  its precision."""
  ours = unet.GroupNorm(dtype=unet.DTYPES[dtype])
  flax_gn = nn.GroupNorm(
    num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=unet.DTYPES[dtype]
  )
  x = (jax.random.normal(jax.random.key(0), shape) * 3 + 1).astype(unet.DTYPES[dtype])
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, flax_gn.init(jax.random.key(1), x)
  )
  params = random_params(params, seed=4)
  loss = lambda m: jax.jit(
    jax.value_and_grad(
      lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))), argnums=(0, 1)
    )
  )
  out, out_ref = ours.apply(params, x), flax_gn.apply(params, x)
  assert out.dtype == out_ref.dtype == unet.DTYPES[dtype]
  tol = 1e-5 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(out_ref, np.float32), rtol=tol, atol=tol
  )
  (value, grads), (value_ref, grads_ref) = loss(ours)(params, x), loss(flax_gn)(params, x)
  np.testing.assert_allclose(value, value_ref, rtol=tol)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
