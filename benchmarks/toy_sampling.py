"""The toy instrument's drawing, lever by lever (issue 30): seconds per 100 images of one prompt with the
sampler the demo and the benchmarks use (DDIM 25 steps, guidance 7.5, image i from seed i), side by side in one
process, and how far each lever's images and the judge's verdicts move from the default's.

    python benchmarks/toy_sampling.py                 # the UNet toy, 200 images per variant
    python benchmarks/toy_sampling.py --images 400 --repeats 5

Variants: the default (diffusers' SDPA attention, 2 torch threads, 100 images per sampler call); 50 and 200
images per call; one torch thread; diffusers' classic attention processor (bmm + softmax); channels-last
weights; bf16 autocast; torch.compile of the UNet's forward (its compile time is reported apart, from the
first call); and shared-context cross-attention (each prompt's keys and values computed once for its
images: the same function, up to float rounding, with the key and value projections on fewer rows). Each
variant is timed ``--repeats`` times after one warm-up call; the median is shown. Prints a table and one
JSON line (settings, versions, git hash).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from esd.formats.records import environment_record  # noqa: E402
from esd.toy.judge import judge_batch  # noqa: E402
from esd.toy.quality import load_toy_pipeline, sample  # noqa: E402

PROMPT = "a green circle"


class SharedContextCrossAttention:
    """Cross-attention whose keys and values are computed once per distinct context row in the batch (classifier-
    free guidance has two per prompt) and broadcast: the same softmax(q k^T / sqrt(d)) v as diffusers'
    AttnProcessor2_0, up to float rounding, with the key and value projections on 2 rows instead of the batch's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        plain = (attn.norm_cross is None and attn.group_norm is None and attn.spatial_norm is None
                 and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
                 and attn.rescale_output_factor == 1 and hidden_states.ndim == 3)
        if encoder_hidden_states is None or attention_mask is not None or not plain:
            raise NotImplementedError("SharedContextCrossAttention covers the toy UNet's plain cross-attention only")
        b, n, _ = hidden_states.shape
        unique, inverse = torch.unique(encoder_hidden_states.flatten(1), dim=0, return_inverse=True)
        context = unique.view(len(unique), *encoder_hidden_states.shape[1:])
        heads = attn.heads
        q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(len(unique), -1, heads, q.shape[-1]).transpose(1, 2)[inverse]
        v = attn.to_v(context).view(len(unique), -1, heads, q.shape[-1]).transpose(1, 2)[inverse]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def timed(pipe, args, batch: int, bf16: bool = False) -> tuple[float, np.ndarray]:
    def draw(n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return sample(pipe, PROMPT, n, 0, batch=batch)

    draw(args.images)  # warm-up: every shape a timed call meets (a compiled forward compiles here)
    times, images = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        images = draw(args.images)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / args.images * 100, np.asarray(images, dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="images per timed call (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant; the median is shown")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    reference = None

    def add(name, pipe, batch=100, note="", bf16=False):
        nonlocal reference
        seconds, images = timed(pipe, args, batch, bf16)
        if reference is None:
            reference = images
        verdicts = [(j.colour, j.shape) for j in judge_batch(images)]
        base = [(j.colour, j.shape) for j in judge_batch(reference)]
        rows.append({"variant": name, "s_per_100_images": round(seconds, 3),
                     "speedup": round(rows[0]["s_per_100_images"] / seconds, 3) if rows else 1.0,
                     "max_pixel_difference": float(np.abs(images - reference).max()),
                     "verdicts_changed": sum(a != b for a, b in zip(verdicts, base)), "note": note})
        print(f"  {name}: {seconds:.2f} s / 100 images", flush=True)

    pipe = load_toy_pipeline("toy")
    add("default (SDPA, 2 threads, 100 per call)", pipe)
    add("50 images per call", pipe, batch=50)
    add("200 images per call", pipe, batch=200)
    torch.set_num_threads(1)
    add("1 torch thread", pipe)
    torch.set_num_threads(2)
    from diffusers.models.attention_processor import AttnProcessor

    classic = load_toy_pipeline("toy")
    classic.unet.set_attn_processor(AttnProcessor())
    add("classic attention (bmm + softmax)", classic)
    shared = load_toy_pipeline("toy")
    cross = {name: SharedContextCrossAttention() if name.endswith("attn2.processor") else proc
             for name, proc in shared.unet.attn_processors.items()}
    shared.unet.set_attn_processor(cross)
    add("shared-context cross-attention", shared)
    add("bf16 autocast (AMX where the CPU has it)", pipe, bf16=True,
        note="not the same arithmetic: a drawing in bf16 is another instrument")
    last = load_toy_pipeline("toy")
    last.unet.to(memory_format=torch.channels_last)
    add("channels-last UNet", last)
    if args.compile:
        compiled = load_toy_pipeline("toy")
        compiled.unet.forward = torch.compile(compiled.unet.forward)
        start = time.perf_counter()
        sample(compiled, PROMPT, 100, 0)
        first = time.perf_counter() - start
        add("torch.compile(unet.forward)", compiled, note=f"first call of 100 images (compiles): {first:.1f} s")
    print(f"\n{args.images} images of {PROMPT!r} per timed call, median of {args.repeats}; speedup over the "
          "default; differences against the default's images and the judge's verdicts on them\n")
    print("| variant | s / 100 images | speedup | max pixel difference | verdicts changed | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['s_per_100_images']:.2f} | {r['speedup']:.2f}x | {r['max_pixel_difference']:.1e} "
              f"| {r['verdicts_changed']} of {args.images} | {r['note']} |")
    env = environment_record()
    print(json.dumps({"rows": rows, "settings": vars(args), "prompt": PROMPT, "torch_threads_default": 2,
                      "git_hash": env.get("git_hash"), "versions": env.get("versions", env)}))


if __name__ == "__main__":
    main()
