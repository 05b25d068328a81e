"""What the benchmarks share: loading a config file with overrides, timing calls, writing their JSON
record."""

import ast
import importlib.util
import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path, overrides):
  """get_config() of a config file (or a name in ddpm_jax/configs), with key=value overrides."""
  if not path.endswith(".py"):
    path = os.path.join(REPO, "ddpm_jax", "configs", f"{path}.py")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    old = config[section][name]
    config[section][name] = value if isinstance(old, str) else type(old)(ast.literal_eval(value))
  return config


def call_times(fn, repeats):
  """Wall-clock seconds of `repeats` consecutive calls of fn() (warm it up first)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def write_json(path, record):
  """Writes a benchmark's record (creating the folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"\nwrote {path}")
