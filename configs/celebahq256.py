"""CelebA-HQ 256x256: the 114M model, eps / fixedsmall / L_simple, lr 2e-5, batch 64, 0.5M steps.

The config itself is ddpm_jax/configs/celebahq256.py (shipped with the package, so it also works
from an installed copy as
`--config=$(python -c 'import ddpm_jax.configs as c; print(c.__path__[0])')/celebahq256.py`); this
file keeps `--config=configs/celebahq256.py` working from the repository root.
"""

from ddpm_jax.configs.celebahq256 import get_config  # pylint: disable=unused-import  # noqa: F401
