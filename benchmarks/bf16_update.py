"""What pure-bf16 training does to ESD's update: the official esd_sd.py loads both UNets in bf16 and
runs Adam on the bf16 weights; this project keeps the trained parameters and Adam's state in fp32
(frozen weights in bf16 under --mixed_precision bf16). Both runs below are the official preset
(lr 5e-5) with --mixed_precision bf16, the same seed and batches; they differ only in the dtype of the
trained parameters and of Adam's state.

    python benchmarks/bf16_update.py                       # the tiny SD1 test model, ESD-x, 5 Adam steps
    python benchmarks/bf16_update.py --base_model toy --steps 20

Prints, per policy, the share of trained weights that moved at all, the median relative change of
those that moved, and the cosine between each policy's total update and the fp32 one. Then one JSON line.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run(policy: str, args, base_model: str, tmp: str) -> tuple[dict, dict]:
    """(trained weights before, after) in the policy's own dtype, as float32 tensors."""
    import torch

    from esd.train.config import ESDConfig
    from esd.train.recipe import ESDTrainer

    cfg = ESDConfig(prompt=args.prompt, train_method=args.train_method, base_model=base_model, preset="official",
                    iterations=args.steps, mixed_precision="bf16", seed=args.seed, devices="cpu", save_path=tmp,
                    ddim_steps=args.ddim_steps)
    trainer = ESDTrainer(cfg)
    trainer.setup()
    if policy == "bf16":  # the official code: bf16 weights, Adam (and its moments) on them
        for p in trainer.params:
            p.data = p.data.to(torch.bfloat16)
        trainer.optimizer = torch.optim.Adam(trainer.params, lr=cfg.lr)
    before = {n: v.clone() for n, v in trainer.trained_state().items()}
    for _ in range(args.steps):
        trainer.step()
    return before, trainer.trained_state()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default="tiny-sd1", help="'tiny-sd1' (built here, as the tests do), 'toy', "
                   "or a diffusers folder")
    p.add_argument("--prompt", default="cat")
    p.add_argument("--train_method", default="xattn")
    p.add_argument("--steps", type=int, default=5, help="Adam steps")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from esd.formats.records import environment_record

    with tempfile.TemporaryDirectory() as tmp:
        base_model = args.base_model
        if base_model == "tiny-sd1":
            import tiny

            base_model = str(tiny.build("sd1", Path(tmp) / "sd1"))
        runs = {policy: run(policy, args, base_model, tmp) for policy in ("fp32", "bf16")}
    fp32_delta = torch.cat([(runs["fp32"][1][n] - runs["fp32"][0][n]).flatten() for n in runs["fp32"][0]])
    figures = {}
    for policy, (before, after) in runs.items():
        delta = torch.cat([(after[n] - before[n]).flatten() for n in before])
        weights = torch.cat([before[n].flatten() for n in before])
        moved = delta != 0
        relative = (delta[moved].abs() / weights[moved].abs().clamp_min(1e-12))
        figures[policy] = {
            "moved_share": round(moved.float().mean().item(), 4),
            "median_relative_change_of_moved": round(relative.median().item(), 6) if moved.any() else 0.0,
            "cosine_to_fp32_update": round(torch.nn.functional.cosine_similarity(delta, fp32_delta, dim=0).item(), 4),
            "update_norm": delta.norm().item(),
        }
        f = figures[policy]
        print(f"{policy}: {f['moved_share']:.1%} of {weights.numel():,} trained weights moved after {args.steps} Adam "
              f"steps (median relative change of those {f['median_relative_change_of_moved']:.2e}); cosine to "
              f"the fp32 update {f['cosine_to_fp32_update']:.3f}; update norm {f['update_norm']:.3e}", flush=True)
    print(json.dumps({"settings": vars(args), "environment": environment_record(), **figures}))


if __name__ == "__main__":
    main()
