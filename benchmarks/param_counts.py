"""Trainable parameters per train method on the real SD v1.4 UNet, SD3.5-medium transformer and
FLUX.1-dev transformer configs, built on the meta device (no weights, no memory, no download), and the size
of an ESD-x (or mmdit-x) erasure as a LoRA at ranks 4, 16 and 64 (esd train --lora_rank, esd export --format lora).

    python benchmarks/param_counts.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import flux1_dev_transformer, sd14_unet, sd35_medium_transformer  # noqa: E402

from esd.core.methods import TRAIN_METHODS  # noqa: E402
from esd.families.registry import applies, detect_family, select_parameters  # noqa: E402
from esd.train.lora import lora_targets  # noqa: E402

LORA_RANKS = (4, 16, 64)
MODELS = {"SD v1.4 UNet": sd14_unet, "SD3.5-medium transformer": sd35_medium_transformer,
          "FLUX.1-dev transformer": flux1_dev_transformer}

if __name__ == "__main__":
    for title, build in MODELS.items():
        model = build("meta")
        family = detect_family(model)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        # 2 bytes per parameter: the trained weights saved in bf16 (or fp16, the same size).
        print(f"\n{title} ({family.denoiser})")
        print(f"{'method':<15} {'tensors':>8} {'parameters':>15} {'share':>7} {'bf16 MB':>10}  description")
        for name, method in TRAIN_METHODS.items():
            if not applies(method, family):
                continue
            names = select_parameters(model, name)
            n = sum(params[k].numel() for k in names)
            print(f"{name:<15} {len(names):>8} {n:>15,} {n / total:>7.1%} {2 * n / 1e6:>10.1f}  {method.description}")
        print(f"{'(whole model)':<15} {len(params):>8} {total:>15,} {'':>7} {2 * total / 1e6:>10.1f}")
        # Not trainable, but part of published totals: SD3's fixed sin-cos position table (226 M values,
        # a parameter in the original checkpoint) is why SD3.5-medium is called a 2.5 B model.
        buffers = dict(model.named_buffers())
        if buffers:
            n = sum(b.numel() for b in buffers.values())
            print(f"{'(+ buffers)':<15} {len(buffers):>8} {n:>15,} {'':>7} {'':>10}  {', '.join(buffers)}: "
                  f"{total + n:,} with the parameters")
        # A rank-r LoRA of an (out, in) Linear holds r (out + in) values (down r x in, up out x r); the method's
        # biases stay out of it. fp16/bf16: 2 bytes a value.
        method = family.esd_x
        modules = dict(model.named_modules())
        targets, _ = lora_targets(model, method)
        weights = sum(modules[t].weight.numel() for t in targets)
        per_rank = sum(sum(modules[t].weight.shape[:2]) for t in targets)  # out + in, over the layers
        sizes = ", ".join(f"rank {r}: {r * per_rank:,} values, {2 * r * per_rank / 1e6:.1f} MB" for r in LORA_RANKS)
        print(f"{method} as a LoRA ({len(targets)} layers, {weights:,} weight values, {2 * weights / 1e6:.1f} MB): "
              f"{sizes} (fp16)")
