"""XLA:CPU compile options for the train step, measured on the U-Net (README "Performance").

XLA:CPU hands dots, convolutions and reductions to YNNPACK by default. For the train step XLA's own
convolutions are faster (+14-16% images/s on 2 cores); for the forward pass, and so the sampler,
YNNPACK's are (XLA's cost it 2-8%). The option therefore goes on the train step's `jit` alone, not into
XLA_FLAGS for the whole process, and only where it was measured: CPU devices and jaxlib 0.10.x (the
option is experimental and XLA refuses names it does not know). XLA_FLAGS that set it win.
"""

import os

from jaxlib import version as jaxlib_version

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10.x's default is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE (the same optimized
# program, tested); the train step drops INDIVIDUAL_CONVOLUTION.
TRAIN_STEP_OPTIONS = {OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
MEASURED_JAXLIB = ("0.10.",)  # jaxlib version prefixes the options were measured with


def train_step_options(mesh, *, jaxlib_version_string: str | None = None, xla_flags: str | None = None):
  """Compiler options for the train step's jit on `mesh`: TRAIN_STEP_OPTIONS on CPU devices with a
  measured jaxlib unless XLA_FLAGS sets the option itself; otherwise None (XLA's defaults)."""
  version = jaxlib_version.__version__ if jaxlib_version_string is None else jaxlib_version_string
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  on_cpu = all(device.platform == "cpu" for device in mesh.devices.flat)
  user_set = any(flag.lstrip("-").split("=")[0] == OPTION for flag in flags.split())
  if on_cpu and version.startswith(MEASURED_JAXLIB) and not user_set:
    return dict(TRAIN_STEP_OPTIONS)
  return None

