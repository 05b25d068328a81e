"""Every configuration key, at the paper's CIFAR10 value (Ho et al. 2020, Appendix B).

The config itself is ddpm_jax/configs/default.py (shipped with the package, so it also works from an
installed copy as
`--config=$(python -c 'import ddpm_jax.configs as c; print(c.__path__[0])')/default.py`); this file
keeps `--config=configs/default.py` working from the repository root.
"""

from ddpm_jax.configs.default import get_config  # pylint: disable=unused-import  # noqa: F401
