"""Where the train step's time goes on CPU: every convolution of a config's U-Net, XLA against
PyTorch.

usage: python bench/conv_shapes.py [--config=configs/cifar10.py] [--batch=16] [--repeats=7]
         [--json=PATH]

Traces the U-Net's training forward pass, collects each convolution's input and kernel shapes,
strides and padding, and times forward + backward (input and kernel gradients) of each distinct
shape: jitted `lax.conv_general_dilated` (with the train step's XLA:CPU options, `ddpm_jax.xla_cpu`)
and `torch.nn.functional.conv2d` (what diffusers' UNet2DModel runs: oneDNN on CPU), median of
--repeats. Each framework runs in its own process: in one process, PyTorch's OpenMP threads keep
spinning after each call and slow the XLA call that follows (by 10-25% here). Prints a Markdown
table and the totals weighted by how often each shape occurs.
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top
import jax.extend.core  # pylint: disable=g-import-not-at-top,unused-import  (subjaxprs)
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from common import call_times  # pylint: disable=g-import-not-at-top  (this folder)
from common import load_config  # pylint: disable=g-import-not-at-top  (this folder)
from common import write_json  # pylint: disable=g-import-not-at-top  (this folder)
from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
from ddpm_jax import state as state_lib  # pylint: disable=g-import-not-at-top
from ddpm_jax import xla_cpu  # pylint: disable=g-import-not-at-top


def convolutions(config, batch):
  """Counter of (input shape NHWC, kernel shape HWIO, strides, padding) over the training forward
  pass."""
  built = state_lib.build(config)
  shape = (batch,) + state_lib.image_shape(config)
  x, t = jnp.zeros(shape), jnp.zeros((batch,), jnp.int32)
  params = jax.eval_shape(lambda: built.model.init(jax.random.key(0), x, t, train=False))
  jaxpr = jax.make_jaxpr(lambda p: built.model.apply(p, x, t, train=False))(params)
  found = collections.Counter()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        found[
          (
            tuple(lhs),
            tuple(rhs),
            tuple(eqn.params["window_strides"]),
            tuple(map(tuple, eqn.params["padding"])),
          )
        ] += 1
    for sub in jax.extend.core.subjaxprs(
      jaxpr
    ):  # the bodies of nested calls (jit, remat, custom VJPs)
      visit(sub)

  visit(jaxpr.jaxpr)
  return found


def time_jax(lhs, rhs, strides, padding):
  conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )

  def forward_backward(x, w):
    y, vjp = jax.vjp(conv, x, w)
    return vjp(y)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(lhs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(rhs) / np.sqrt(np.prod(rhs[:3])), jnp.float32)
  options = xla_cpu.train_step_options(parallel.make_mesh())  # as the train step is compiled
  step = jax.jit(forward_backward, compiler_options=options).lower(x, w).compile()
  return lambda: jax.block_until_ready(step(x, w))


def time_torch(lhs, rhs, strides, padding):
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal(lhs).astype(np.float32).transpose(0, 3, 1, 2).copy())
  w = torch.from_numpy(
    (rng.standard_normal(rhs) / np.sqrt(np.prod(rhs[:3])))
    .astype(np.float32)
    .transpose(3, 2, 0, 1)
    .copy()
  )
  (top, bottom), (left, right) = padding

  def forward_backward():
    a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
    if (top, left) == (bottom, right):  # conv2d pads symmetrically itself
      y = torch.nn.functional.conv2d(a, b, stride=strides, padding=(top, left))
    else:  # as diffusers' Downsample2D: pad bottom / right, then convolve
      y = torch.nn.functional.conv2d(
        torch.nn.functional.pad(a, (left, right, top, bottom)), b, stride=strides
      )
    y.backward(y)

  return forward_backward


def _time_all(framework, config_path, batch, repeats):
  """[(lhs, rhs, strides, count, median ms)] for every convolution shape, in this process."""
  config = load_config(config_path, [])
  config.training.batch_size = batch
  timer = time_jax if framework == "jax" else time_torch
  rows = []
  for (lhs, rhs, strides, padding), count in sorted(convolutions(config, batch).items()):
    fn = timer(lhs, rhs, strides, padding)
    fn()
    fn()
    rows.append((lhs, rhs, strides, count, 1e3 * statistics.median(call_times(fn, repeats))))
    print(
      f"  {framework}: {lhs} * {rhs} stride {strides[0]} x{count}: {rows[-1][-1]:.2f} ms",
      file=sys.stderr,
      flush=True,
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "cifar10.py"))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "conv_shapes.json"))
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(_time_all(args.worker, args.config, args.batch, args.repeats)))
    return
  print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
  timed = {}
  for framework in ("jax", "torch"):
    proc = subprocess.run(
      [
        sys.executable,
        os.path.abspath(__file__),
        f"--worker={framework}",
        f"--config={args.config}",
        f"--batch={args.batch}",
        f"--repeats={args.repeats}",
      ],
      capture_output=True,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
      raise RuntimeError(
        f"the {framework} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
      )
    timed[framework] = json.loads(results[-1][len("RESULT ") :])
  assert [row[:4] for row in timed["jax"]] == [row[:4] for row in timed["torch"]], (
    "workers saw different shapes"
  )
  rows = [
    dict(input=lhs, kernel=rhs, strides=strides, count=count, jax_ms=jax_ms, torch_ms=torch_row[-1])
    for (lhs, rhs, strides, count, jax_ms), torch_row in zip(
      timed["jax"], timed["torch"], strict=True
    )
  ]
  print("\n| input (NHWC) | kernel | stride | count | XLA ms | PyTorch ms | PyTorch / XLA speed |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['input']} | {r['kernel'][2]}->{r['kernel'][3]} | {r['strides'][0]} | {r['count']} | "
      f"{r['jax_ms']:.2f} | {r['torch_ms']:.2f} | {r['torch_ms'] / r['jax_ms']:.2f} |"
    )
  total_jax = sum(r["count"] * r["jax_ms"] for r in rows)
  total_torch = sum(r["count"] * r["torch_ms"] for r in rows)
  print(
    f"\nall convolutions of one train step, forward + backward: XLA {total_jax:.0f} ms, "
    f"PyTorch {total_torch:.0f} ms (difference {total_jax - total_torch:+.0f} ms); "
    f"load average after: {os.getloadavg()[0]:.2f}"
  )
  write_json(
    args.json,
    dict(
      config=args.config,
      batch=args.batch,
      rows=rows,
      total_jax_ms=total_jax,
      total_torch_ms=total_torch,
      jax=jax.__version__,
    ),
  )


if __name__ == "__main__":
  main()
