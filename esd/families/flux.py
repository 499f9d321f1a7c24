"""FLUX.1 (dev, schnell): a flow-matching transformer with joint and single-stream blocks, CLIP-L's pooled
output and T5; dev takes its guidance as an input embedding, schnell is distilled to sample without, so neither
samples with classifier-free guidance (:mod:`esd.families.flow` holds the encoding and the call, as
``FluxPipeline`` does them)."""

from diffusers import FluxTransformer2DModel

from esd.core.sampler import Conditioning
from esd.families.family import Family
from esd.families.flow import call_flux, encode_flux
from esd.families.sd3 import TRANSFORMER

FLUX_DEFAULT_SAMPLE_SIZE = 128  # latent pixels; FluxPipeline's default_sample_size (its transformer config has none)


class FluxFamily(Family):
    def call(self, denoiser, latents, timesteps, cond, params=None):
        return call_flux(denoiser, latents, timesteps, cond.prompt_embeds, cond.added_cond_kwargs, params)

    def sample_size(self, config) -> int:
        return FLUX_DEFAULT_SAMPLE_SIZE

    def encode(self, tokenizers, text_encoders, denoiser, prompts, image_size, zero_empty=False, guidance=None):
        embedded = denoiser.config.guidance_embeds
        if embedded and guidance is None:
            raise ValueError("FLUX.1-dev's guidance embedding needs a guidance value (--start_guidance)")
        return Conditioning(*encode_flux(tokenizers, text_encoders, prompts, guidance if embedded else None))


# 12 B parameters: by default the path that fits one 80 GB GPU with mmdit-x and mmdit-x-single (docs/performance.md,
# "FLUX.1-dev memory"): frozen weights in bf16, gradient checkpointing.
FLUX = FluxFamily("flux", "a flux transformer", denoiser="flux", denoiser_title="FLUX.1 transformer",
                  denoiser_class=FluxTransformer2DModel, pipeline_classes=("FluxPipeline",),
                  layouts=("mmdit", "mmdit-single"), **TRANSFORMER,
                  packed_channels=4, true_cfg=False, linspace_sigmas=True,
                  training_defaults=(("mixed_precision", "bf16"), ("gradient_checkpointing", True)))
