"""Prompt conditioning and the guided partial-denoising sampler, written from a
diffusers ``unet`` and ``scheduler`` (no pipeline is patched)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .models import DiffusionModels

UNetFn = Callable[[torch.Tensor, torch.Tensor, "Conditioning"], torch.Tensor]


@dataclass
class Conditioning:
    """Text conditioning for a batch: ``prompt_embeds`` (B, 77, D) and, for SDXL,
    ``added_cond_kwargs`` with ``text_embeds`` (B, P) and ``time_ids`` (B, 6)."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        extra = None
        if self.added_cond_kwargs is not None:
            extra = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds.to(device=device, dtype=dtype), extra)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        extra = None
        if parts[0].added_cond_kwargs is not None:
            extra = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs}
        return Conditioning(torch.cat([p.prompt_embeds for p in parts]), extra)


@dataclass
class PromptConditioning:
    """The prompts of one erasure, encoded once, by role. ``concept(rows)`` and ``source(rows)``
    take one concept index per latent row (B,)."""

    uncond: Conditioning  # "" (1 row): e0, and the sampler's unconditional branch
    concepts: Conditioning  # one row per concept word: ep
    erase_from: Conditioning | None = None  # --erase_from (1 row): e_from, and what x_t and theta see

    def to(self, device) -> "PromptConditioning":
        return PromptConditioning(self.uncond.to(device), self.concepts.to(device),
                                  None if self.erase_from is None else self.erase_from.to(device))

    def uncond_rows(self, n: int) -> Conditioning:
        return _rows(self.uncond, torch.zeros(n, dtype=torch.long))

    def concept(self, rows: torch.Tensor) -> Conditioning:
        return _rows(self.concepts, rows)

    def source(self, rows: torch.Tensor) -> Conditioning:
        """The prompt that x_t is sampled with and that the trained model sees: e_from's, else the concept."""
        if self.erase_from is None:
            return self.concept(rows)
        return _rows(self.erase_from, torch.zeros_like(rows))


def _rows(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
    rows = rows.to(cond.prompt_embeds.device)
    extra = {k: v[rows] for k, v in cond.added_cond_kwargs.items()} if cond.added_cond_kwargs else None
    return Conditioning(cond.prompt_embeds[rows], extra)


def encode_erasure_prompts(models: DiffusionModels, words: list[str], erase_from: str | None, image_size: int,
                           sdxl_uncond: str = "empty") -> PromptConditioning:
    """Encode "", the concept words and the erase-from prompt in one call."""
    prompts = ["", *words] + ([erase_from] if erase_from else [])
    cond = encode_prompts(models, prompts, image_size, zero_empty=sdxl_uncond == "zeros")
    n = len(words)
    return PromptConditioning(_rows(cond, torch.tensor([0])), _rows(cond, torch.arange(1, n + 1)),
                              _rows(cond, torch.tensor([n + 1])) if erase_from else None)


@torch.no_grad()
def encode_prompts(models: DiffusionModels, prompts: list[str], image_size: int,
                   zero_empty: bool = False) -> Conditioning:
    """Encode prompts as the diffusers pipelines do. SD 1.x/2.x: the text
    encoder's last hidden state. SDXL: the penultimate hidden states of both
    encoders concatenated, the second encoder's projected pooled output, and
    time ids (original size, crop (0, 0), target size). ``zero_empty`` (SDXL only) gives
    the empty prompt zero embeddings, as SDXL's pipeline does for a missing negative
    prompt (``force_zeros_for_empty_prompt``); without it "" is encoded like any prompt,
    as the official esd_sdxl.py does (``negative_prompt=""``)."""
    device = models.text_encoders[0].device
    hidden, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
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
              cond: Conditioning) -> torch.Tensor:
    """The model's raw prediction (epsilon, v or x0, per its prediction type)."""
    return unet(latents, timesteps, encoder_hidden_states=cond.prompt_embeds,
                added_cond_kwargs=cond.added_cond_kwargs).sample


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans (2022): uncond + scale * (cond - uncond)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def guided_prediction(unet_fn: UNetFn, latents, t, cond: Conditioning, uncond: Conditioning, guidance_scale):
    """Classifier-free guidance in one batched call.
    Returns (guided, prediction_uncond, prediction_cond), each (B, C, h, w)."""
    b = latents.shape[0]
    timesteps = torch.full((2 * b,), int(t), device=latents.device)
    pred = unet_fn(torch.cat([latents, latents]), timesteps, Conditioning.cat([uncond, cond]))
    pred_uncond, pred_cond = pred.float().chunk(2)
    return classifier_free_guidance(pred_uncond, pred_cond, guidance_scale), pred_uncond, pred_cond


@torch.no_grad()
def denoise(unet_fn: UNetFn, scheduler, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning,
            guidance_scale: float, timesteps: torch.Tensor) -> torch.Tensor:
    """Run the guided sampler from ``noise`` over ``timesteps`` (a slice of ``scheduler.timesteps``,
    noise taken to be at the first): one scheduler step per timestep. ``scheduler.set_timesteps``
    must have been called (it also resets multistep schedulers' state, so call it per trajectory)."""
    x = noise * scheduler.init_noise_sigma
    for t in timesteps:
        guided, _, _ = guided_prediction(unet_fn, x, t, cond, uncond, guidance_scale)
        x = scheduler.step(guided, t, x).prev_sample
    return x


def sampler_scheduler(scheduler, kind: str, steps: int):
    """The scheduler that samples x_t, with ``steps`` timesteps set: ``ddim`` (the paper's sampler,
    eta 0) from the model's schedule, or ``model``, the model's own class (PNDM for SD1.4, as the
    current official code samples). Schedulers that work on sigma-scaled latents (Euler, LMS) are
    refused: their x_t is not the x_t the UNet is trained on without input scaling."""
    from diffusers import DDIMScheduler

    own = DDIMScheduler.from_config(scheduler.config) if kind == "ddim" else \
        type(scheduler).from_config(scheduler.config)
    own.set_timesteps(steps)
    if float(own.init_noise_sigma) != 1.0:
        raise ValueError(f"--sampler_scheduler model: {type(scheduler).__name__} samples sigma-scaled latents "
                         "(init_noise_sigma != 1), which ESD's x_t cannot be; use --sampler_scheduler ddim")
    return own


def to_epsilon(prediction: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model prediction to the noise (epsilon) it implies.

    With x_t = a·x0 + s·eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)):
    v = a·eps - s·x0 gives eps = a·v + s·x_t; an x0 prediction gives
    eps = (x_t - a·x0) / s."""
    if prediction_type == "epsilon":
        return prediction
    alpha_bar = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].float()
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return a * prediction + s * latents
    if prediction_type == "sample":
        return (latents - a * prediction) / s
    raise ValueError(f"unsupported prediction type {prediction_type!r}; valid: epsilon, v_prediction, sample")
