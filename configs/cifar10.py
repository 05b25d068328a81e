"""CIFAR10, 32x32: the paper's 35.7M-parameter model, eps / fixedlarge / L_simple, 800k steps.

The config itself is ddpm_jax/configs/cifar10.py (shipped with the package, so it also works from an
installed copy as
`--config=$(python -c 'import ddpm_jax.configs as c; print(c.__path__[0])')/cifar10.py`); this file
keeps `--config=configs/cifar10.py` working from the repository root.
"""

from ddpm_jax.configs.cifar10 import get_config  # pylint: disable=unused-import  # noqa: F401
