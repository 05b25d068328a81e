"""The random streams of a run (ddpm_jax/streams.py): one table, every stream distinct."""

import jax
import numpy as np

from ddpm_jax import streams


def test_the_streams_of_a_seed_are_distinct_and_are_the_ones_the_run_uses():
  numbers = list(streams.SEED_STREAMS.values())
  assert len(set(numbers)) == len(numbers), streams.SEED_STREAMS
  names = [n for n in dir(streams) if n.isupper() and isinstance(getattr(streams, n), int)]
  seed_level = {n for n in names if not n.startswith(("EXAMPLE_", "INTERPOLATION_", "INPAINT_"))}
  assert seed_level == set(streams.SEED_STREAMS), "a stream missing from SEED_STREAMS"
  keys = {name: jax.random.key_data(streams.key(0, s)) for name, s in streams.SEED_STREAMS.items()}
  assert len({np.asarray(k).tobytes() for k in keys.values()}) == len(keys)
  for prefix in ("EXAMPLE_", "INTERPOLATION_", "INPAINT_"):
    sub = [getattr(streams, n) for n in names if n.startswith(prefix)]
    assert len(set(sub)) == len(sub), prefix
