"""The ``prefix`` attack: k real vocabulary tokens put before a prompt bring the erased concept back."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from esd.families.sources import resolve_source
from esd.train.attacks.target import Target, denoising_loss, slot_embeddings, token_ids


@dataclass
class PrefixResult:
    token_ids: list[int]  # k vocabulary ids, in prompt order
    prefix: str  # their text, which tokenizes back to token_ids
    losses: list[float]  # the denoising loss at the projected tokens, one per step
    soft: torch.Tensor = field(compare=False)  # (k, D) P at the end, where a later attack may resume


def word_tokens(target: Target) -> torch.Tensor:
    """Ids of the vocabulary tokens an adversarial prefix may use: whole words (CLIP's '</w>' ending), no
    special or added token, and only those whose text tokenizes back to that one token, so the prefix
    written to adversarial_prompts.csv is the prefix that was optimised."""
    tok = target.tokenizer
    excluded = set(tok.all_special_ids) | set(tok.added_tokens_encoder.values())
    ids = []
    for token, i in tok.get_vocab().items():
        if i in excluded or not token.endswith("</w>"):
            continue
        if tok(tok.decode([i]), add_special_tokens=False).input_ids == [i]:
            ids.append(i)
    return torch.tensor(sorted(ids), dtype=torch.long, device=target.device)


def check_prefix_fits(tokenizer, tokens: int, prompts, flag: str, warn=None) -> None:
    """A prefix of ``tokens`` tokens before each of ``prompts`` in the tokenizer's window (CLIP: 77 with BOS and
    EOS). Without ``warn`` (robust training, whose prompt is the concept word) a prompt the prefix would cut is
    refused: the attack would optimise against a prompt that no longer names the concept. With ``warn`` (esd
    attack over a prompt CSV: I2P's prompts are often long, and diffusers cuts them too) only a prefix that leaves
    no room for any prompt token is refused, and the prompts it cuts are counted in one ``warn`` line."""
    limit = tokenizer.model_max_length
    if not isinstance(limit, int) or limit > 100_000:  # no limit recorded (transformers' huge placeholder)
        return
    room = limit - 2
    counts = [(prompt, len(tokenizer(prompt, add_special_tokens=False).input_ids)) for prompt in prompts]
    cut = [(prompt, n) for prompt, n in counts if tokens + n > room]
    if warn is None and cut:
        prompt, n = cut[0]
        raise ValueError(f"{flag} {tokens} does not fit before the prompt {prompt!r}: it is {n} "
                         f"token{'s' * (n != 1)} and the tokenizer's limit is {limit} with BOS and EOS, so at "
                         f"most {max(room - n, 0)} prefix tokens fit (a longer prefix would cut off the "
                         "prompt and its concept)")
    if tokens >= room:
        raise ValueError(f"{flag} {tokens} leaves no room for a prompt: the tokenizer's limit is {limit} tokens with "
                         f"BOS and EOS, so at most {room - 1} prefix tokens")
    if cut:
        prompt, n = cut[0]
        warn(f"{flag} {tokens}: {len(cut)} of {len(counts)} prompts are cut at the tokenizer's {limit} tokens "
             f"after the prefix (first: {prompt[:60]!r}, {n} tokens); the text encoder sees their first "
             f"{room - tokens} tokens, as a pipeline cuts a long prompt")


def stored_tokenizer(base_model: str):
    """``base_model``'s (first) tokenizer, read alone, without any weights, where it is a folder on disk (the
    toy, a local diffusers folder); None otherwise (a hub id: the check then runs once the model loads)."""

    folder = Path(resolve_source(base_model)) / "tokenizer"
    if not folder.is_dir():  # a hub id: its tokenizer comes with the model
        return None
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - unreadable here: loading the model says what is wrong with it
        return None


def nearest(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the row of ``table`` (V, D) nearest (Euclidean) to each of ``vectors`` (k, D)."""
    return torch.cdist(vectors, table).argmin(-1)


def prefix_attack(target: Target, slot_ids: list[int], prompt: str, latents: torch.Tensor, candidates: torch.Tensor,
                  steps: int, lr: float, generator: torch.Generator, start: torch.Tensor | None = None) -> PrefixResult:
    """UnlearnDiffAtk's prefix attack (Zhang et al. 2023, "To Generate or Not? Safety-Driven Unlearned
    Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now"): k tokens prepended to the
    prompt minimise the erased model's denoising loss on reference latents of the concept (their defaults:
    k=5, 40 steps).

    Optimised by projected gradient as in PEZ (Wen et al. 2023, "Hard Prompts Made Easy", Algorithm 1):
    continuous embeddings P (k, D) start at random vocabulary tokens; each step projects P onto the
    nearest word-token embeddings, takes the loss and its gradient there (straight-through) and applies
    the step to P with Adam. PEZ's weight decay is left out: decoupled decay shrinks P by a factor that
    depends on the embeddings' scale, which differs between models. The result is the final
    projection, so every token is a real one.

    ``slot_ids``: k placeholder tokens (see :func:`~esd.train.attacks.target.add_placeholders`); ``latents``:
    (n, C, h, w) the base model's images of this prompt; ``candidates``: :func:`word_tokens`; ``lr`` is
    absolute (in embedding units); ``start``: P to resume from (robust training's last attack) instead of
    random tokens."""
    table = target.embedding_table.detach()[candidates]  # (V, D)
    if start is None:
        start = table[torch.randint(len(candidates), (len(slot_ids),), generator=generator).to(target.device)]
    soft = start.detach().clone().requires_grad_(True)  # P: (k, D)
    optimizer = torch.optim.Adam([soft], lr=lr)
    ids = token_ids(target, [" ".join(target.tokenizer.convert_ids_to_tokens(slot_ids)) + " " + prompt])
    ids = ids.expand(len(latents), -1)
    losses = []
    for _ in range(steps):
        hard = table[nearest(soft.detach(), table)]
        with slot_embeddings(target, slot_ids, hard + soft - soft.detach()):  # forward at hard, gradient to soft
            loss = denoising_loss(target, ids, latents, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    chosen = candidates[nearest(soft.detach(), table)].tolist()
    prefix = " ".join(target.tokenizer.decode([i]) for i in chosen)  # each word tokenizes back alone
    return PrefixResult(chosen, prefix, losses, soft.detach())
