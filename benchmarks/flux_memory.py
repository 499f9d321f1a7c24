"""What an ESD erasure of FLUX.1-dev needs in memory, per train method.

1. Estimate, from the parameter counts of the real FLUX.1-dev config (meta device, as param_counts.py):
   the default path keeps every frozen weight in bf16 once (theta* is the same module, with a bf16 copy of
   the trained tensors swapped in by functional_call), the trained tensors in fp32, their gradients in fp32
   and Adam's two fp32 moments: 2 (N - n) + (4 + 2 + 4 + 8) n = 2 N + 16 n bytes (adam8bit: 2 N + 10 n).
   The text encoders (T5-XXL 4.7 B, CLIP-L) run once before training and are freed.
2. Measure the activation peak of one training forward and backward (the trained view, bf16 autocast,
   the default path's precision) of a FLUX-shaped transformer at reduced size on the CPU (FLUX's head
   size 128 and rotary axes, fewer heads and blocks, a smaller image), with and without gradient
   checkpointing, each in a fresh process: the rise of anonymous resident memory (peak_memory.PeakRSS)
   less the trained tensors' gradients. Then scale it linearly in blocks, tokens and width to FLUX.1-dev at
   1024 px; the scaling assumes attention does not store its token x token matrix (SDPA's flash/efficient
   kernels), which is an assumption, not a measurement.

    python benchmarks/flux_memory.py              # both parts
    python benchmarks/flux_memory.py --json       # machine-readable
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from tiny import FLUX1_DEV_TRANSFORMER, flux1_dev_transformer  # noqa: E402

from esd.core.methods import TRAIN_METHODS  # noqa: E402
from esd.families.registry import FAMILIES, applies, select_parameters  # noqa: E402
from esd.formats.records import environment_record  # noqa: E402

GB = 1e9
# The reduced FLUX shape the activations are measured on: FLUX's head size and rotary axes, 4 of its 24
# heads, 2 of its 19 joint and 4 of its 38 single-stream blocks, 512 px (1,024 image tokens), 512 T5 tokens.
REDUCED = dict(FLUX1_DEV_TRANSFORMER, num_attention_heads=4, num_layers=2, num_single_layers=4)
REDUCED_PIXELS = 512
TEXT_TOKENS = 512
FULL_PIXELS = 1024


def tokens(pixels: int) -> int:
    return (pixels // 16) ** 2 + TEXT_TOKENS  # VAE factor 8, 2x2 packing; plus the T5 tokens


def estimate() -> dict:
    """GB per method on FLUX.1-dev, default path (Adam) and with adam8bit."""
    model = flux1_dev_transformer("meta")
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    out = {}
    for name, method in TRAIN_METHODS.items():
        if applies(method, FAMILIES["flux"]):
            n = sum(params[k].numel() for k in select_parameters(model, name))
            out[name] = {"trained": n, "adam_gb": (2 * total + 16 * n) / GB, "adam8bit_gb": (2 * total + 10 * n) / GB}
    out["_frozen_bf16_gb"] = 2 * total / GB
    return out


def measure_one(method: str, checkpointing: bool) -> dict:
    """One forward and backward of the trained view in this process; the anonymous-memory rise in MiB."""
    from diffusers import FluxTransformer2DModel

    from benchmarks.peak_memory import PeakRSS
    from esd.core.sampler import Conditioning
    from esd.core.views import UNetViews

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**REDUCED)
    names = select_parameters(model, method)
    views = UNetViews(model, names, torch.bfloat16, torch.device("cpu"), None, None, "flow", call=FAMILIES["flux"].call,
                      true_cfg=FAMILIES["flux"].true_cfg)
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = REDUCED_PIXELS // 8
    latents = torch.randn(1, 16, side, side)
    cond = Conditioning(torch.randn(1, TEXT_TOKENS, REDUCED["joint_attention_dim"]),
                        {"pooled_projections": torch.randn(1, 768), "guidance": torch.full((1,), 3.5)})
    grads_mib = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 / 2**20
    peak = PeakRSS()
    peak.reset(split=True)
    with views.autocast():
        pred = views.trained(latents, torch.full((1,), 500.0), cond)
    pred.float().pow(2).mean().backward()
    rise = peak.split_mib()["anon"]
    return {"method": method, "checkpointing": checkpointing, "anon_rise_mib": rise, "grads_mib": grads_mib,
            "activations_mib": rise - grads_mib}


def measure() -> list[dict]:
    rows = []
    for method in ("mmdit-x", "mmdit-u"):
        for checkpointing in (False, True):
            r = subprocess.run([sys.executable, __file__, "--one", method, str(int(checkpointing))],
                               capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    scale = ((FLUX1_DEV_TRANSFORMER["num_layers"] + FLUX1_DEV_TRANSFORMER["num_single_layers"])
             / (REDUCED["num_layers"] + REDUCED["num_single_layers"])
             * tokens(FULL_PIXELS) / tokens(REDUCED_PIXELS)
             * FLUX1_DEV_TRANSFORMER["num_attention_heads"] / REDUCED["num_attention_heads"])
    for r in rows:
        r["flux_dev_1024px_gb_scaled"] = r["activations_mib"] * 2**20 * scale / GB
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], bool(int(args.one[1])))))
        sys.exit(0)
    result = {"estimate": estimate(), "measured": measure(), "environment": environment_record()}
    if args.json:
        print(json.dumps(result, indent=2))
        sys.exit(0)
    est = result["estimate"]
    print(f"FLUX.1-dev, frozen weights bf16: {est['_frozen_bf16_gb']:.1f} GB")
    print(f"{'method':<15} {'trained':>15} {'Adam GB':>9} {'adam8bit GB':>12}")
    for name, e in est.items():
        if not name.startswith("_"):
            print(f"{name:<15} {e['trained']:>15,} {e['adam_gb']:>9.1f} {e['adam8bit_gb']:>12.1f}")
    print(f"\nActivations of one training forward+backward, measured at reduced size ({REDUCED['num_layers']}+"
          f"{REDUCED['num_single_layers']} blocks, {REDUCED['num_attention_heads']} heads, {REDUCED_PIXELS} px, "
          f"batch 1, bf16 autocast, CPU), scaled to FLUX.1-dev at {FULL_PIXELS} px:")
    for r in result["measured"]:
        print(f"{r['method']:<10} checkpointing={str(r['checkpointing']):<5} {r['activations_mib']:>8.0f} MiB "
              f"-> {r['flux_dev_1024px_gb_scaled']:>6.1f} GB")
