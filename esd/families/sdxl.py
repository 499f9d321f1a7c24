"""SDXL: a UNet with two CLIP text encoders (CLIP-L, OpenCLIP-bigG) and text-time added conditioning, which
is how its UNet config tells it (``addition_embed_type`` "text_time")."""

import torch
from diffusers import StableDiffusionXLPipeline

from esd.core.sampler import Conditioning
from esd.families.family import KohyaLabels, config_value
from esd.families.flow import tokenize
from esd.families.sd import UNET, UNetFamily


class SDXLFamily(UNetFamily):
    def has_config(self, config) -> bool:
        return config is not None and config_value(config, "addition_embed_type") == "text_time"

    @torch.no_grad()
    def encode(self, tokenizers, text_encoders, denoiser, prompts, image_size, zero_empty=False, guidance=None):
        """The penultimate hidden states of both encoders concatenated, the second encoder's projected pooled
        output, and time ids (original size, crop (0, 0), target size). ``zero_empty`` gives the empty prompt
        zero embeddings, as SDXL's pipeline does for a missing negative prompt (``force_zeros_for_empty_prompt``);
        without it "" is encoded like any prompt, as the official esd_sdxl.py does for e0
        (``negative_prompt=""``)."""
        device = text_encoders[0].device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        embeds = torch.cat(hidden, dim=-1)
        if zero_empty:
            empty = torch.tensor([p == "" for p in prompts], device=device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]] * len(prompts),
                                dtype=embeds.dtype, device=device)
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids})

    def sampler_uncond_zeros(self, sdxl_uncond: str) -> bool:
        return sdxl_uncond == "official"

    def assemble_pipeline(self, models, denoiser):
        return StableDiffusionXLPipeline(models.vae, *models.text_encoders, *models.tokenizers, denoiser,
                                         models.scheduler)


SDXL = SDXLFamily("sdxl", "SDXL", **UNET, pipeline_classes=("StableDiffusionXLPipeline",),
                  blocks_only_official=True, official_script="esd_sdxl.py",
                  kohya=KohyaLabels("sdxl_base_v1-0", sgm_names=True),
                  ldm_text_encoders=(("clip", "conditioner.embedders.0.transformer."),
                                     ("openclip", "conditioner.embedders.1.model.")))
