"""The class-conditional digits model with classifier-free guidance: 10 digit classes, 10% label
dropout, a class grid at the end.

The config itself is ddpm_jax/configs/digits_cond.py (shipped with the package); this file keeps
`--config=configs/digits_cond.py` working from the repository root.
"""

from ddpm_jax.configs.digits_cond import get_config  # pylint: disable=unused-import  # noqa: F401
