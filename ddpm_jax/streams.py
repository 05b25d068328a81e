"""The random streams of a run, in one table: every key a run draws from comes from
`key(seed, STREAM)` (or, within one job, from `fold_in` with one of the sub-stream numbers below),
so no two jobs share randomness by accident.

Changing a number changes every result drawn from that stream: add new streams, do not renumber.
"""

import jax

# Streams of config.seed: jax.random.fold_in(jax.random.key(seed), STREAM).
PARAMS = 0  # the initial parameters (state.init_state)
TRAINING = 1  # the key kept in the train state: per-step timesteps, noise and dropout
TRAIN_GRID = 2  # the sample grids written during training
SAMPLES = 3  # --mode=sample and FID samples: sample i from fold_in(key, i), the same in both
BPD = 4  # --mode=bpd: example i's noise from fold_in(key, i)
INTERPOLATION = 5  # --mode=interpolate: pair p's noise from fold_in(key, p)
# --mode=inpaint: row r (image r // num_samples, sample r % num_samples): fold_in(key, r)
INPAINT = 6

SEED_STREAMS = dict(
  PARAMS=PARAMS,
  TRAINING=TRAINING,
  TRAIN_GRID=TRAIN_GRID,
  SAMPLES=SAMPLES,
  BPD=BPD,
  INTERPOLATION=INTERPOLATION,
  INPAINT=INPAINT,
)

# Sub-streams of one training example: fold_in(fold_in(fold_in(training key, step), example id), X).
EXAMPLE_TIMESTEP = 0
EXAMPLE_NOISE = 1
EXAMPLE_DROPOUT = 2
EXAMPLE_LABEL_DROPOUT = 3  # conditional models: whether the example's label becomes the null label

# Sub-streams of the interpolation key: the sources' q_sample noise and the reverse process's noise.
INTERPOLATION_FORWARD = 0
INTERPOLATION_REVERSE = 1

# Sub-streams of one inpainting row's key: x_T, then for move i of the schedule (from
# fold_in(fold_in(row key, X), i)) the reverse step's noise, the known region's q_sample noise and a
# forward jump's noise.
INPAINT_START = 0
INPAINT_REVERSE = 1
INPAINT_KNOWN = 2
INPAINT_FORWARD = 3


def key(seed: int, stream: int) -> jax.Array:
  """The base key of one stream of a run: fold_in(key(seed), stream)."""
  return jax.random.fold_in(jax.random.key(seed), stream)
