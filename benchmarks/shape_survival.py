"""Where a shape survives ESD-x on the toy model (issue 11). Erase a shape as ``esd demo`` does (the bare word,
ESD-x, eta 1, start guidance 3, 1000 x 8, lr 1e-3), then read what is left three ways:

1. **Text-state swaps.** For captions naming the shape, the text encoder's states are swapped token by token with
   those of the same caption naming ``--other`` (the captions differ in the shape word only): the shape word's
   state swapped, or every state but the word's ("word kept": the encoder is causal, so the states before the
   word are the same in both captions and this swaps the ones after it, the colour named after the shape, the
   end of text and the padding). Images of the base and the erased model from the same seeds, judged for the
   shape.
2. **Priors.** The colours the base model draws for the bare word at guidance 3 (where ESD's x_t come from) and
   the unconditional model's colour-shape pairs (guidance 1): ESD's target is anchored on the latter.
3. **Erasure signal.** Per colour, the mean ||e(x_t, shape) - e(x_t, "")||^2 (ESD-x's push at the first step is
   -(1 + eta) times this difference) on x_t from "a {colour} {shape}" trajectories stopped at a random step.

    python benchmarks/shape_survival.py --out shape-out [--concept circle --other square --samples 40]

Prints one JSON line per part and writes results.json (settings, seeds, versions, git hash).
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esd import ESDConfig, train_esd  # noqa: E402
from esd.core.sampler import Conditioning, guided_prediction  # noqa: E402
from esd.families.encode import call_unet  # noqa: E402
from esd.families.flow import tokenize  # noqa: E402
from esd.formats.records import atomic_write, check_output_folder, environment_record  # noqa: E402
from esd.formats.weights import load_erased_unet, run_weight_files  # noqa: E402
from esd.toy.demo import concept_presence  # noqa: E402
from esd.toy.judge import judge_batch  # noqa: E402
from esd.toy.quality import QUALITY_GUIDANCE, QUALITY_STEPS, load_toy_pipeline, sample  # noqa: E402
from esd.toy.world import COLOURS, SHAPES  # noqa: E402

SWAPS = ("as is", "word swapped", "word kept")


def captions(shape: str) -> list[str]:
    """The bare word, "a {shape}", and per colour the colour before the word and after it."""
    return [shape, f"a {shape}"] + [t.format(c=c, s=shape) for t in ("a {c} {s}", "a {s}, {c}") for c in COLOURS]


@torch.no_grad()
def states(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenize(pipe.tokenizer, [text], "cpu")
    return pipe.text_encoder(ids)[0], ids[0]


def swapped(pipe, text: str, shape: str, other: str) -> dict[str, torch.Tensor]:
    """The caption's text states with the swaps of the module docstring (each (1, L, D))."""
    own, ids = states(pipe, text)
    theirs, other_ids = states(pipe, text.replace(shape, other))
    (i,) = (ids != other_ids).nonzero().flatten().tolist()  # the shape word: one token in this tokenizer
    word, kept = own.clone(), theirs.clone()
    word[:, i] = theirs[:, i]
    kept[:, i] = own[:, i]
    return dict(zip(SWAPS, (own, word, kept)))


@torch.no_grad()
def draw(pipe, embeds: torch.Tensor, uncond: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """``n`` images of the given text states (``uncond``: the empty caption's), image i from seed + i, as
    esd.toy.quality.sample draws."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt_embeds=embeds.expand(n, -1, -1), negative_prompt_embeds=uncond.expand(n, -1, -1),
                num_inference_steps=QUALITY_STEPS, guidance_scale=QUALITY_GUIDANCE, generator=gens,
                output_type="np").images


@torch.no_grad()
def erasure_signal(pipe, shape: str, colour: str, n: int, seed: int, steps: int = 25, guidance: float = 3.0):
    """Mean ||e(x_t, shape) - e(x_t, "")||^2 over ``n`` x_t of "a {colour} {shape}" (DDIM at ``guidance``,
    stopped at a step drawn uniformly from 1..steps-1)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    uncond, scene, word = (Conditioning(states(pipe, t)[0]) for t in ("", f"a {colour} {shape}", shape))

    def unet(latents, timesteps, cond):
        return call_unet(pipe.unet, latents, timesteps, cond)

    def rows(cond, m):
        return Conditioning(cond.prompt_embeds.expand(m, -1, -1))

    size = pipe.unet.config.sample_size
    x = torch.randn((n, pipe.unet.config.in_channels, size, size), generator=g)
    stops = torch.randint(1, steps, (n,), generator=g)
    pushes = []
    for k, t in enumerate(scheduler.timesteps):
        guided, _, _ = guided_prediction(unet, x, t, rows(scene, n), rows(uncond, n), guidance)
        here = stops == k
        if here.any():
            m = int(here.sum())
            _, u, c = guided_prediction(unet, x[here], t, rows(word, m), rows(uncond, m), 1.0)
            pushes += (c - u).pow(2).flatten(1).mean(1).tolist()
        x = scheduler.step(guided, t, x).prev_sample
    return float(np.mean(pushes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (the erasure's run and results.json)")
    p.add_argument("--concept", default="circle", choices=SHAPES)
    p.add_argument("--other", default="square", choices=SHAPES, help="the shape whose caption states are swapped in")
    p.add_argument("--samples", type=int, default=40, help="images per caption and swap (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed; image i of every caption uses seed + i")
    p.add_argument("--weights", help="an erased model's trained-parameters file to read instead of training one")
    a = p.parse_args()
    if a.other == a.concept:
        raise SystemExit(f"--other must name another shape than --concept {a.concept!r}: one of "
                         f"{', '.join(s for s in SHAPES if s != a.concept)}")
    if a.weights is not None and not Path(a.weights).is_file():
        raise SystemExit(f"--weights {a.weights!r} is not a file")
    out = Path(a.out)
    check_output_folder(out, "--out")
    if (out / "results.json").exists():
        raise SystemExit(f"--out {a.out!r} already holds results.json; choose a new folder")
    begin = time.perf_counter()
    weights = a.weights
    if weights is None:  # esd demo's training
        result = train_esd(ESDConfig(prompt=a.concept, train_method="xattn", base_model="toy", iterations=1000,
                                     batch_size=8, lr=1e-3, negative_guidance=1.0, ddim_steps=25, seed=a.seed,
                                     devices="cpu", save_format="trained", save_path=str(out / "runs"),
                                     name="erased"))
        weights = str(run_weight_files(result.output_dir)["trained"])
    pipes = {"base": load_toy_pipeline("toy"),
             "erased": load_toy_pipeline("toy", unet=load_erased_unet(weights, base_model="toy"))}
    swaps = {}
    for text in captions(a.concept):
        swaps[text] = {}
        for name, pipe in pipes.items():
            uncond, _ = states(pipe, "")
            swaps[text][name] = {k: concept_presence(draw(pipe, e, uncond, a.samples, a.seed), "shape", a.concept)
                                 for k, e in swapped(pipe, text, a.concept, a.other).items()}
    print(json.dumps({"swaps": swaps}))
    base = pipes["base"]
    drawn = judge_batch(sample(base, a.concept, 100, a.seed, guidance=3.0))
    unconditional = judge_batch(sample(base, "", 200, a.seed, guidance=1.0))
    pairs = Counter(f"{j.colour} {j.shape}" for j in unconditional)
    priors = {"colours_of_the_bare_word_guidance_3": {c: sum(j.colour == c for j in drawn) for c in COLOURS},
              "unconditional_pairs_guidance_1": dict(pairs.most_common())}
    print(json.dumps({"priors": priors}))
    signal = {c: erasure_signal(base, a.concept, c, 32, a.seed) for c in COLOURS}
    print(json.dumps({"erasure_signal": signal}))
    results = {"swaps": swaps, "priors": priors, "erasure_signal": signal, "weights": weights,
               "settings": vars(a), "seconds": round(time.perf_counter() - begin, 1),
               "how": "shares of judged images (toy judge) whose shape is --concept; swaps: --samples images per "
                      "caption and variant, image i from seed + i, guidance 7.5, 25 DDIM steps; priors: 100 images "
                      "of the bare word at guidance 3, 200 unconditional at guidance 1; signal: 32 x_t per colour",
               "environment": environment_record()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda f: Path(f).write_text(json.dumps(results, indent=2)))


if __name__ == "__main__":
    main()
