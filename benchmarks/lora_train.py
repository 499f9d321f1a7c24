"""Full fine-tuning against training the erasure directly as a LoRA (esd train --lora_rank), on the toy model:
trained parameters, erasure file size, peak memory, seconds, and the erased concept's presence and the other
prompts' accuracy in images judged by the toy judge (as benchmarks/lora_ranks.py --judge and esd demo measure).

    python benchmarks/lora_train.py --save_path RUNS [--ranks 1,4,16] [--iterations 1000] [--samples 30]
                                    [--lora_lr 1e-2] [--skip_full]
    python benchmarks/lora_train.py --save_path RUNS --ranks 4 --samples 100 --seed 1001 --seeds 5

Each training runs in a process of its own, so that its peak RSS is its own; prints a table and one JSON line.
``--seeds N`` trains every model on training seeds S..S+N-1 (--seed S) and gives each seed's presence and
accuracy with its Wilson 95% interval over images, and their mean with its t 95% interval over seeds; image i of
every prompt starts from seed S + i for every model and seed.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lora_ranks import judge  # noqa: E402
from esd.formats.records import environment_record  # noqa: E402

CONCEPT, METHOD = "red", "xattn"  # ESD-x of red: the erasure lora_ranks.py and esd attack measured
BATCH_SIZE = 8  # esd demo's and those runs' batch
FULL_LR = 1e-3  # what that erasure used
# LoRA usually needs ~10x full fine-tuning's rate: diffusers' text-to-image examples train the whole UNet at 1e-5
# and a LoRA at 1e-4. B starts at 0, so the update's size grows only as B does.
LORA_LR = 1e-2


def train_one(save_path: str, rank: int, lr: float, iterations: int, samples: int, seed: int, image_seed: int,
              name: str) -> dict:
    """One erasure (rank 0: full fine-tuning) trained with ``seed``, its images from ``image_seed``, and its
    figures; run in a process of its own."""
    from esd import ESDConfig, train_esd
    from esd.formats.erasure_source import find_erasure, load_erasure
    from esd.formats.weights import run_weight_files

    cfg = ESDConfig(prompt=CONCEPT, train_method=METHOD, base_model="toy", iterations=iterations,
                    batch_size=BATCH_SIZE, lr=lr, seed=seed, devices="cpu", save_path=save_path,
                    name=name, lora_rank=rank or None, overwrite=True)
    result = train_esd(cfg)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; before judging
    record = json.loads((result.output_dir / "args.json").read_text())
    files = run_weight_files(result.output_dir)
    erasure_file = files["lora"] if rank else files["trained"]
    trained = record["trained_parameters"]
    row = {"model": f"LoRA rank {rank}" if rank else "full fine-tuning", "rank": rank, "lr": lr, "seed": seed,
            "trained_parameters": trained, "erasure_file": erasure_file.name,
            "file_kb": erasure_file.stat().st_size / 1024,
            # fp32 parameter, gradient and Adam's two moments: the training state that grows with what trains
            "training_state_kb": trained * 4 * 4 / 1024, "peak_rss_mb": peak_rss_mb, "seconds": result.seconds,
            "final_loss": result.losses[-1]}
    if samples:
        row.update(judge("toy", load_erasure(find_erasure(str(result.output_dir))).erased_unet, CONCEPT, samples,
                         image_seed))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save_path", required=True, help="folder for the runs (one subfolder each) and results.json")
    p.add_argument("--ranks", default="1,4,16", help="comma-separated LoRA ranks, beside full fine-tuning")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30, help="images per prompt for the judge (image i: seed + i); "
                   "0: no judging (costs only)")
    p.add_argument("--lora_lr", type=float, default=LORA_LR, help="LoRA learning rate (default: %(default)s)")
    p.add_argument("--skip_full", action="store_true", help="LoRA ranks only (full fine-tuning measured before)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed, and image i of every prompt starts "
                   "from seed + i (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds seed, seed + 1, ... (default: %(default)s)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: train this rank (0: full) and print JSON
    p.add_argument("--train_seed", type=int, help=argparse.SUPPRESS)  # internal: with --one
    args = p.parse_args()
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    if args.one is not None:
        name = (f"rank{args.one}" if args.one else "full") + (f"-seed{args.train_seed}" if args.seeds > 1 else "")
        row = train_one(args.save_path, args.one, args.lora_lr if args.one else FULL_LR, args.iterations, args.samples,
                        args.train_seed, args.seed, name)
        print("ROW " + json.dumps(row))
        return
    Path(args.save_path).mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for train_seed in range(args.seed, args.seed + args.seeds):
        for rank in [0] * (not args.skip_full) + [int(r) for r in args.ranks.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--save_path", args.save_path, "--one", str(rank),
                                  "--iterations", str(args.iterations), "--samples", str(args.samples),
                                  "--lora_lr", str(args.lora_lr), "--seed", str(args.seed), "--seeds",
                                  str(args.seeds), "--train_seed", str(train_seed)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW "))))
            print(f"done: {json.dumps(rows[-1])} ({time.time() - start:.0f} s)", file=sys.stderr)
    if args.samples:
        from esd.families.models import load_models

        rows.insert(0, {"model": "base (no erasure)", **judge("toy", load_models("toy").unet, CONCEPT, args.samples,
                                                               args.seed)})
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"toy model, ESD-x of {CONCEPT!r}, {args.iterations} iterations x batch {BATCH_SIZE}, fast preset, training "
          f"seeds {', '.join(map(str, seeds))}; full lr {FULL_LR}, LoRA lr {args.lora_lr} (alpha = rank); "
          f"{args.samples} images per prompt from seed {args.seed} + i; seconds (sampling x_t included) and memory on "
          "this machine's CPU")
    columns = ["model", "trained_parameters", "file_kb", "training_state_kb", "peak_rss_mb", "seconds",
               "final_loss", "presence", "others_accuracy"]
    print(" | ".join(columns))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns))
    summary = over_seeds(rows) if args.samples else {}
    record = {"rows": rows, "over_seeds": summary, "arguments": vars(args), "concept": CONCEPT, "train_method": METHOD,
              "batch_size": BATCH_SIZE, "full_lr": FULL_LR, "lora_lr": args.lora_lr, "training_seeds": seeds,
              "image_seed": args.seed, "environment": environment_record()}
    (Path(args.save_path) / "results.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def over_seeds(rows: list[dict]) -> dict:
    """Per model: each seed's presence and others' accuracy with its Wilson interval, and the seeds' mean with its
    t 95% interval; printed as a table."""
    from esd.core.stats import RATE, Rate, SeedMean

    out = {}
    print("\n| model | presence, each seed [Wilson 95%] | presence, mean [t 95% over seeds] | others right, each seed "
          "| others right, mean [t 95%] | seconds, mean |\n|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        presence = [Rate(r["presence_k"], r["presence_n"]) for r in mine]
        kept = [Rate(r["others_k"], r["others_n"]) for r in mine]
        mean_p, mean_k = SeedMean(tuple(r.p for r in presence), RATE), SeedMean(tuple(r.p for r in kept), RATE)
        seconds = [r["seconds"] for r in mine if "seconds" in r]
        out[model] = {"presence": [r.record() for r in presence], "presence_mean": mean_p.record(),
                      "others": [r.record() for r in kept], "others_mean": mean_k.record(),
                      "seeds": [r.get("seed") for r in mine]}
        print(f"| {model} | {'; '.join(map(str, presence))} | {mean_p} | {'; '.join(map(str, kept))} | {mean_k} | "
              + (f"{sum(seconds) / len(seconds):.0f} |" if seconds else "- |"))
    return out


if __name__ == "__main__":
    main()
