"""Run by tests in a fresh process: trains a tiny config and saves its final params as .npz.

usage: python tests/train_probe.py WORKDIR OUT.npz NUM_STEPS [PROCESS_ID NUM_PROCESSES PORT]
The device count comes from XLA_FLAGS; with the last three arguments it joins a
jax.distributed group on localhost. A WORKDIR with checkpoints is resumed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# conftest sets the environment (JAX_PLATFORMS, the compilation cache) before JAX is imported
import conftest  # pylint: disable=g-import-not-at-top,unused-import  (environment set-up)

# isort: split
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def main(workdir, out, num_steps, process_id=None, num_processes=None, port=None):
  config = conftest.tiny_config(
    model__dropout=0.1,
    training__num_steps=int(num_steps),
    training__sample_every=0,
    training__num_grid_samples=0,
  )
  if process_id is not None:
    config.distributed.initialize = "on"
    config.distributed.coordinator_address = f"localhost:{port}"
    config.distributed.num_processes = int(num_processes)
    config.distributed.process_id = int(process_id)
  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  parallel.maybe_initialize_distributed(config.distributed)
  state = train.train(config, workdir)
  flat = {
    jax.tree_util.keystr(p): parallel.to_host(v)
    for p, v in jax.tree_util.tree_leaves_with_path((state.params, state.ema_params))
  }
  if jax.process_index() == 0:
    np.savez(out, devices=jax.device_count(), processes=jax.process_count(), **flat)


if __name__ == "__main__":
  main(*sys.argv[1:])
