"""Prompt conditioning and the guided partial-denoising sampler, written from a
diffusers ``unet`` (or SD3/FLUX transformer, through :mod:`esd.flow`) and ``scheduler``
(no pipeline is patched)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.func import functional_call

from .flow import (
    SD3_T5_TOKENS,
    call_transformer,
    encode_flux,
    encode_sd3,
    flow_scheduler,
    is_flow_model,
    merges_zero_t5_tokens,
    tokenize,
)
from .models import DiffusionModels

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


def encode_erasure_prompts(models: DiffusionModels, words: list[str], erase_from: str | None, image_size: int,
                           sdxl_uncond: str = "empty", guidance: float | None = None) -> PromptConditioning:
    """Encode "", the concept words and the erase-from prompt in one call (``guidance``: see
    :func:`encode_prompts`). ``sdxl_uncond`` (SDXL only; see esd.config.SDXL_UNCONDS): "empty" encodes "" for
    e0 and the sampler, "zeros" gives both zero embeddings, "official" gives the sampler zero embeddings and
    e0 the encoded "" (esd_sdxl.py)."""
    prompts = ["", *words] + ([erase_from] if erase_from else [])
    cond = encode_prompts(models, prompts, image_size, zero_empty=sdxl_uncond == "zeros", guidance=guidance)
    n = len(words)
    uncond = cond.take(torch.tensor([0]))
    sampler_uncond = zero_conditioning(uncond) if sdxl_uncond == "official" and models.family == "sdxl" else None
    return PromptConditioning(uncond, cond.take(torch.arange(1, n + 1)),
                              cond.take(torch.tensor([n + 1])) if erase_from else None, sampler_uncond)


def zero_conditioning(cond: Conditioning) -> Conditioning:
    """``cond`` with zero text embeddings, hidden states and SDXL's pooled ``text_embeds``, its time ids kept:
    what SDXL's pipeline gives a missing negative prompt (``encode_prompt`` with
    ``force_zeros_for_empty_prompt``; the negative branch shares the prompt's ``add_time_ids``)."""
    extra = None
    if cond.added_cond_kwargs is not None:
        extra = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.added_cond_kwargs.items()}
    return Conditioning(torch.zeros_like(cond.prompt_embeds), extra)


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
    :func:`esd.flow.encode_sd3` and :func:`esd.flow.encode_flux`; FLUX.1-dev's guidance embedding gets
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
    ``guidance_scale`` None: the conditional prediction alone, one pass (FLUX: see :func:`esd.flow.uses_true_cfg`)."""
    x = noise * initial_noise_sigma(scheduler)
    for t in timesteps:
        if guidance_scale is None:
            guided = unet_fn(x, repeat_timestep(t, x.shape[0], x.device), cond).float()
        else:
            guided, _, _ = guided_prediction(unet_fn, x, t, cond, uncond, guidance_scale)
        x = scheduler.step(guided, t, x).prev_sample
    return x


def sampler_scheduler(scheduler, kind: str, steps: int, latent_size: tuple[int, int] | None = None,
                      flux: bool = False):
    """The scheduler that samples x_t, with ``steps`` timesteps set: ``ddim`` (the paper's sampler,
    eta 0) from the model's schedule, or ``model``, the model's own class (PNDM for SD1.4, as the
    current official code samples). Schedulers that work on sigma-scaled latents (Euler, LMS) are
    refused: their x_t is not the x_t the UNet is trained on without input scaling. Flow-matching
    models (a ``FlowMatchEulerDiscreteScheduler``) sample with :func:`esd.flow.flow_scheduler` for
    either kind; ``latent_size`` (h, w) sets FLUX's resolution-dependent shift, ``flux`` its sigmas."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return flow_scheduler(scheduler, steps, latent_size, flux)
    own = DDIMScheduler.from_config(scheduler.config) if kind == "ddim" else \
        type(scheduler).from_config(scheduler.config)
    own.set_timesteps(steps)
    if float(own.init_noise_sigma) != 1.0:
        raise ValueError(f"--sampler_scheduler model: {type(scheduler).__name__} samples sigma-scaled latents "
                         "(init_noise_sigma != 1), which ESD's x_t cannot be (esd_sdxl.py queries the UNet at them "
                         "unscaled); use --sampler_scheduler ddim")
    return own


def check_model_scheduler(source: str) -> None:
    """``--sampler_scheduler model`` on a model folder (or a cached hub id) whose own scheduler works on
    sigma-scaled latents (Euler, LMS: SDXL base 1.0 ships Euler) is refused from its scheduler config, before
    any weights load, with :func:`sampler_scheduler`'s message. Unreadable configs are left to that check."""
    import diffusers

    try:
        config = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler")
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)) or \
                issubclass(cls, FlowMatchEulerDiscreteScheduler):
            return
        scheduler = cls.from_config(config)
    except Exception:  # noqa: BLE001 - a hub id not cached, a folder without a scheduler: checked once loaded
        return
    sampler_scheduler(scheduler, "model", 50)


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
