"""The prompt encoding and the denoiser call of a loaded model, each its family's
(:meth:`esd.families.family.Family.encode`, :meth:`~esd.families.family.Family.call`)."""


import torch

from esd.core.sampler import Conditioning, PromptConditioning, zero_conditioning
from esd.families.models import DiffusionModels
from esd.families.registry import detect_family


def encode_erasure_prompts(models: DiffusionModels, words: list[str], erase_from: str | None, image_size: int,
                           sdxl_uncond: str = "empty", guidance: float | None = None) -> PromptConditioning:
    """Encode "", the concept words and the erase-from prompt in one call (``guidance``: see
    :func:`encode_prompts`). ``sdxl_uncond`` (SDXL only; see esd.train.settings.SDXL_UNCONDS): "empty" encodes ""
    for e0 and the sampler, "zeros" gives both zero embeddings, "official" gives the sampler zero embeddings and
    e0 the encoded "" (esd_sdxl.py)."""
    prompts = ["", *words] + ([erase_from] if erase_from else [])
    cond = encode_prompts(models, prompts, image_size, zero_empty=sdxl_uncond == "zeros", guidance=guidance)
    n = len(words)
    uncond = cond.take(torch.tensor([0]))
    sampler_uncond = zero_conditioning(uncond) if models.family.sampler_uncond_zeros(sdxl_uncond) else None
    return PromptConditioning(uncond, cond.take(torch.arange(1, n + 1)),
                              cond.take(torch.tensor([n + 1])) if erase_from else None, sampler_uncond)


def encode_prompts(models: DiffusionModels, prompts: list[str], image_size: int,
                   zero_empty: bool = False, guidance: float | None = None) -> Conditioning:
    """Encode prompts as the family's diffusers pipeline does. SD 1.x/2.x: the text encoder's last hidden
    state (:mod:`esd.families.sd`). SDXL: both encoders, pooled embeddings and time ids; ``zero_empty`` gives the
    empty prompt zero embeddings (:mod:`esd.families.sdxl`). SD3 and FLUX: see :func:`esd.families.flow.encode_sd3`
    and :func:`esd.families.flow.encode_flux`; FLUX.1-dev's guidance embedding gets ``guidance`` with every
    prompt, the empty one too (its e0 is the empty prompt's prediction at that guidance, computed explicitly, as
    the model has no unguided pass)."""
    return models.family.encode(models.tokenizers, models.text_encoders, models.unet, prompts, image_size,
                                zero_empty, guidance)


def call_unet(unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
              cond: Conditioning, params: dict | None = None) -> torch.Tensor:
    """The model's raw prediction (epsilon, v or x0, per its prediction type; the velocity for SD3 and
    FLUX), through its family's call. With ``params``, those tensors replace the module's own (theta* through
    ``functional_call``)."""
    return detect_family(unet).call(unet, latents, timesteps, cond, params)
