"""Original-format (CompVis ``ldm``) weights for the tests, made with :mod:`esd.families.ldm_single_file`, so that
loading
original-format files is checked without downloading any."""

from tiny import SD_UP

from esd.families.ldm_single_file import checkpoint_to_ldm, unet_to_ldm
from esd.families.registry import FAMILIES

SD1_UNET = {"layers_per_block": 2, "up_block_types": SD_UP}  # the block layout of SD 1.x and the tiny sd1


def to_ldm(state_dict: dict) -> dict:
    """An SD 1.x UNet state dict under ``model.diffusion_model.*`` names."""
    return unet_to_ldm(state_dict, SD1_UNET)


def pipeline_to_ldm(pipe) -> dict:
    """A whole SD 1.x pipeline as one CompVis-format checkpoint (UNet, VAE, CLIP text encoder)."""
    return checkpoint_to_ldm(pipe.unet.state_dict(), pipe.unet.config, FAMILIES["sd1"].ldm_text_encoders, pipe.vae,
                             [pipe.text_encoder])
