"""The environment the package's command lines set before the libraries they use read it.

`python -m ddpm_jax.main`, `ddpm_jax.convert` and `ddpm_jax.metrics` call `apply()` before any other
import; a program or notebook that reads or writes gs:// paths calls it first thing too. Values
already in the environment are kept.
"""

import os

DEFAULTS = {
  # TensorFlow (imported for TFDS) starts quietly unless asked otherwise.
  "TF_CPP_MIN_LOG_LEVEL": "3",
  # gs:// paths go through gcsfs in every library that uses etils.epath (this package, orbax,
  # Grain, TFDS), not through TensorFlow's file system: one way to a bucket, the tested one.
  "EPATH_USE_TF": "false",
  # ... and every listing asks the bucket: other processes write to it (a pod's workers, the
  # evaluation worker), so a listing cached in this process would hide their checkpoints.
  "FSSPEC_GCS": '{"use_listings_cache": false}',
}


def apply() -> None:
  for name, value in DEFAULTS.items():
    os.environ.setdefault(name, value)
