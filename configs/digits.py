"""The built-in offline dataset: scikit-learn's 1,797 handwritten digits at 16x16, one channel.

The config itself is ddpm_jax/configs/digits.py (shipped with the package, so it also works from an
installed copy as
`--config=$(python -c 'import ddpm_jax.configs as c; print(c.__path__[0])')/digits.py`); this file
keeps `--config=configs/digits.py` working from the repository root.
"""

from ddpm_jax.configs.digits import get_config  # pylint: disable=unused-import  # noqa: F401
