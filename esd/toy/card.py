"""The toy model's card (README.md in its folder), written from measured figures."""

import json
from pathlib import Path

from esd.formats.records import atomic_write
from esd.toy.judge import SHAPE_BOUNDS
from esd.toy.world import BACKGROUND, COLOURS, HELD_OUT, HELD_OUT_TEMPLATES, IMAGE_SIZE, SHAPES, TRAINED_TEMPLATES


def _rebuild_lines(recipe: dict) -> list[str]:
    """Later from-scratch rebuilds of the shipped weights, as recorded in recipe.json."""
    return [f"Rebuilt from scratch on {r['date']} in {r['seconds'] / 60:.1f} min ({r['machine']}, torch {r['torch']}): "
            + ("every tensor bit-identical to the shipped model." if r["identical"] else
               f"weights differ from the shipped model (largest difference {r['max_abs_diff']:.3g}).")
            for r in recipe.get("rebuilds", [])]


def write_model_card(folder: str | Path, evaluation: dict) -> Path:
    folder = Path(folder)
    recipe = json.loads((folder / "recipe.json").read_text())
    q = evaluation["quality"]
    trained = [r for r in q if not r["held_out"]]
    held_out = [r for r in q if r["held_out"]]

    def low(rows, axis):
        values = [r[axis] for r in rows if axis in r]
        return f"{min(values):.0%} (mean {sum(values) / len(values):.1%})"

    def cell(r, key):
        return f"{r[key]:.0%}" if key in r else ""

    def quoted(templates):
        return ", ".join(f'"{t}"' for t in templates)
    dit = json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    r = recipe["recipe"]
    if dit:
        title, command, sampler = "esd flow-matching toy model (toy-dit)", "esd toy-train-dit", "flow-matching Euler"
        about = (f"A tiny but real `StableDiffusion3Pipeline` ({IMAGE_SIZE}x{IMAGE_SIZE} px), the transformer "
                 "counterpart of the UNet toy model (`--base_model toy-dit`): two random frozen "
                 f"`CLIPTextModelWithProjection` encoders (width {r['text_width']}, token embeddings drawn with std "
                 f"{r['token_embedding_std']}, {r['caption_tokens']} tokens per caption), no T5 (the pipeline "
                 f"conditions on zeros in its place), `SD3Transformer2DModel` ({r['layers']} joint blocks, "
                 f"{r['heads']} heads of {r['head_dim']}, patch {r['patch_size']}, RMS qk-norm) trained by rectified "
                 "flow, the UNet toy's `AutoencoderKL` unchanged, `FlowMatchEulerDiscreteScheduler` (shift 1). "
                 "Why SD3 and how the zero tokens are trained: `esd/toy/dit.py`.")
        built = f"Built in {recipe['seconds'] / 60:.1f} min with {recipe['threads']} threads " \
                f"({recipe.get('machine', 'machine not recorded')}, torch {recipe['torch']})."
    else:
        title, command, sampler = "esd toy model: coloured shapes", "esd toy-train", "DDIM"
        about = (f"A tiny but real `StableDiffusionPipeline` ({IMAGE_SIZE}x{IMAGE_SIZE} px) for trying and measuring "
                 "ESD without a GPU: CLIP byte-level BPE tokenizer, random frozen `CLIPTextModel` (width 64, token "
                 f"embeddings drawn with std {r.get('token_embedding_std', 0.02)}), "
                 "`UNet2DConditionModel` (channels 32/64/64, cross-attention width 64), `AutoencoderKL` "
                 "(channels 16/32/64, 4x8x8 latents), DDIM scheduler with SD's scaled-linear betas.")
        built = f"Built in {recipe['seconds'] / 60:.1f} min with {recipe['threads']} threads " \
                f"({recipe.get('machine', 'machine not recorded')}, torch {recipe['torch']}); VAE reconstruction " \
                f"PSNR {recipe['vae_psnr_db']} dB."
    lines = [
        f"# {title}", "", about, "",
        "## World", "",
        f"Shapes {', '.join(SHAPES)} in colours {', '.join(COLOURS)} on a plain background {BACKGROUND}; "
        f"captions drawn from the templates {quoted(TRAINED_TEMPLATES)}, 10% dropped for classifier-free "
        f"guidance. Held out of training: the combinations {', '.join(f'{c} {s}' for c, s in HELD_OUT)} and the "
        f"templates {quoted(HELD_OUT_TEMPLATES)}.", "",
        "## Recipe", "",
        f"`{command} --out DIR` (defaults below) rebuilds it; everything is seeded.", "",
        "```json", json.dumps(r, indent=2), "```", "", built, *_rebuild_lines(recipe), "",
        "## Judge", "",
        "Colour: mean foreground RGB matched to the palette. Shape: area / (max distance from the centroid)^2, "
        f"thresholds {', '.join(f'{s} [{lo}, {hi})' for s, lo, hi in SHAPE_BOUNDS)}. Accuracy on fresh renders "
        "of every colour-shape combination:", "",
        "| renders | n | colour | shape |", "|---|---|---|---|",
        f"| clean | {evaluation['judge_clean']['n']} | {evaluation['judge_clean']['colour']:.1%} | "
        f"{evaluation['judge_clean']['shape']:.1%} |",
        f"| VAE round trip | {evaluation['judge_vae']['n']} | {evaluation['judge_vae']['colour']:.1%} | "
        f"{evaluation['judge_vae']['shape']:.1%} |", "",
        "## Quality", "",
        f"Judged over {q[0]['n']} samples per prompt, guidance 7.5, 25 {sampler} steps (`esd toy-eval`); a phrasing "
        "is scored on what it names.", "",
        f"Trained phrasings ({len(trained)}): right colour, lowest {low(trained, 'colour')}; right shape, lowest "
        f"{low(trained, 'shape')}. Held-out phrasings and combinations ({len(held_out)}): right colour, lowest "
        f"{low(held_out, 'colour')}; right shape, lowest {low(held_out, 'shape')}.", "",
        "| prompt | held out | right colour | right shape | both | no object |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['prompt']} | {'yes' if r['held_out'] else ''} | {cell(r, 'colour')} | {cell(r, 'shape')} | "
              f"{cell(r, 'both')} | {r['none']:.0%} |" for r in q]
    lines += [""]
    path = folder / "README.md"
    atomic_write(path, lambda p: Path(p).write_text("\n".join(lines)))
    return path
