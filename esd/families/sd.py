"""SD 1.x and SD 2.x: a UNet with one CLIP text encoder (OpenAI's CLIP-L for 1.x, OpenCLIP-H for 2.x).
SD 2.x's transformers use linear projections; that is how its UNet config tells it from 1.x's."""

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch.func import functional_call

from esd.core.sampler import Conditioning
from esd.families.family import Family, KohyaLabels, config_value
from esd.families.flow import tokenize


class UNetFamily(Family):
    """The UNet families (SD 1.x, 2.x and, in esd.families.sdxl, SDXL): the call of the UNet is theirs."""

    def call(self, denoiser, latents, timesteps, cond, params=None):
        kwargs = {"encoder_hidden_states": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs}
        if params is None:
            return denoiser(latents, timesteps, **kwargs).sample
        return functional_call(denoiser, params, (latents, timesteps), kwargs).sample


@dataclass(frozen=True, eq=False)
class OneEncoderFamily(UNetFamily):
    """SD 1.x and 2.x: the text encoder's last hidden state is the conditioning."""

    linear_projection: bool = False  # SD 2.x's transformers project with Linear layers, 1.x's with 1x1 convs

    def has_config(self, config) -> bool:
        return config_value(config, "addition_embed_type") != "text_time" and \
            bool(config_value(config, "use_linear_projection")) == self.linear_projection

    @torch.no_grad()
    def encode(self, tokenizers, text_encoders, denoiser, prompts, image_size, zero_empty=False, guidance=None):
        (tokenizer,), (encoder,) = tokenizers, text_encoders
        return Conditioning(encoder(tokenize(tokenizer, prompts, encoder.device))[0])

    def assemble_pipeline(self, models, denoiser):
        return StableDiffusionPipeline(models.vae, models.text_encoders[0], models.tokenizers[0], denoiser,
                                       models.scheduler, None, None, requires_safety_checker=False)


# What the UNet families share.
UNET = dict(denoiser="unet", denoiser_title="UNet (SD 1.x, 2.x, XL)", denoiser_word="UNet",
            denoiser_class=UNet2DConditionModel, subfolder="unet", layouts=("unet",), esd_x="xattn")

SD1 = OneEncoderFamily("sd1", "SD 1.x", **UNET, pipeline_classes=("StableDiffusionPipeline",),
                       one_text_encoder=True, kohya=KohyaLabels("sd_v1"),
                       ldm_text_encoders=(("clip", "cond_stage_model.transformer."),))

SD2 = OneEncoderFamily("sd2", "SD 2.x", **UNET, pipeline_classes=("StableDiffusionPipeline",),
                       one_text_encoder=True, kohya=KohyaLabels("sd_v2", v2=True), linear_projection=True,
                       ldm_text_encoders=(("openclip", "cond_stage_model.model."),))
