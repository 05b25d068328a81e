"""Devices and hosts: multi-host start-up, the one-axis `data` mesh, and global arrays.

Steps are written pmap-style (a per-device function that averages with `lax.pmean` over
the axis `data`) and mapped with `jax.shard_map` under `jax.jit`: one code path for one CPU,
eight GPUs and a TPU pod.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.errors import ConfigError

AXIS = "data"

_TPU_POD_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _in_cluster_environment() -> bool:
  """True in a multi-host TPU pod or a SLURM job of several tasks, where jax.distributed is
  needed."""
  if any(v in os.environ for v in _TPU_POD_VARS):
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def maybe_initialize_distributed(distributed_config) -> None:
  """Calls `jax.distributed.initialize` when the config asks or the environment is a pod / SLURM
  job.

  Must run before anything touches a JAX device.
  """
  mode = distributed_config.initialize
  assert mode in ("auto", "on", "off"), mode  # (validation.check_distributed)
  if mode == "off" or (mode == "auto" and not _in_cluster_environment()):
    return
  kwargs = {}
  if distributed_config.coordinator_address:
    kwargs["coordinator_address"] = distributed_config.coordinator_address
  if distributed_config.num_processes > 0:
    kwargs["num_processes"] = distributed_config.num_processes
  if distributed_config.process_id >= 0:
    kwargs["process_id"] = distributed_config.process_id
  jax.distributed.initialize(**kwargs)
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh() -> Mesh:
  """A one-axis mesh named `data` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def check_batch_size(batch_size: int, *, what: str) -> None:
  """Fails early, with the numbers, when a global batch cannot be split evenly over devices and
  hosts."""
  n, hosts = jax.device_count(), jax.process_count()
  if batch_size <= 0 or batch_size % n:
    raise ConfigError(
      f"{what} = {batch_size} is not divisible by the number of devices ({n}); "
      f"choose a multiple of {n}."
    )
  if batch_size % hosts:
    raise ConfigError(
      f"{what} = {batch_size} is not divisible by the number of processes ({hosts})."
    )


def round_up_to_devices(n: int) -> int:
  """The smallest batch >= n that splits evenly over all devices (extra samples are dropped
  later)."""
  d = jax.device_count()
  return -(-n // d) * d


def process_block(global_size: int) -> tuple[int, int]:
  """(first, end) of this process's rows of a global batch: process p holds rows p*L .. (p+1)*L - 1
  with L = global_size / process count."""
  local = global_size // jax.process_count()
  return jax.process_index() * local, (jax.process_index() + 1) * local


def process_rows(rows):
  """This process's block of the rows of a global batch that every process holds whole."""
  first, end = process_block(len(rows))
  return rows[first:end]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  return NamedSharding(mesh, P(*([None] * batch_axis), AXIS))


def replicate(tree, mesh: Mesh):
  """Places a pytree (identical on every process) on every device."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """Assembles the global batch from each process's rows (process p holds the p-th block)."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh, batch_axis), local_batch)


class DevicePrefetcher:
  """Global batches placed on the devices one dispatch ahead, so the next batch's host read and
  host->device copy overlap the step that is running (where dispatch is asynchronous: accelerators
  and multi-device CPU meshes; on one CPU device `ddpm_jax.main` dispatches synchronously, and the
  read follows the step).

  `take(n)` returns the next n host batches stacked as one global array [n, B, ...] (sharded on
  axis 1); `prefetch(n)` reads and places the following n now. The host iterator thus runs ahead of
  what was handed out: `rewind()` sets it back to just after the last batch handed out (dropping
  what was read ahead), as `take` does when asked for another count than was prefetched.
  """

  def __init__(self, host_iterator, mesh: Mesh):
    self._iterator = host_iterator
    self._mesh = mesh
    self._ahead = None  # (n, global array, host iterator state before it was read)

  def _read(self, n: int):
    """The next n host batches (arrays, or dicts of arrays) stacked, as global arrays."""
    stacked = jax.tree.map(lambda *b: np.stack(b), *[next(self._iterator) for _ in range(n)])
    return jax.tree.map(lambda b: global_batch(b, self._mesh, batch_axis=1), stacked)

  def prefetch(self, n: int) -> None:
    if n > 0 and self._ahead is None:
      state = self._iterator.get_state()
      self._ahead = (n, self._read(n), state)

  def take(self, n: int):
    if self._ahead is not None and self._ahead[0] != n:
      self.rewind()
    if self._ahead is None:
      return self._read(n)
    batch, self._ahead = self._ahead[1], None
    return batch

  def rewind(self) -> None:
    if self._ahead is not None:
      self._iterator.set_state(self._ahead[2])
      self._ahead = None


def to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-host) array as NumPy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def data_parallel(
  per_device_fn, mesh: Mesh, *, in_specs, out_specs, donate_argnums=(), compiler_options=None
):
  """jit(shard_map(per_device_fn)): the pmap idiom on a mesh of all devices.

  `check_vma=False` keeps pmap's semantics: a gradient taken inside is the device's own,
  and the function averages it with `lax.pmean` (with the check on, JAX would already
  sum gradients of replicated inputs over devices).
  """
  mapped = jax.shard_map(
    per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
  )
  return jax.jit(mapped, donate_argnums=donate_argnums, compiler_options=compiler_options)


def example_ids(local_batch_size: int):
  """Global indices of this device's examples; used to draw per-example randomness that does not
  depend on how many devices share the batch. Call inside a `data_parallel` function."""
  start = jax.lax.axis_index(AXIS) * local_batch_size
  return start + jax.numpy.arange(local_batch_size)
