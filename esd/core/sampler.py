"""Prompt conditioning and the guided partial-denoising sampler: classifier-free guidance over
any denoiser function and a diffusers scheduler (no pipeline is patched), and the conversion of a
prediction to the noise it implies. The families (:mod:`esd.families`) encode prompts and call their models."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

UNetFn = Callable[[torch.Tensor, torch.Tensor, "Conditioning"], torch.Tensor]


@dataclass
class Conditioning:
    """Text conditioning for a batch: ``prompt_embeds`` (B, L, D) and, for SDXL,
    ``added_cond_kwargs`` with ``text_embeds`` (B, P) and ``time_ids`` (B, 6); for SD3 and FLUX
    ``pooled_projections`` (B, P) and, for FLUX.1-dev, ``guidance`` (B,)."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        extra = None
        if self.added_cond_kwargs is not None:
            extra = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds.to(device=device, dtype=dtype), extra)

    def take(self, rows: torch.Tensor) -> "Conditioning":
        """The prompts at ``rows`` (B,) indices, with their extra inputs (SDXL, SD3, FLUX)."""
        rows = rows.to(self.prompt_embeds.device)
        extra = {k: v[rows] for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return Conditioning(self.prompt_embeds[rows], extra)

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

    uncond: Conditioning  # "" (1 row): e0, and the sampler's unconditional branch unless sampler_uncond is set
    concepts: Conditioning  # one row per concept word: ep
    erase_from: Conditioning | None = None  # --erase_from (1 row): e_from, and what x_t and theta see
    # The sampler's unconditional branch (1 row) where it is not e0's: SDXL --sdxl_uncond official (zeros)
    sampler_uncond: Conditioning | None = None

    def to(self, device) -> "PromptConditioning":
        return PromptConditioning(self.uncond.to(device), self.concepts.to(device),
                                  None if self.erase_from is None else self.erase_from.to(device),
                                  None if self.sampler_uncond is None else self.sampler_uncond.to(device))

    def uncond_rows(self, n: int) -> Conditioning:
        """e0's unconditional prompt, ``n`` rows."""
        return self.uncond.take(torch.zeros(n, dtype=torch.long))

    def sampler_uncond_rows(self, n: int) -> Conditioning:
        """The unconditional prompt of the guided sampler that makes x_t, ``n`` rows."""
        uncond = self.uncond if self.sampler_uncond is None else self.sampler_uncond
        return uncond.take(torch.zeros(n, dtype=torch.long))

    def concept(self, rows: torch.Tensor) -> Conditioning:
        return self.concepts.take(rows)

    def source(self, rows: torch.Tensor) -> Conditioning:
        """The prompt that x_t is sampled with and that the trained model sees: e_from's, else the concept."""
        if self.erase_from is None:
            return self.concept(rows)
        return self.erase_from.take(torch.zeros_like(rows))


def zero_conditioning(cond: Conditioning) -> Conditioning:
    """``cond`` with zero text embeddings, hidden states and SDXL's pooled ``text_embeds``, its time ids kept:
    what SDXL's pipeline gives a missing negative prompt (``encode_prompt`` with
    ``force_zeros_for_empty_prompt``; the negative branch shares the prompt's ``add_time_ids``)."""
    extra = None
    if cond.added_cond_kwargs is not None:
        extra = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.added_cond_kwargs.items()}
    return Conditioning(torch.zeros_like(cond.prompt_embeds), extra)


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans (2022): uncond + scale * (cond - uncond)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def repeat_timestep(t: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """One of the scheduler's timesteps (int for DDPM schedules, float s * 1000 for flow matching), (n,)."""
    return torch.full((n,), t.item(), dtype=t.dtype, device=device)


def guided_prediction(unet_fn: UNetFn, latents, t, cond: Conditioning, uncond: Conditioning, guidance_scale):
    """Classifier-free guidance in one batched call.
    Returns (guided, prediction_uncond, prediction_cond), each (B, C, h, w)."""
    b = latents.shape[0]
    timesteps = repeat_timestep(t, 2 * b, latents.device)
    pred = unet_fn(torch.cat([latents, latents]), timesteps, Conditioning.cat([uncond, cond]))
    pred_uncond, pred_cond = pred.float().chunk(2)
    return classifier_free_guidance(pred_uncond, pred_cond, guidance_scale), pred_uncond, pred_cond


def initial_noise_sigma(scheduler) -> float:
    """The scale of the sampler's starting noise; flow matching starts at x = eps (s = 1) and its scheduler
    has no ``init_noise_sigma``."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


@torch.no_grad()
def denoise(unet_fn: UNetFn, scheduler, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning,
            guidance_scale: float | None, timesteps: torch.Tensor) -> torch.Tensor:
    """Run the guided sampler from ``noise`` over ``timesteps`` (a slice of ``scheduler.timesteps``,
    noise taken to be at the first): one scheduler step per timestep. ``scheduler.set_timesteps``
    must have been called (it also resets multistep schedulers' state, so call it per trajectory).
    ``guidance_scale`` None: the conditional prediction alone, one pass (FLUX: see
    :attr:`esd.families.family.Family.true_cfg`)."""
    x = noise * initial_noise_sigma(scheduler)
    for t in timesteps:
        if guidance_scale is None:
            guided = unet_fn(x, repeat_timestep(t, x.shape[0], x.device), cond).float()
        else:
            guided, _, _ = guided_prediction(unet_fn, x, t, cond, uncond, guidance_scale)
        x = scheduler.step(guided, t, x).prev_sample
    return x


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
