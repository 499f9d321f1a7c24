"""The ``inversion`` attack: one new token, learned against the erased model, that draws the concept."""

import re
from dataclasses import dataclass

import torch

from esd.train.attacks.target import Target, denoising_loss, slot_embeddings, token_ids

TOKEN = "<adv>"  # the placeholder's text in adversarial prompts and the key of token.safetensors


@dataclass
class InversionResult:
    embedding: torch.Tensor  # (D,) the learned token embedding v*
    losses: list[float]  # the denoising loss, one per step


def inversion_prompt(prompt: str, concept: str, token: str = TOKEN) -> str:
    """The prompt with each whole-word occurrence of ``concept`` (any case) replaced by ``token``; a prompt
    that does not name the concept gets the token in front. The token thus stands where the erased word
    stood, and training and generation use the same prompts."""
    pattern = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    replaced = pattern.sub(token, prompt)
    return replaced if replaced != prompt else f"{token} {prompt}"


def inversion_attack(target: Target, slot_id: int, prompts: list[str], latents: torch.Tensor, steps: int, lr: float,
                     batch_size: int, generator: torch.Generator, start: torch.Tensor | None = None) -> InversionResult:
    """Concept inversion (Pham et al. 2023, "Circumventing Concept Erasure Methods For Text-to-Image
    Generative Models"): textual inversion (Gal et al. 2023) of one new token v* on images of the concept,
    against the erased model: v* = argmin_v E ||eps - eps_theta(x_t, t, c(prompt with v))||^2, with the
    UNet and text encoder frozen. Pham et al. show it recovers the concept from every erasure method they
    test, ESD included: the upper bound of what a white-box attacker recovers with one word.

    v* starts at ``start`` (D,) when given (robust training resumes its last attack), else at the mean of
    the vocabulary's embeddings (no hint of the concept), and is trained with
    Adam on ``batch_size`` references per step, drawn from ``generator``. ``prompts[i]`` (the prompt of
    ``latents[i]``, (n, C, h, w), with :data:`TOKEN` in it) is what each reference is explained by."""
    vocabulary = target.embedding_table.detach()[:slot_id]  # placeholders are added after the vocabulary
    v = (vocabulary.mean(0) if start is None else start.detach()).reshape(1, -1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    ids = token_ids(target, prompts)  # (n, L)
    losses = []
    for _ in range(steps):
        pick = torch.randperm(len(latents), generator=generator)[:batch_size].to(target.device)
        with slot_embeddings(target, [slot_id], v):
            loss = denoising_loss(target, ids[pick], latents[pick], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return InversionResult(v.detach()[0], losses)
