"""XLA:CPU settings for the train step, measured on the U-Net (bench/README.md "What was tried").

Compile options. XLA:CPU hands dots, convolutions and reductions to YNNPACK by default. For the
train step XLA's own convolutions are faster (+14-16% images/s on 2 cores); for the forward pass,
and so the sampler, YNNPACK's are (XLA's cost it 2-8%). The option therefore goes on the train
step's `jit` alone, not into XLA_FLAGS for the whole process, and only where it was measured: CPU
devices and jaxlib 0.10.x (the option is experimental and XLA refuses names it does not know).
XLA_FLAGS that set it win.

Host memory. XLA:CPU allocates a call's temporaries anew on every call (1.1 GB for the CIFAR10 train
step at batch 16). glibc serves a block that large with a fresh mmap and unmaps it on free, so every
step first-touches 1.1 GB of new pages: ~270,000 page faults and ~0.4 s of kernel time per step.
`keep_host_memory` runs single-device CPU computations on the main thread (whose malloc arena grows
with sbrk, without mmap, once told to) and tells glibc to keep freed memory: the next step reuses
the same pages (-12% step time). Programs call it first thing (`ddpm_jax.main` calls its two halves
around `jax.distributed.initialize`); it is process-wide, so the library never does.
"""

import ctypes
import os
import platform
import warnings

import jax

# no public API tells whether the backends have started
from jax._src import xla_bridge  # pylint: disable=g-bad-import-order
from jaxlib import version as jaxlib_version

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10.x's default is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE (the same optimized
# program, tested); the train step drops INDIVIDUAL_CONVOLUTION.
TRAIN_STEP_OPTIONS = {OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEASURED_JAXLIB = ("0.10.",)  # jaxlib version prefixes the options were measured with


def train_step_options(
  mesh, *, jaxlib_version_string: str | None = None, xla_flags: str | None = None
):
  """Compiler options for the train step's jit on `mesh`: TRAIN_STEP_OPTIONS on CPU devices with a
  measured jaxlib unless XLA_FLAGS sets the option itself; otherwise None (XLA's defaults)."""
  version = jaxlib_version.__version__ if jaxlib_version_string is None else jaxlib_version_string
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  on_cpu = all(device.platform == "cpu" for device in mesh.devices.flat)
  user_set = any(flag.lstrip("-").split("=")[0] == OPTION for flag in flags.split())
  if on_cpu and version.startswith(MEASURED_JAXLIB) and not user_set:
    return dict(TRAIN_STEP_OPTIONS)
  return None


# glibc's mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1  # -1: never give freed memory at the top of the heap back to the OS
_M_MMAP_MAX = -4  # 0: serve large blocks from the heap, not from one mmap each


def synchronous_dispatch() -> bool:
  """JAX runs single-device CPU computations on the calling thread instead of a dispatch thread.

  Takes effect only before JAX's backends start (the first computation or device query); returns
  False, changing nothing, when they have. Other backends and multi-device CPU computations are
  unaffected. The Python thread then waits for each CPU step: nothing is lost when a step takes
  seconds and the input pipeline's batches are ready (worker processes, or in memory)."""

  if xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def retain_freed_memory() -> bool:
  """Tells glibc's malloc to serve large blocks from the heap and never to trim it (every arena
  keeps its peak), so that the main thread's memory freed by one train step is reused by the next
  without page faults. Returns False where the C library is not glibc (nothing is changed there);
  with another allocator preloaded (tcmalloc, jemalloc) the call changes nothing either."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def retain_freed_memory_on_one_cpu() -> bool:
  """retain_freed_memory() when this process computes on one CPU device, the case synchronous
  dispatch moves onto the main thread; otherwise nothing. Starts JAX's backends. Returns whether
  applied."""

  return jax.default_backend() == "cpu" and jax.local_device_count() == 1 and retain_freed_memory()


def keep_host_memory() -> bool:
  """Both settings, for a program that trains on one CPU device: call it before any JAX computation
  (multi-host: `synchronous_dispatch()`, then `jax.distributed.initialize()`, then
  `retain_freed_memory_on_one_cpu()`, as `ddpm_jax.main` does). Returns whether the memory is kept;
  False, changing nothing, when called after the backends started or on any other device."""
  if not synchronous_dispatch():
    warnings.warn(
      "xla_cpu.keep_host_memory() was called after JAX's backends started; it changes nothing "
      "(call it before the first computation, e.g. in a fresh kernel).",
      stacklevel=2,
    )
    return False
  return retain_freed_memory_on_one_cpu()
