"""Train-step and sampler throughput of a config on whatever devices JAX sees; prints Markdown,
writes JSON.

Reports: the train step (images/s, steps/s, compile time), one sampling step (images/s: network call
plus update, measured inside the fori_loop sampler at T = --sample_T), the full sampler at
T = --full_T (optional: 1000 steps take long on a CPU), the sampler's compile time and memory at
T = 10 and T = 1000 (one fori_loop: both should be alike), peak device memory where the backend
reports it, FLOPs per image from XLA's cost analysis, and the achieved FLOP/s as a fraction of a
matmul measured on the same device.

usage: python bench/step_throughput.py --config=configs/cifar10.py [--batch=16] [--steps=5]
         [--steps_per_dispatch=N] [--sample_batch=16] [--sample_T=10] [--full_T=0]
         [--compile_T=10,1000] [--no_cpu_options] [--set=model.dtype=bfloat16 ...] [--json=PATH]
"""

import argparse
import functools
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from common import load_config  # pylint: disable=g-import-not-at-top  (this folder)
from common import write_json  # pylint: disable=g-import-not-at-top  (this folder)
from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
from ddpm_jax import state as state_lib  # pylint: disable=g-import-not-at-top
from ddpm_jax import train  # pylint: disable=g-import-not-at-top
from ddpm_jax import xla_cpu  # pylint: disable=g-import-not-at-top


def cost(compiled):
  """(FLOPs, {memory analysis}) of a compiled program; NaN / {} where the backend does not say."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  memory = compiled.memory_analysis()
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  return flops, {
    f: int(getattr(memory, f)) for f in fields if memory is not None and hasattr(memory, f)
  }


def matmul_peak(dtype, n):
  """Measured FLOP/s of an n x n matmul in `dtype` on the default device (the best of 10: a
  peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times)


def peak_memory():
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def bench_train(config, *, steps, cpu_options=True):
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  shape = state_lib.image_shape(config)
  batch, k = config.training.batch_size, config.training.steps_per_dispatch
  parallel.check_batch_size(batch, what="--batch")
  state = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=0, shape=shape),
    out_shardings=parallel.replicated(mesh),
  )()
  step_fn = train.make_train_step(
    built.model,
    built.diffusion,
    built.tx,
    mesh,
    ema_decay=config.training.ema_decay,
    lr_fn=built.lr_fn,
    cpu_options=cpu_options,
  )
  images = np.random.default_rng(0).integers(0, 256, (k, batch) + shape).astype(np.uint8)
  batches = parallel.global_batch(images, mesh, batch_axis=1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batches).compile()
  compile_s = time.perf_counter() - t0
  flops, memory = cost(compiled)
  state, _ = step_fn(state, batches)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = step_fn(state, batches)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  per_dispatch = statistics.median(times)
  return dict(
    batch=batch,
    steps_per_dispatch=k,
    compile_s=compile_s,
    s_per_step=per_dispatch / k,
    steps_per_s=k / per_dispatch,
    images_per_s=k * batch / per_dispatch,
    flops_per_image=flops / (k * batch),
    memory_analysis=memory,
    dispatch_times_s=times,
  )


def _sampler(config, T, batch):
  config = config.copy_and_resolve_references()
  config.diffusion.num_timesteps = T
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  shape = state_lib.image_shape(config)
  params = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=0, shape=shape),
    out_shardings=parallel.replicated(mesh),
  )().ema_params
  fn = jax.jit(sampling.make_sampler(built.model, built.diffusion, mesh, image_shape=shape))
  ids = sampling.sample_ids(0, batch, mesh)
  return fn, params, ids


def forward_flops_per_image(config, *, batch):
  """FLOPs of one network call (eval mode) per image: the cost of one sampling step (the update is
  tiny)."""
  built = state_lib.build(config)
  shape = state_lib.image_shape(config)
  params = jax.eval_shape(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=0, shape=shape)
  ).params
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  compiled = (
    jax.jit(lambda p, x, t: built.model.apply(p, x, t, train=False)).lower(params, x, t).compile()
  )
  return cost(compiled)[0] / batch


def bench_sampler_compile(config, *, T, batch):
  fn, params, ids = _sampler(config, T, batch)
  t0 = time.perf_counter()
  compiled = fn.lower(params, jax.random.key(0), ids).compile()
  compile_s = time.perf_counter() - t0
  return dict(T=T, compile_s=compile_s, memory_analysis=cost(compiled)[1])


def bench_sampler_run(config, *, T, batch, repeats):
  """Seconds for the whole T-step sampler on `batch` images (median of `repeats` after a
  warm-up)."""
  fn, params, ids = _sampler(config, T, batch)
  fn(params, jax.random.key(0), ids).block_until_ready()
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(params, jax.random.key(i + 1), ids).block_until_ready()
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return dict(T=T, batch=batch, seconds=seconds, images_per_s_per_step=batch * T / seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--config", default="configs/cifar10.py", help="a config file, or a name in ddpm_jax/configs"
  )
  parser.add_argument(
    "--set", action="append", default=[], help="section.key=value override (repeatable)"
  )
  parser.add_argument("--batch", type=int, default=0, help="train batch (default: the config's)")
  parser.add_argument("--steps_per_dispatch", type=int, default=0, help="default: the config's")
  parser.add_argument("--steps", type=int, default=5, help="timed train dispatches (median taken)")
  parser.add_argument("--sample_batch", type=int, default=0, help="default: the train batch")
  parser.add_argument(
    "--sample_T", type=int, default=10, help="loop length for the per-step sampling rate"
  )
  parser.add_argument(
    "--full_T", type=int, default=0, help="also time the whole sampler at this T (0: skip)"
  )
  parser.add_argument(
    "--compile_T", default="10,1000", help="sampler loop lengths whose compile time is compared"
  )
  parser.add_argument(
    "--no_cpu_options",
    action="store_true",
    help="without the train step's CPU settings (ddpm_jax.xla_cpu: compile options, "
    "synchronous dispatch, glibc keeping freed memory)",
  )
  parser.add_argument(
    "--json", default=os.path.join(REPO, "bench", "results", "step_throughput.json")
  )
  args = parser.parse_args()
  # as `ddpm_jax.main` runs (bench/README.md "What was tried"), before any computation
  host_memory = False if args.no_cpu_options else xla_cpu.keep_host_memory()
  config = load_config(args.config, args.set)
  if args.batch:
    config.training.batch_size = args.batch
  if args.steps_per_dispatch:
    config.training.steps_per_dispatch = args.steps_per_dispatch
  sample_batch = args.sample_batch or config.training.batch_size
  device = jax.devices()[0]
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  n = 8192 if device.platform in ("gpu", "tpu") else 2048
  peak = matmul_peak(dtype, n)
  print(
    f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}; "
    f"{config.model.dtype} {n}x{n} matmul: {peak / 1e9:.0f} GFLOP/s",
    flush=True,
  )

  result = dict(
    config=args.config,
    overrides=args.set,
    device=device.device_kind,
    platform=device.platform,
    device_count=jax.device_count(),
    dtype=config.model.dtype,
    matmul_flops_per_s=peak,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    host_memory=host_memory,
  )
  result["train"] = tr = bench_train(config, steps=args.steps, cpu_options=not args.no_cpu_options)
  achieved = tr["images_per_s"] * tr["flops_per_image"]
  print(
    "\n| train step | batch | steps/dispatch | compile s | s/step | steps/s | images/s | "
    "GFLOP/image | achieved GFLOP/s | of matmul peak |\n|---|---|---|---|---|---|---|---|---|---|"
  )
  print(
    f"| {args.config} | {tr['batch']} | {tr['steps_per_dispatch']} | {tr['compile_s']:.1f} | "
    f"{tr['s_per_step']:.3f} | "
    f"{tr['steps_per_s']:.2f} | {tr['images_per_s']:.1f} | {tr['flops_per_image'] / 1e9:.1f} | "
    f"{achieved / 1e9:.0f} | {achieved / peak:.0%} |",
    flush=True,
  )

  compiles = [
    bench_sampler_compile(config, T=int(T), batch=sample_batch) for T in args.compile_T.split(",")
  ]
  step = bench_sampler_run(config, T=args.sample_T, batch=sample_batch, repeats=3)
  flops_per_image_step = forward_flops_per_image(config, batch=sample_batch)
  result["sampler"] = dict(compile=compiles, step=step, flops_per_image_step=flops_per_image_step)
  print(
    "\n| sampler | batch | compile s | temp memory MiB | argument + output MiB |"
    "\n|---|---|---|---|---|"
  )
  for c in compiles:
    m = c["memory_analysis"]
    print(
      f"| T = {c['T']} | {sample_batch} | {c['compile_s']:.1f} | "
      f"{m.get('temp_size_in_bytes', 0) / 2**20:.1f} | "
      f"{(m.get('argument_size_in_bytes', 0) + m.get('output_size_in_bytes', 0)) / 2**20:.1f} |"
    )
  achieved = step["images_per_s_per_step"] * flops_per_image_step
  print(
    f"\nsampling step (network + update, inside the T = {step['T']} loop): "
    f"{step['images_per_s_per_step']:.1f} images/s, {achieved / 1e9:.0f} GFLOP/s "
    f"({achieved / peak:.0%} of the matmul peak; {flops_per_image_step / 1e9:.1f} GFLOP per image "
    "and step: the network's, from XLA's cost analysis)"
  )
  if args.full_T:
    full = bench_sampler_run(config, T=args.full_T, batch=sample_batch, repeats=1)
    result["sampler"]["full"] = full
    print(f"full sampler: {sample_batch} images x {args.full_T} steps in {full['seconds']:.1f} s")
  result["peak_device_memory_bytes"] = peak_memory()
  print(
    f"peak device memory: {result['peak_device_memory_bytes'] / 2**30:.2f} GiB"
    if result["peak_device_memory_bytes"]
    else "peak device memory: not reported by this backend (CPU); see the memory analysis above"
  )
  write_json(args.json, result)


if __name__ == "__main__":
  main()
