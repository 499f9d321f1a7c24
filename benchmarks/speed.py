"""The three presets' ESD loops side by side on one model and seed: paper, official and fast.

    python benchmarks/speed.py                      # toy model, ESD-x of "green"
    python benchmarks/speed.py --iterations 50 --samples 20   # quicker look
    python benchmarks/speed.py --seed 1001 --seeds 5          # each path on 5 training seeds, and their means
    python benchmarks/speed.py --curve 50,100,200,400,700,1000 --seed 1001 --seeds 5 --stop_at_target
                                     # time to equal erasure: each path judged as it trains, seconds to 5%

Each path is a preset of esd.train.presets.PRESETS, run with the same concept, iterations, batch,
learning rate, eta and seed (the flags below override every preset alike):
* paper: the paper's original code. The model being trained samples a fresh partial DDIM
  trajectory every iteration, x_t is paired with the original code's DDPM query draw, and a
  whole frozen UNet copy is kept.
* official: the current official code (esd_sd.py). The frozen model samples a fresh trajectory
  every iteration with the model's own scheduler (DDIM on the toy model, PNDM on SD1.4), and
  x_t is queried at its own timestep.
* fast (the default of `esd train`): trajectory reuse. A pool of whole trajectories is sampled
  by the frozen model and every (x_t, t, e0, ep) on them is trained on once.
All paths train on iterations x batch samples, unless --fast_iterations sets the fast path's own
count, to compare at equal erasure. The script prints the figures, then one JSON line.

Wall time and erasure quality are measured in this process, one path after the other. Peak
memory is measured in a fresh child process per path: the rise of its peak RSS over the RSS
after imports (the peak is reset there, so import-time peaks do not count), split into
anonymous memory (tensors, allocator, Python objects) and file-backed pages (library code a
path runs for the first time, mapped weight files). On the toy model the file-backed part is
about half of each path's rise, and about the same for all of them.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402 - benchmarks/ is on sys.path when run as a script

PATHS = ("paper", "official", "fast")  # presets, run in this order


def iterations_of(path: str, args) -> int:
    return args.fast_iterations if path == "fast" and args.fast_iterations else args.iterations


def config(path: str, args, save_path: str):
    from esd import ESDConfig

    return ESDConfig(prompt=args.concept, train_method="xattn", base_model=args.base_model,
                     preset=path, iterations=iterations_of(path, args), batch_size=args.batch_size, lr=args.lr,
                     negative_guidance=args.negative_guidance, ddim_steps=args.ddim_steps, seed=args.seed,
                     devices="cpu", save_path=save_path, name=path, save_format="trained")


def peak_memory_child(path: str, args) -> None:
    """Run one path and print its peak RSS rise in MiB over the RSS after imports (in a fresh process)."""
    import matplotlib  # saving imports it for loss.png: an import, so before the baseline like the others

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import esd  # noqa: F401 - imports done before the baseline reading
    from esd.train.recipe import train_esd

    peak = PeakRSS()
    peak.reset(split=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_esd(config(path, args, tmp))
    split = peak.split_mib()
    print(json.dumps({"rss_rise_mib": peak.rise_mib(), "anon_rise_mib": split["anon"],
                      "file_rise_mib": split["file"]}))


def measure_memory(path: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--memory_child", path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def erasure_quality(weights, args):
    """(presence of the concept on the phrasings that name it, accuracy on the other prompts), by the
    toy judge on the demo's prompt sets: each an esd.core.stats.Rate over all their images (Wilson 95%)."""
    from esd.core.stats import Rate
    from esd.formats.weights import load_erased_unet
    from esd.toy.demo import accuracy, concept_presence
    from esd.toy.quality import load_toy_pipeline, sample
    from esd.toy.world import prompts_for

    unet = load_erased_unet(weights, base_model=args.base_model)
    pipe = load_toy_pipeline(args.base_model, unet=unet)
    erased, others, axis = prompts_for(args.concept)
    presence = np.mean([concept_presence(sample(pipe, p.text, args.samples, args.seed), axis, args.concept)
                        for p in erased])
    preserved = np.mean([accuracy(sample(pipe, p.text, args.samples, args.seed), p) for p in others])
    n_erased, n_others = len(erased) * args.samples, len(others) * args.samples  # every prompt: --samples images
    return Rate(round(presence * n_erased), n_erased), Rate(round(preserved * n_others), n_others)


TARGET = 0.05  # presence at which an erasure counts as done for --curve ("time to equal erasure")


def curve_quality(pipe, unet, args, samples: int):
    """(presence, preserved) of the model being trained, drawn with ``pipe`` around its UNet as it is now: each an
    esd.core.stats.Rate over all the images of the demo's prompt sets (image i of every prompt from seed + i)."""
    from esd.core.stats import Rate, pooled
    from esd.toy.judge import judge_batch
    from esd.toy.measure import right, shows
    from esd.toy.quality import sample
    from esd.toy.world import prompts_for

    pipe.unet = unet
    erased, others, axis = prompts_for(args.concept)
    presence, preserved = [], []
    for p in erased:
        judged = judge_batch(sample(pipe, p.text, samples, args.seed))
        presence.append(Rate(sum(shows(j.colour, j.shape, axis, args.concept) for j in judged), samples))
    for p in others:
        judged = judge_batch(sample(pipe, p.text, samples, args.seed))
        preserved.append(Rate(sum(right(j.colour, j.shape, p) for j in judged), samples))
    return pooled(presence), pooled(preserved)


def run_curve(path: str, args, save_path: str) -> dict:
    """One preset trained to the last of --curve's iterations; at each listed iteration the model being trained is
    judged (--curve_samples images per prompt) and the training's wall seconds so far are recorded, the judging's
    own time left out. With --stop_at_target the run stops at the first mark whose presence interval's far end is
    at most 5%. Returns the marks and the first iteration (and seconds) at which presence <= 5%."""
    import torch

    from esd.core.stats import verdict
    from esd.toy.quality import load_toy_pipeline
    from esd.train.recipe import ESDTrainer

    marks = sorted(set(args.curve))
    cfg = config(path, args, save_path)
    cfg.iterations = marks[-1]
    trainer = ESDTrainer(cfg)
    trainer.setup()
    pipe = load_toy_pipeline(args.base_model)
    rows, judging = [], 0.0
    start = time.perf_counter()

    def at_iteration(record) -> bool:
        nonlocal judging
        if record["iteration"] not in marks:
            return False
        pause = time.perf_counter()
        with torch.no_grad():
            presence, preserved = curve_quality(pipe, trainer.unet, args, args.curve_samples)
        rows.append({"iteration": record["iteration"], "samples": record["iteration"] * args.batch_size,
                     "train_seconds": round(pause - start - judging, 2), "presence": presence.record(),
                     "preserved": preserved.record(), "verdict": verdict(presence.p, presence.interval, TARGET)})
        judging += time.perf_counter() - pause
        print(f"{path:>8} @ {record['iteration']:5d} it ({rows[-1]['train_seconds']:7.1f} s of training): presence "
              f"{presence}  preserved {preserved}  ({rows[-1]['verdict']})", flush=True)
        return args.stop_at_target and rows[-1]["verdict"] == "met"

    try:
        trainer.train(at_iteration)
    finally:
        trainer.release()
    first = next((r for r in rows if r["presence"]["rate"] <= TARGET), None)
    met = next((r for r in rows if r["verdict"] == "met"), None)
    return {"marks": rows, "unet_evals_per_sample": trainer.unet_evals / (rows[-1]["samples"]),
            "first_at_target": first and {"iteration": first["iteration"], "train_seconds": first["train_seconds"]},
            "first_met": met and {"iteration": met["iteration"], "train_seconds": met["train_seconds"]}}


def curve(args) -> dict:
    """--curve: every preset's presence and preservation against training samples and wall time, on each seed;
    then per preset the seconds at which presence first reaches 5% (each seed's, and their mean with its t 95%
    interval over the seeds that reached it)."""
    from esd.core.stats import SeedMean
    from esd.formats.records import environment_record

    if args.base_model != "toy":
        raise SystemExit("--curve judges the UNet toy's model as it trains; use --base_model toy")
    first, out = args.seed, {"seeds": {}, "settings": {k: v for k, v in vars(args).items() if k != "memory_child"}}
    for seed in range(first, first + args.seeds):
        args.seed = seed
        with tempfile.TemporaryDirectory() as tmp:
            out["seeds"][seed] = {path: run_curve(path, args, tmp) for path in PATHS}
    args.seed = first
    lines = [f"Training seconds to presence <= {TARGET:.0%}: the first mark whose pooled presence is at most it, with "
             f"its verdict ('met': the Wilson far end too; 'point estimate': not); {args.curve_samples} images per "
             f"prompt at each mark; seeds {first}..{first + args.seeds - 1}. The seconds are the training loop's "
             "alone (model loading, setup and saving left out, unlike the default mode's), the judging excluded.",
             "",
             "| preset | " + " | ".join(f"seed {seed}" for seed in out["seeds"]) + " | mean s [t 95%] |",
             "|---" * (args.seeds + 2) + "|"]
    summary = {}
    for path in PATHS:
        cells, reached = [], []
        for runs in out["seeds"].values():
            f, marks = runs[path]["first_at_target"], runs[path]["marks"]
            verdict_there = next((r["verdict"] for r in marks if f and r["iteration"] == f["iteration"]), None)
            cells.append(f"{f['train_seconds']:.0f} s ({f['iteration']} it, {verdict_there})" if f else
                         f"not by {marks[-1]['iteration']} it ({marks[-1]['train_seconds']:.0f} s)")
            if f:
                reached.append(f["train_seconds"])
        # A mean only over every seed: a mean of the seeds that got there would drop the slow ones (censored).
        m = SeedMean(tuple(reached)) if reached and len(reached) == args.seeds else None
        if m is not None:
            shown = (f"{m.mean:.0f} [{m.interval[0]:.0f}, {m.interval[1]:.0f}]" if m.interval
                     else f"{m.mean:.0f} (1 seed)")
        else:
            shown = f"- ({len(reached)} of {args.seeds} seeds reached it)"
        summary[path] = {"seconds_to_target": m.record() if m else None, "seeds_reaching": len(reached)}
        lines.append(f"| {path} | " + " | ".join(cells) + f" | {shown} |")
    out["summary"], out["environment"] = summary, environment_record()
    print("\n".join(lines))
    print(json.dumps(out))
    return out


def main():
    from esd.toy.demo import DemoConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default="toy")
    p.add_argument("--concept", default="green", help="a toy colour or shape (green: the cleanest erasure)")
    demo = DemoConfig()  # the demo's settings, so that the figures are the demo's erasure
    # 150, not the demo's 1000: the paper loop costs ~1.1 s an iteration here, and the ratios are per iteration.
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=demo.batch_size)
    p.add_argument("--lr", type=float, default=demo.lr)
    p.add_argument("--negative_guidance", type=float, default=demo.negative_guidance)
    p.add_argument("--ddim_steps", type=int, help="sampler steps T (default: each preset's, 50 for all)")
    p.add_argument("--seed", type=int, default=0, help="training seed (and image i of every prompt: seed + i)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds seed, seed + 1, ...: each path on each, "
                   "then every figure's mean with its t 95%% interval over the seeds")
    p.add_argument("--samples", type=int, default=100, help="images per prompt for the judge")
    p.add_argument("--fast_iterations", type=int, help="iterations of the fast path (default: --iterations); "
                   "fewer compare the two paths at equal erasure rather than at equal settings")
    p.add_argument("--curve", type=lambda v: [int(x) for x in v.split(",")],
                   help="time to equal erasure: iterations at which each preset's model is judged as it trains, "
                        "e.g. 50,100,200,400,1000 (the last is the run's length; --iterations is ignored)")
    p.add_argument("--curve_samples", type=int, default=30, help="images per prompt at each --curve mark")
    p.add_argument("--stop_at_target", action="store_true",
                   help="--curve: stop a preset at the first mark whose presence interval's far end is <= 5%%")
    p.add_argument("--memory_child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return peak_memory_child(args.memory_child, args)
    if args.curve is not None:
        if args.fast_iterations:
            raise SystemExit("--curve runs every preset to its last mark; --fast_iterations does not apply")
        if not args.curve or min(args.curve) < 1 or args.curve_samples < 1 or args.seeds < 1:
            raise SystemExit("--curve takes iterations >= 1 (e.g. 50,100,200), --curve_samples and --seeds >= 1")
        args.curve = sorted(set(args.curve))
        return curve(args)

    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    if args.seeds > 1:
        return over_seeds(args)
    run_one(args)


def over_seeds(args) -> dict:
    """Each seed's run (its figures and JSON line as one run prints them), then per path the mean of its seconds,
    presence and preservation over the seeds with a t 95% interval."""
    from esd.core.stats import RATE, SeedMean
    from esd.formats.records import environment_record

    first, runs = args.seed, []
    for seed in range(first, first + args.seeds):
        args.seed = seed
        print(f"seed {seed}", flush=True)
        runs.append(run_one(args))
    args.seed = first
    out = {"seeds": list(range(first, first + args.seeds)), "environment": environment_record()}
    for path in PATHS:
        means = {"seconds": SeedMean(tuple(r[path]["seconds"] for r in runs)),
                 "presence": SeedMean(tuple(r[path]["presence"]["rate"] for r in runs), RATE),
                 "preserved": SeedMean(tuple(r[path]["preserved"]["rate"] for r in runs), RATE)}
        out[path] = {k: m.record() for k, m in means.items()}
        s = means["seconds"]
        print(f"{path:>8}: {s.mean:7.1f} s [{s.interval[0]:.1f}, {s.interval[1]:.1f}]  presence {means['presence']}  "
              f"preserved {means['preserved']}  (mean, t 95% over {args.seeds} seeds)")
    print(json.dumps(out))
    return out


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` less the flags ``names`` and their values (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a.split("=", 1)[0] not in names:
            out.append(a)
    return out


def run_one(args) -> dict:
    from esd.train.recipe import train_esd

    argv = [*without_flags(sys.argv[1:], ("--seed", "--seeds")), "--seed", str(args.seed)]  # the memory child's
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            start = time.perf_counter()
            result = train_esd(config(path, args, tmp))
            seconds = time.perf_counter() - start
            samples = iterations_of(path, args) * args.batch_size
            presence, preserved = erasure_quality(result.output_dir / f"{path}.safetensors", args)
            figures[path] = {"seconds": seconds, "unet_evals_per_sample": result.unet_evals / samples,
                             "presence": presence, "preserved": preserved, **measure_memory(path, argv)}
            f = figures[path]
            print(f"{path:>8}: {seconds:7.1f} s  {f['unet_evals_per_sample']:5.1f} UNet evals/sample  "
                  f"peak RSS rise {f['rss_rise_mib']:6.1f} MiB (anonymous {f['anon_rise_mib']:.1f}, "
                  f"file-backed {f['file_rise_mib']:.1f})  presence {presence}  preserved {preserved} "
                  "(Wilson 95% over images)",
                  flush=True)
    fast = figures["fast"]
    from esd.formats.records import environment_record

    summary = {"settings": {k: v for k, v in vars(args).items() if k != "memory_child"},
               "environment": environment_record(), "training_samples": args.iterations * args.batch_size,
               "fast_training_samples": iterations_of("fast", args) * args.batch_size}
    for base in ("paper", "official"):
        ref = figures[base]
        summary[f"vs_{base}"] = {
            "unet_evals_ratio": round(fast["unet_evals_per_sample"] / ref["unet_evals_per_sample"], 4),
            "wall_ratio": round(fast["seconds"] / ref["seconds"], 4),
            "peak_mem_ratio": round(fast["rss_rise_mib"] / ref["rss_rise_mib"], 4),
            "peak_anon_mem_ratio": round(fast["anon_rise_mib"] / ref["anon_rise_mib"], 4)}
    for path, f in figures.items():
        summary[path] = {"seconds": round(f["seconds"], 1),
                         "unet_evals_per_sample": round(f["unet_evals_per_sample"], 2),
                         "rss_rise_mib": round(f["rss_rise_mib"], 1), "anon_rise_mib": round(f["anon_rise_mib"], 1),
                         "presence": f["presence"].record(), "preserved": f["preserved"].record()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
