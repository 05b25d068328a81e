"""The paper's published models in and out of this package.

Imports a diffusers `UNet2DModel` directory (the Hub's `google/ddpm-*`) or an official TF checkpoint
into a workdir that `--mode=sample` and the evaluation modes read, and exports a workdir to a
diffusers directory. The command line is `python -m ddpm_jax.convert import|export ...`
(`__main__.py`).
"""

from ddpm_jax.convert.diffusers_format import diffusers_unet_config
from ddpm_jax.convert.diffusers_format import unet_params_from_diffusers
from ddpm_jax.convert.diffusers_format import unet_state_dict
from ddpm_jax.convert.scheduler import scheduler_config
from ddpm_jax.convert.workdir import detect_format
from ddpm_jax.convert.workdir import export_diffusers
from ddpm_jax.convert.workdir import import_checkpoint
