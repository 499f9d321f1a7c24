"""Measure a toy pipeline with the judge: per prompt, how often the generated
image has the prompt's colour and shape."""

import json
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

from esd.families.flow import merge_zero_t5_tokens
from esd.families.sources import resolve_source
from esd.toy.dit import merges_zero_tokens
from esd.toy.judge import NONE, judge_batch
from esd.toy.world import all_phrasings, all_scenes, render

QUALITY_STEPS = 25  # DDIM steps, as the quality bar is defined
QUALITY_GUIDANCE = 7.5


def load_toy_pipeline(base_model: str = "toy", unet=None):
    """The toy model's pipeline, sampling as the quality bar is defined: a UNet toy with DDIM, the
    flow-matching toy (``toy-dit``, an SD3 pipeline) with its own flow-matching Euler scheduler.
    ``unet`` replaces the UNet or transformer."""
    folder = resolve_source(base_model)
    if json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline":
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
        if unet is not None:
            pipe.transformer = unet
        # Without T5 the pipeline appends 256 identical zero tokens; sample() passes one, standing for all
        # (esd.families.flow.RepeatedTokenAttention: the same attention up to float rounding, at a quarter of the
        # tokens).
        merge_zero_t5_tokens(pipe.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if unet is not None:
        pipe.unet = unet
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompt: str, n: int, seed: int, steps: int = QUALITY_STEPS, guidance: float = QUALITY_GUIDANCE,
           batch: int = 100) -> np.ndarray:
    """``n`` images (n, H, W, 3) in [0, 1]; image i uses seed ``seed + i`` whatever the batching,
    so two models compared with the same seeds start from the same noise."""
    extra = {"max_sequence_length": 1} if merges_zero_tokens(pipe) else {}  # see load_toy_pipeline
    out = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
        out.append(pipe([prompt] * count, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="np", **extra).images)
    return np.concatenate(out)


def score(images, colour: str | None, shape: str | None) -> dict:
    """Fractions of images judged with the given colour / shape / both, and with no object."""
    js = judge_batch(images)
    n = len(js)
    res = {"n": n, "none": sum(j.shape == NONE or j.colour == NONE for j in js) / n}
    if colour:
        res["colour"] = sum(j.colour == colour for j in js) / n
    if shape:
        res["shape"] = sum(j.shape == shape for j in js) / n
    if colour and shape:
        res["both"] = sum(j.colour == colour and j.shape == shape for j in js) / n
    return res


def quality_table(pipe, n: int = 100, seed: int = 0) -> list[dict]:
    """One row per phrasing of the world (every template, every colour and shape it names), held-out
    phrasings marked; a colour or shape the phrasing does not name is not scored."""
    rows = []
    for p in all_phrasings():
        images = sample(pipe, p.text, n, seed)
        rows.append({"prompt": p.text, "held_out": p.held_out, **score(images, p.colour, p.shape)})
    return rows


def unconditional_shares(pipe, n: int = 400, seed: int = 0) -> dict:
    """How often the model draws each colour and shape without a caption (guidance 1): the prior that
    ESD's target, the unconditional prediction minus the concept's direction, leans toward."""
    js = judge_batch(sample(pipe, "", n, seed, guidance=1.0))
    return {"n": n, "guidance": 1.0,
            "colour": {c: sum(j.colour == c for j in js) / n for c in sorted({j.colour for j in js})},
            "shape": {s: sum(j.shape == s for j in js) / n for s in sorted({j.shape for j in js})}}


def judge_accuracy(n_per_scene: int = 100, seed: int = 123, vae=None) -> dict:
    """Judge accuracy on fresh renders of every combination (optionally after a VAE round trip)."""

    rng = random.Random(seed)
    colour_ok = shape_ok = total = 0
    for scene in all_scenes():
        imgs = np.stack([np.asarray(render(scene, rng)) for _ in range(n_per_scene)])
        if vae is not None:
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                x = vae.decode(vae.encode(x).latent_dist.mean).sample
            imgs = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        js = judge_batch(imgs)
        colour_ok += sum(j.colour == scene.colour for j in js)
        shape_ok += sum(j.shape == scene.shape for j in js)
        total += len(js)
    return {"n": total, "colour": colour_ok / total, "shape": shape_ok / total}
