"""Each family's prompt encoding (as its diffusers pipeline encodes) and the call of its denoiser: the
UNets of SD 1.x/2.x and SDXL here, the SD3/FLUX transformers through :mod:`esd.families.flow`."""


import torch
from torch.func import functional_call

from esd.core.sampler import Conditioning, PromptConditioning, zero_conditioning
from esd.families.flow import (
    SD3_T5_TOKENS,
    call_transformer,
    encode_flux,
    encode_sd3,
    is_flow_model,
    merges_zero_t5_tokens,
    tokenize,
)
from esd.families.models import DiffusionModels


def encode_erasure_prompts(models: DiffusionModels, words: list[str], erase_from: str | None, image_size: int,
                           sdxl_uncond: str = "empty", guidance: float | None = None) -> PromptConditioning:
    """Encode "", the concept words and the erase-from prompt in one call (``guidance``: see
    :func:`encode_prompts`). ``sdxl_uncond`` (SDXL only; see esd.train.config.SDXL_UNCONDS): "empty" encodes "" for
    e0 and the sampler, "zeros" gives both zero embeddings, "official" gives the sampler zero embeddings and
    e0 the encoded "" (esd_sdxl.py)."""
    prompts = ["", *words] + ([erase_from] if erase_from else [])
    cond = encode_prompts(models, prompts, image_size, zero_empty=sdxl_uncond == "zeros", guidance=guidance)
    n = len(words)
    uncond = cond.take(torch.tensor([0]))
    sampler_uncond = zero_conditioning(uncond) if sdxl_uncond == "official" and models.family == "sdxl" else None
    return PromptConditioning(uncond, cond.take(torch.arange(1, n + 1)),
                              cond.take(torch.tensor([n + 1])) if erase_from else None, sampler_uncond)


@torch.no_grad()
def encode_prompts(models: DiffusionModels, prompts: list[str], image_size: int,
                   zero_empty: bool = False, guidance: float | None = None) -> Conditioning:
    """Encode prompts as the diffusers pipelines do. SD 1.x/2.x: the text
    encoder's last hidden state. SDXL: the penultimate hidden states of both
    encoders concatenated, the second encoder's projected pooled output, and
    time ids (original size, crop (0, 0), target size). ``zero_empty`` (SDXL only) gives
    the empty prompt zero embeddings, as SDXL's pipeline does for a missing negative
    prompt (``force_zeros_for_empty_prompt``); without it "" is encoded like any prompt,
    as the official esd_sdxl.py does for e0 (``negative_prompt=""``). SD3 and FLUX: see
    :func:`esd.families.flow.encode_sd3` and :func:`esd.families.flow.encode_flux`; FLUX.1-dev's guidance embedding gets
    ``guidance`` with every prompt, the empty one too (its e0 is the empty prompt's prediction at that
    guidance, computed explicitly, as the model has no unguided pass)."""
    if models.family == "sd3":
        zero_tokens = 1 if merges_zero_t5_tokens(models.unet) else SD3_T5_TOKENS  # used without T5: see train.setup
        return Conditioning(*encode_sd3(models.tokenizers, models.text_encoders, prompts,
                                        models.unet.config.joint_attention_dim, zero_tokens))
    if models.family == "flux":
        if models.unet.config.guidance_embeds and guidance is None:
            raise ValueError("FLUX.1-dev's guidance embedding needs a guidance value (--start_guidance)")
        return Conditioning(*encode_flux(models.tokenizers, models.text_encoders, prompts,
                                         guidance if models.unet.config.guidance_embeds else None))
    device = models.text_encoders[0].device
    hidden, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenize(tokenizer, prompts, device)
        if models.family != "sdxl":
            hidden.append(encoder(ids)[0])
            continue
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output
    embeds = torch.cat(hidden, dim=-1)
    if models.family != "sdxl":
        return Conditioning(embeds)
    if zero_empty:
        empty = torch.tensor([p == "" for p in prompts], device=device)
        embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    time_ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]] * len(prompts),
                            dtype=embeds.dtype, device=device)
    return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids})


def call_unet(unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
              cond: Conditioning, params: dict | None = None) -> torch.Tensor:
    """The model's raw prediction (epsilon, v or x0, per its prediction type; the velocity for SD3 and
    FLUX). With ``params``, those tensors replace the module's own (theta* through ``functional_call``)."""
    if is_flow_model(unet):
        return call_transformer(unet, latents, timesteps, cond.prompt_embeds, cond.added_cond_kwargs, params)
    kwargs = {"encoder_hidden_states": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs}
    if params is None:
        return unet(latents, timesteps, **kwargs).sample
    return functional_call(unet, params, (latents, timesteps), kwargs).sample
