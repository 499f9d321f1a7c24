"""What both attacks minimise: the erased model's own denoising loss on the base model's images of the
concept. UnlearnDiffAtk (Zhang et al. 2023) reads it as a diffusion classifier (a low loss means the
prompt explains the images), textual inversion (Gal et al. 2023) as its training objective; neither
needs a gradient from any judge.

Learned embeddings enter the frozen text encoder through placeholder tokens added to the tokenizer:
a forward hook on the token-embedding table (a documented extension point, not a patch) swaps each
placeholder's row for the vector being learned, so the gradient reaches that vector alone.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from esd.families.flow import tokenize


@dataclass
class Target:
    """The erased model as a white-box attacker holds it; every module frozen."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object  # a CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the model's training noise schedule: alphas_cumprod, prediction type
    device: torch.device

    @property
    def embedding_table(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight  # (vocab, D)


def add_placeholders(target: Target, names: list[str]) -> list[int]:
    """Add ``names`` to the tokenizer (each one token) and grow the embedding table to hold them; their ids.
    Their rows' values are never read while a :func:`slot_embeddings` block is active."""
    taken = [n for n in names if n in target.tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"placeholder token(s) {', '.join(taken)} already in the tokenizer")
    target.tokenizer.add_tokens(names)
    if len(target.tokenizer) > target.embedding_table.shape[0]:
        target.text_encoder.resize_token_embeddings(len(target.tokenizer), mean_resizing=False)
    return target.tokenizer.convert_tokens_to_ids(names)


@contextmanager
def slot_embeddings(target: Target, ids: list[int], vectors: torch.Tensor):
    """Inside the block, token ``ids[i]`` embeds as ``vectors[i]`` ((n, D), gradient flowing to it)."""
    slots = torch.tensor(ids, device=target.device)

    def hook(module, inputs, output):  # output: (B, L, D) rows of the table
        match = inputs[0][..., None] == slots  # (B, L, n)
        found = match.any(-1, keepdim=True)
        chosen = (match.to(vectors.dtype) @ vectors).to(output.dtype)  # (B, L, D); zero where no slot
        return torch.where(found, chosen, output)

    handle = target.text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_ids(target: Target, prompts: list[str]) -> torch.Tensor:
    """(B, L) ids padded to the tokenizer's length, as diffusers' pipelines tokenize."""
    return tokenize(target.tokenizer, prompts, target.device)


def denoising_loss(target: Target, ids: torch.Tensor, latents: torch.Tensor, generator: torch.Generator):
    """E_{t, eps} ||eps - eps_theta(x_t, t, c)||^2 with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM,
    Ho et al. 2020, eq. 14); v-prediction models regress v instead. t ~ U{0..T-1} and eps are drawn on the
    CPU from ``generator``, so a seeded attack draws the same ones on any device.

    ids: (B, L) prompt tokens; latents: (B, C, h, w) reference latents x_0."""
    sched = target.noise_scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    t, noise = t.to(target.device), noise.to(target.device)
    x_t = sched.add_noise(latents, noise, t)
    cond = target.text_encoder(ids)[0]  # (B, L, D)
    pred = target.unet(x_t, t, encoder_hidden_states=cond).sample
    goal = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    return F.mse_loss(pred.float(), goal.float())
