"""Trainable parameters per train method on the real SD v1.4 UNet config (random weights, no download).

    python benchmarks/param_counts.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sd14_scale import sd14_models  # noqa: E402
from esd.methods import TRAIN_METHODS, select_parameters  # noqa: E402

if __name__ == "__main__":
    unet = sd14_models().unet
    params = dict(unet.named_parameters())
    total = sum(p.numel() for p in params.values())
    print(f"{'method':<13} {'tensors':>8} {'parameters':>14} {'share':>7} {'fp16 MB':>8}")
    for name in TRAIN_METHODS:
        names = select_parameters(unet, name)
        n = sum(params[k].numel() for k in names)
        print(f"{name:<13} {len(names):>8} {n:>14,} {n / total:>7.1%} {2 * n / 1e6:>8.1f}")
    print(f"{'(whole UNet)':<13} {len(params):>8} {total:>14,}")
