"""Training throughput and sampler compile time on whatever devices JAX sees; prints Markdown tables.

usage: python bench/throughput.py [--config=cifar10] [--batch=16] [--steps=5]
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from ddpm_jax import parallel, sampling, train
from ddpm_jax import state as state_lib


def load_config(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"configs.{name}").get_config()


def bench_train(config, *, batch, steps):
  config.training.batch_size = batch
  d, model, tx, lr_fn = state_lib.build(config)
  mesh = parallel.make_mesh()
  shape = state_lib.image_shape(config)
  state = jax.jit(functools.partial(state_lib.init_state, model, tx, seed=0, shape=shape),
                  out_shardings=parallel.replicated(mesh))()
  step_fn = train.make_train_step(model, d, tx, mesh, ema_decay=0.9999, lr_fn=lr_fn)
  images = np.random.RandomState(0).randint(0, 256, (1, batch) + shape).astype(np.uint8)
  gb = parallel.global_batch(images, mesh, batch_axis=1)
  t0 = time.perf_counter()
  state, _ = step_fn(state, gb)
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, _ = step_fn(state, gb)
  jax.block_until_ready(state)
  per_step = (time.perf_counter() - t0) / steps
  return first, per_step


def bench_sampler_compile(config, T):
  config.diffusion.num_timesteps = T
  d, model, tx, _ = state_lib.build(config)
  mesh = parallel.make_mesh()
  params = jax.eval_shape(lambda: state_lib.init_state(model, tx, seed=0, shape=state_lib.image_shape(config))).ema_params
  fn = sampling.make_sampler(model, d, mesh, image_shape=state_lib.image_shape(config))
  n = jax.device_count()
  t0 = time.perf_counter()
  jax.jit(fn).lower(params, jax.random.key(0), jax.numpy.arange(n)).compile()
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="cifar10")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  first, per_step = bench_train(load_config(args.config), batch=args.batch, steps=args.steps)
  print(f"| config | devices | batch | first step (compile) s | s/step | images/s |\n|---|---|---|---|---|---|")
  print(f"| {args.config} | {device} | {args.batch} | {first:.1f} | {per_step:.3f} | {args.batch / per_step:.1f} |")
  print("\n| config | T | sampler compile s |\n|---|---|---|")
  for T in (100, 1000):
    print(f"| {args.config} | {T} | {bench_sampler_compile(load_config(args.config), T):.1f} |")


if __name__ == "__main__":
  main()
