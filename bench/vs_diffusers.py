"""Side by side: this project's U-Net against diffusers' UNet2DModel (PyTorch), same network and
batch.

Measures the forward pass (one sampling step's network call, eval mode) and the full train step
(forward with dropout 0.1, backward, global-norm clipping, Adam, EMA) of the CIFAR10 model
(35,746,307 parameters). Each side runs in its own fresh process per round, the order alternating
between rounds, warm-up (compilation) first, then the median of --steps timed steps; the summary
is the median over rounds (and the per-round ratio). Each process also measures its framework's
float32 matmul rate (2048 x 2048, best of 10), and the achieved FLOP/s uses the FLOPs per image from
XLA's cost analysis (the same network on both sides). The machine's load average is recorded before
and after each round: a busy machine distorts the ratio (PyTorch suffers more from competing
processes than XLA).

usage: python bench/vs_diffusers.py [--batch=16] [--rounds=3] [--steps=5] [--what=forward,train]
         [--dtype=float32|bfloat16] [--cpu_options=on|off|both] [--json=PATH]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from common import call_times  # pylint: disable=g-import-not-at-top  (this folder)
from common import write_json  # pylint: disable=g-import-not-at-top  (this folder)

MATMUL_N = 2048
EMA_DECAY = 0.9999


# ----------------------------------------------------------------------------- shared helpers


def _median_time(fn, repeats):
  return statistics.median(call_times(fn, repeats))


def _best_time(fn, repeats):
  """The shortest of `repeats` runs: a peak rate, as little disturbed by other processes as
  possible."""
  fn()
  return min(call_times(fn, repeats))


def _cifar10_config(*, batch, dtype):
  from ddpm_jax.configs import cifar10  # pylint: disable=g-import-not-at-top

  config = cifar10.get_config()
  config.model.dropout = 0.1  # the paper's CIFAR10 value, on both sides
  config.model.dtype = dtype
  config.training.batch_size = batch
  return config


# ----------------------------------------------------------------------------- workers


def jax_worker(spec):
  """Times this project's eval forward pass and train step; returns a dict of results."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top
  from ddpm_jax import xla_cpu  # pylint: disable=g-import-not-at-top

  # as `ddpm_jax.main` runs: synchronous CPU dispatch and glibc keeping freed memory (xla_cpu),
  # first thing
  host_memory = xla_cpu.keep_host_memory() if spec["cpu_options"] else False
  batch = spec["batch"]
  config = _cifar10_config(batch=batch, dtype=spec["dtype"])
  built = state_lib.build(config)
  mesh = parallel.make_mesh()
  shape = state_lib.image_shape(config)
  out = dict(
    framework=f"jax {jax.__version__}",
    device=jax.devices()[0].device_kind,
    host_memory=host_memory,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    threads=os.cpu_count(),
  )

  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  out["matmul_gflops"] = (
    2 * MATMUL_N**3 / _best_time(lambda: matmul(a, a).block_until_ready(), 10) / 1e9
  )

  state = jax.jit(
    functools.partial(state_lib.init_state, built.model, built.tx, seed=0, shape=shape),
    out_shardings=parallel.replicated(mesh),
  )()
  rng = np.random.default_rng(0)
  if "forward" in spec["what"]:
    x = jnp.asarray(rng.uniform(-1, 1, (batch,) + shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    t0 = time.perf_counter()
    forward = (
      jax.jit(lambda p, x, t: built.model.apply(p, x, t, train=False))
      .lower(state.params, x, t)
      .compile()
    )
    out["forward_compile_s"] = time.perf_counter() - t0
    out["forward_flops_per_image"] = _flops(forward) / batch
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
      forward(state.params, x, t).block_until_ready()
    out["forward_warmup_s"] = time.perf_counter() - t0
    out["forward_step_s"] = [
      _median_time(lambda: forward(state.params, x, t).block_until_ready(), 1)
      for _ in range(spec["steps"])
    ]
  if "train" in spec["what"]:
    step_fn = train.make_train_step(
      built.model,
      built.diffusion,
      built.tx,
      mesh,
      ema_decay=EMA_DECAY,
      lr_fn=built.lr_fn,
      cpu_options=spec["cpu_options"],
    )
    images = rng.integers(0, 256, (1, batch) + shape).astype(np.uint8)
    batches = parallel.global_batch(images, mesh, batch_axis=1)
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, batches).compile()
    out["train_compile_s"] = time.perf_counter() - t0
    out["train_step_options"] = xla_cpu.train_step_options(mesh) if spec["cpu_options"] else None
    out["train_flops_per_image"] = _flops(step_fn) / batch
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
      state, _ = step_fn(state, batches)
      jax.block_until_ready(state)
    out["train_warmup_s"] = time.perf_counter() - t0
    times = []
    for _ in range(spec["steps"]):
      t0 = time.perf_counter()
      state, _ = step_fn(state, batches)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    out["train_step_s"] = times
  return out


def _flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def torch_worker(spec):
  """Times diffusers' UNet2DModel: eval forward and a train step with torch.optim.Adam and
  clip_grad_norm_."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import diffusers  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from ddpm_jax import convert  # pylint: disable=g-import-not-at-top

  batch = spec["batch"]
  config = _cifar10_config(batch=batch, dtype="float32")
  kwargs = convert.diffusers_unet_config(
    config.model, image_size=32, num_channels=3, learned_variance=False
  )
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**kwargs)
  out = dict(
    framework=f"torch {torch.__version__}, diffusers {diffusers.__version__}",
    device="cpu",
    threads=torch.get_num_threads(),
    params=sum(p.numel() for p in model.parameters()),
  )
  autocast = (
    (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if spec["dtype"] == "bfloat16"
    else (contextlib.nullcontext)
  )

  a = torch.randn(MATMUL_N, MATMUL_N)
  torch.mm(a, a)
  out["matmul_gflops"] = 2 * MATMUL_N**3 / _best_time(lambda: torch.mm(a, a), 10) / 1e9

  rng = np.random.default_rng(0)
  if "forward" in spec["what"]:
    model.eval()
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 1000, batch))

    def forward():
      with torch.no_grad(), autocast():
        return model(x, t).sample

    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
      forward()
    out["forward_warmup_s"] = time.perf_counter() - t0
    out["forward_step_s"] = [_median_time(forward, 1) for _ in range(spec["steps"])]
  if "train" in spec["what"]:
    model.train()
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas).astype(np.float32))
    x0 = torch.from_numpy(rng.integers(0, 256, (batch, 3, 32, 32)).astype(np.float32) / 127.5 - 1)

    def train_step():
      t = torch.randint(0, 1000, (batch,))
      noise = torch.randn_like(x0)
      a_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
      x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise
      with autocast():
        eps = model(x_t, t).sample
      loss = torch.mean((eps.float() - noise) ** 2)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      optimizer.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - EMA_DECAY)  # pylint: disable=protected-access

    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
      train_step()
    out["train_warmup_s"] = time.perf_counter() - t0
    out["train_step_s"] = [_median_time(train_step, 1) for _ in range(spec["steps"])]
  return out


# ----------------------------------------------------------------------------- the driver


def _sides(args):
  """(label, worker, XLA_FLAGS, the train step's CPU options on?) per measured side, first round's
  order."""
  jax_flags = " ".join([os.environ.get("XLA_FLAGS", ""), args.extra_xla_flags]).strip()
  sides = []
  for on in (True, False):
    if args.cpu_options == "both":
      sides.append((f"ddpm_jax (CPU options {'on' if on else 'off'})", "jax", jax_flags, on))
    elif args.cpu_options == ("on" if on else "off"):
      sides.append(("ddpm_jax", "jax", jax_flags, on))
  sides.append(("diffusers", "torch", os.environ.get("XLA_FLAGS", ""), False))
  return sides


def _run_worker(worker, spec, xla_flags):
  env = dict(os.environ, XLA_FLAGS=xla_flags, TF_CPP_MIN_LOG_LEVEL="3")
  env.setdefault("JAX_PLATFORMS", "cpu") if spec["cpu"] else None
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), f"--worker={worker}", f"--spec={json.dumps(spec)}"],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  raise RuntimeError(f"{worker} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _machine():
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
      )
  return dict(
    cpu=model or platform.processor(),
    cores=os.cpu_count(),
    system=platform.platform(),
    python=platform.python_version(),
  )


def _summarise(rounds, labels, what, batch):
  summary = {}
  for label in labels:
    for kind in what:
      medians = [statistics.median(r[label][f"{kind}_step_s"]) for r in rounds]
      summary.setdefault(label, {})[kind] = dict(
        median_step_s=statistics.median(medians),
        round_medians_s=medians,
        images_per_s=batch / statistics.median(medians),
      )
    summary[label]["matmul_gflops"] = statistics.median(r[label]["matmul_gflops"] for r in rounds)
  for (
    label
  ) in labels:  # both sides of a ratio measured minutes apart: robust to slow drifts in load
    for kind in what:
      summary[label][kind]["ratio_per_round"] = [
        statistics.median(r["diffusers"][f"{kind}_step_s"])
        / statistics.median(r[label][f"{kind}_step_s"])
        for r in rounds
      ]
  return summary


def _print_table(summary, labels, what, *, batch, flops_per_image):
  reference = "diffusers"
  print(f"\n| what (batch {batch}) | {' | '.join(labels)} | ratio (first / diffusers) |")
  print("|---|" + "---|" * (len(labels) + 1))
  for kind in what:
    cells = []
    for label in labels:
      s = summary[label][kind]
      rate = s["images_per_s"]
      achieved = rate * flops_per_image.get(kind, float("nan")) / 1e9
      spread = ", ".join(f"{batch / m:.2f}" for m in s["round_medians_s"])
      cells.append(
        f"{rate:.2f} img/s ({s['median_step_s']:.2f} s/step; rounds {spread}; "
        f"{achieved:.0f} GFLOP/s)"
      )
    ratio = summary[labels[0]][kind]["images_per_s"] / summary[reference][kind]["images_per_s"]
    per_round = ", ".join(f"{r:.2f}" for r in summary[labels[0]][kind]["ratio_per_round"])
    print(
      f"| {'forward pass (eval)' if kind == 'forward' else 'train step'} | {' | '.join(cells)} | "
      f"**{ratio:.2f}x** (per round {per_round}) |"
    )
  peaks = ", ".join(f"{label} {summary[label]['matmul_gflops']:.0f}" for label in labels)
  print(f"\nfloat32 matmul {MATMUL_N}x{MATMUL_N} GFLOP/s: {peaks}")
  print(
    "FLOPs per image (XLA cost analysis): "
    + ", ".join(
      f"{kind} {flops_per_image[kind] / 1e9:.1f} G" for kind in what if kind in flops_per_image
    )
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--steps", type=int, default=5, help="timed steps per round and side (median taken)"
  )
  parser.add_argument(
    "--warmup", type=int, default=2, help="untimed steps first (JAX compiles before them)"
  )
  parser.add_argument("--what", default="forward,train")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
    "--cpu_options",
    default="on",
    choices=["on", "off", "both"],
    help="the train step's CPU settings on the JAX side (ddpm_jax.xla_cpu: compile options, "
    "synchronous dispatch, glibc keeping freed memory), as ddpm_jax.main uses them",
  )
  parser.add_argument(
    "--extra_xla_flags", default="", help="more XLA flags for the JAX side (experiments)"
  )
  parser.add_argument(
    "--gpu", action="store_true", help="let JAX use an accelerator (default: JAX_PLATFORMS=cpu)"
  )
  parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "vs_diffusers.json"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    result = (jax_worker if args.worker == "jax" else torch_worker)(json.loads(args.spec))
    print("RESULT " + json.dumps(result))
    return

  what = [w for w in args.what.split(",") if w]
  spec = dict(
    batch=args.batch,
    steps=args.steps,
    warmup=args.warmup,
    what=what,
    dtype=args.dtype,
    cpu=not args.gpu,
  )
  sides = _sides(args)
  labels = [label for label, *_ in sides]
  rounds, load = [], []
  for r in range(args.rounds):
    order = sides if r % 2 == 0 else sides[::-1]
    load_before = os.getloadavg()[0]
    results = {}
    for label, worker, xla_flags, cpu_options in order:
      print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
      results[label] = _run_worker(worker, dict(spec, cpu_options=cpu_options), xla_flags)
    rounds.append(results)
    load.append((load_before, os.getloadavg()[0]))
  flops_per_image = {kind: rounds[0][labels[0]][f"{kind}_flops_per_image"] for kind in what}
  summary = _summarise(rounds, labels, what, args.batch)
  print(
    f"\nddpm_jax vs diffusers UNet2DModel, CIFAR10 model, {args.dtype}, batch {args.batch}, "
    f"{args.rounds} rounds x {args.steps} timed steps; machine: {_machine()['cpu']} "
    f"({os.cpu_count()} cores); "
    f"1-min load average per round: {', '.join(f'{a:.1f}-{b:.1f}' for a, b in load)}"
  )
  for label, _, xla_flags, _ in sides:
    options = rounds[0][label].get("train_step_options")
    print(
      f"  {label}: {rounds[0][label]['framework']}"
      + (f", XLA_FLAGS='{xla_flags}'" if xla_flags else "")
      + (f", train step compiled with {options}" if options else "")
      + (
        ", host memory kept (synchronous dispatch, glibc keeps freed memory)"
        if rounds[0][label].get("host_memory")
        else ""
      )
    )
  _print_table(summary, labels, what, batch=args.batch, flops_per_image=flops_per_image)
  busy = [r + 1 for r, pair in enumerate(load) if max(pair) > 1.5 * (os.cpu_count() or 1)]
  if busy:
    print(
      f"\nWARNING: the machine was busy in round(s) {busy} (1-min load average above 1.5 x "
      f"{os.cpu_count()} cores): other processes distort these numbers, PyTorch's more than XLA's; "
      "rerun on a quiet machine."
    )
  record = dict(
    args={k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
    machine=_machine(),
    load_average_per_round=load,
    flops_per_image=flops_per_image,
    summary=summary,
    rounds=rounds,
    time=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  write_json(args.json, record)


if __name__ == "__main__":
  main()
