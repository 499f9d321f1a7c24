"""Trainable parameters per train method on the real SD v1.4 UNet config, built on the meta device
(no weights, no memory, no download).

    python benchmarks/param_counts.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import sd14_unet  # noqa: E402

from esd.methods import TRAIN_METHODS, select_parameters  # noqa: E402

if __name__ == "__main__":
    unet = sd14_unet("meta")
    params = dict(unet.named_parameters())
    total = sum(p.numel() for p in params.values())
    print(f"{'method':<13} {'tensors':>8} {'parameters':>14} {'share':>7} {'fp16 MB':>8}  description")
    for name, method in TRAIN_METHODS.items():
        names = select_parameters(unet, name)
        n = sum(params[k].numel() for k in names)
        print(f"{name:<13} {len(names):>8} {n:>14,} {n / total:>7.1%} {2 * n / 1e6:>8.1f}  {method.description}")
    print(f"{'(whole UNet)':<13} {len(params):>8} {total:>14,}")
