"""Robust ESD's settings, checked before any model loads (and once the model is loaded, for what only the loaded
model tells), and its retain prompts: read safely, within limits, with an up-front estimate of their memory.
The training itself is :mod:`esd.train.robust`."""

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import torch

from esd.core.settings import setting
from esd.families.encode import encode_prompts
from esd.formats.prompt_csv import read_prompt_table
from esd.formats.records import error_summary
from esd.train.attacks import ATTACKS
from esd.train.attacks.prefix import check_prefix_fits, stored_tokenizer
from esd.train.text_encoder import check_one_text_encoder

# Each retain prompt is drawn once by the frozen model at the start (ddim_steps guided steps) and its
# conditioning and image stay in memory for the run: 10,000 prompts are ~3 GB at SD1's 512 px.
MAX_RETAIN_PROMPTS = 10_000

MAX_RETAIN_BYTES = 16 * 2**20

ROUND_SETTINGS = ("adv_every", "adv_steps", "adv_tokens", "adv_references", "adv_memory")  # integers >= 1


@dataclass
class RobustSettings:
    """Robust ESD's settings (``--adversarial``, ``--retain_prompts``): off by default."""

    adversarial: str | None = setting(None, "robust ESD: every --adv_every iterations, attack the model being "
                                      "trained ('prefix': UnlearnDiffAtk's real-token prefix; 'inversion': one "
                                      "learned token) and train on the conditioning found as well as on the concept, "
                                      "with the concept's ESD target (default: off)", choices=tuple(ATTACKS))
    adv_every: int = setting(10, "an attack round before every N-th iteration (default: %(default)s)")
    adv_steps: int = setting(10, "attack steps per round; each round continues from the last (default: %(default)s)")
    adv_tokens: int = setting(5, "prefix: adversarial tokens k (default: %(default)s)")
    adv_references: int = setting(8, "the frozen model's images of the concept the attack explains, drawn once "
                                  "(default: %(default)s)")
    adv_memory: int = setting(10, "train on the adversarial conditionings of the last N rounds, each row one drawn "
                              "at random, not only the last round's (default: %(default)s)")
    retain_prompts: str | None = setting(None, "prompts whose predictions must not change: a text file, one prompt a "
                                         "line, or a prompt CSV with a 'prompt' column; adds weight x MSE(trained, "
                                         "frozen) on them")
    retain_weight: float = setting(1.0, "weight of the --retain_prompts term (AdvUnlearn's gamma) (default: "
                                   "%(default)s)")


def adversarial_choices() -> tuple[str, ...]:
    """The attacks robust training can run: those of esd attack."""
    return tuple(ATTACKS)


def is_robust(cfg) -> bool:
    return bool(cfg.adversarial or cfg.retain_prompts)


def read_retain_prompts(path: str, concepts: list[str]) -> list[str]:
    """The prompts of ``path``: a plain text file, one prompt a line (blank lines skipped), or a prompt CSV
    (``.csv``, a ``prompt`` column, as esd generate reads). A prompt that names an erased concept is refused:
    it would ask the model both to forget and to keep the concept."""
    where = f"--retain_prompts {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist (a text file, one prompt a line, or a prompt CSV)")
    if os.path.getsize(path) > MAX_RETAIN_BYTES:  # before reading it: a stranger's file may be huge
        raise ValueError(f"{where} is {os.path.getsize(path) / 2**20:.1f} MiB; a retain file holds at most "
                         f"{MAX_RETAIN_PROMPTS:,} prompts in {MAX_RETAIN_BYTES // 2**20} MiB")
    try:
        if path.lower().endswith(".csv"):
            table = read_prompt_table(path, "--retain_prompts")  # as esd generate reads it: every cell as written
            if "prompt" not in table.columns:
                raise ValueError(f"{where} has no 'prompt' column (columns: {', '.join(table.columns) or 'none'})")
            prompts = [p.strip() for p in table["prompt"]]
        else:
            # utf-8-sig: a byte-order mark (Notepad writes one) is not part of the first prompt
            prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{where} is not readable UTF-8 text ({error_summary(e)})") from e
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{where} holds no prompt")
    if len(prompts) > MAX_RETAIN_PROMPTS:
        raise ValueError(f"{where} holds {len(prompts):,} prompts; at most {MAX_RETAIN_PROMPTS:,} (each is encoded "
                         "and drawn once by the frozen model before training, and its image kept for the run)")
    for concept in concepts:
        pattern = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
        named = [p for p in prompts if pattern.search(p)]
        if named:
            raise ValueError(f"{where}: {len(named)} prompt(s) name the erased concept {concept!r} (first: "
                             f"{named[0]!r}); retain prompts must be ones whose images should not change")
    return prompts


def check_retain_memory(models, prompts: list[str], image_size: int, latent_shape, guidance) -> None:
    """The retain set's conditionings and x_0 images stay on the device for the run: one prompt is encoded,
    the whole set's size estimated from it and checked against the device's free memory (a million prompts
    would otherwise grow until the kernel kills the run without a word)."""
    one = encode_prompts(models, prompts[:1], image_size, guidance=guidance)
    per_prompt = one.prompt_embeds.nbytes + sum(v.nbytes for v in (one.added_cond_kwargs or {}).values())
    per_prompt += math.prod(latent_shape[1:]) * 4  # the fp32 x_0 kept per prompt
    need = per_prompt * len(prompts)
    device = next(models.unet.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.5 * free:
        raise ValueError(f"--retain_prompts: {len(prompts):,} prompts need about {need / 2**30:.1f} GiB on "
                         f"{device.type} for their conditionings and images, more than half of the "
                         f"{free / 2**30:.1f} GiB free; use fewer prompts")


def check_retain_weight(w) -> None:
    """--retain_weight (esd train's and esd demo's): a finite number >= 0."""
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
        raise ValueError(f"--retain_weight must be a finite number >= 0, got {w!r}")


def check_robust_settings(cfg) -> None:
    """One line per bad robust setting, before any model loads (called by ESDConfig.validate)."""
    choices = adversarial_choices()
    if cfg.adversarial is not None and cfg.adversarial not in choices:
        raise ValueError(f"--adversarial {cfg.adversarial!r} is not one of: {', '.join(choices)}")
    for name in ROUND_SETTINGS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
    check_retain_weight(cfg.retain_weight)
    if cfg.retain_prompts is None and cfg.retain_weight != type(cfg).__dataclass_fields__["retain_weight"].default:
        raise ValueError(f"--retain_weight {cfg.retain_weight} set without --retain_prompts, whose term it weighs; "
                         "give --retain_prompts FILE (a text file, one prompt a line, or a prompt CSV)")
    if cfg.adversarial is None:
        changed = [f"--{n}" for n in ROUND_SETTINGS
                   if getattr(cfg, n) != type(cfg).__dataclass_fields__[n].default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set without --adversarial (prefix | inversion), which they tune")
    else:
        if cfg.separator is not None or cfg.erase_from is not None:
            raise ValueError("--adversarial attacks one concept erased from itself; it cannot be combined with "
                             "--separator or --erase_from")
        check_one_text_encoder(cfg, "--adversarial")
        if cfg.adversarial == "prefix" and cfg.ckpt_path is None:
            if (tokenizer := stored_tokenizer(cfg.base_model)) is not None:  # else checked once loaded
                check_prefix_fits(tokenizer, cfg.adv_tokens, cfg.words, "--adv_tokens")
    if cfg.retain_prompts is not None:
        read_retain_prompts(cfg.retain_prompts, cfg.words)


def check_resume_robust(cfg, state: dict) -> None:
    """What a resumed robust run must keep beyond the flags ``resume_conflicts`` compares. A checkpoint from
    before --adv_memory trained on its last round only, which --adv_memory 1 continues. And the checkpoint's
    retain images were drawn for the prompts its --retain_prompts file held then, so a file edited since is
    refused (the flag's path alone would pass)."""
    if cfg.adversarial is not None and "adv_memory" not in state["config"] and cfg.adv_memory != 1:
        raise ValueError(f"--resume {cfg.resume!r} was trained before --adv_memory existed, on the last round's "
                         f"conditioning only; resume it with --adv_memory 1")
    then = (state.get("robust") or {}).get("retain_prompts")
    if then is None or cfg.retain_prompts is None:
        return
    now = read_retain_prompts(cfg.retain_prompts, cfg.words)
    if now != then:
        changed = next((i for i, (a, b) in enumerate(zip(now, then)) if a != b), min(len(now), len(then)))
        raise ValueError(f"--retain_prompts {cfg.retain_prompts!r} changed since checkpoint {cfg.resume!r} was "
                         f"written ({len(now)} prompts now, {len(then)} then; first difference at prompt "
                         f"{changed + 1}); resume with the file as it was, or start a new run")
