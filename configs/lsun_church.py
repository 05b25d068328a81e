"""LSUN church, 1.2M steps; the 114M 256x256 model, eps / fixedsmall / L_simple, lr 2e-5, batch 64.

The config itself is ddpm_jax/configs/lsun_church.py (shipped with the package, so it also works
from an installed copy as
`--config=$(python -c 'import ddpm_jax.configs as c; print(c.__path__[0])')/lsun_church.py`); this
file keeps `--config=configs/lsun_church.py` working from the repository root.
"""

from ddpm_jax.configs.lsun_church import get_config  # pylint: disable=unused-import  # noqa: F401
