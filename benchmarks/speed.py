"""Paper-faithful ESD loop vs the fast path, side by side on one model and seed.

    python benchmarks/speed.py                      # toy model, ESD-x of "green"
    python benchmarks/speed.py --iterations 50 --samples 20   # quicker look

Paper path: a fresh partial trajectory every iteration sampled by the model being
trained, the original DDPM timestep draw, a whole frozen UNet copy (the original
code's layout). ``--paper_sampler frozen`` samples the paper loop's x_t with the frozen
model instead (the current official code), the same x_t distribution as the fast path's
pool: the comparison that isolates what trajectory reuse changes. Fast path (the
default of `esd train`): trajectory pool sampled by the frozen model, matched
timesteps, one UNet in memory. Both train on the same number of samples
(iterations x batch), unless --fast_iterations sets the fast path's own count to
compare the paths at equal erasure. Prints the figures, then one JSON line.

Wall time and erasure quality are measured in this process, one path after the
other; peak memory in a fresh child process per path, as the rise of its peak RSS
over the RSS after imports (the peak is reset there, so import-time peaks do not count),
and split into anonymous memory (tensors, allocator, Python objects) and file-backed
pages (library code a path runs for the first time, mapped weight files): on the toy
model the file-backed part is about half of either path's rise and the same for both.
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

PATHS = {
    "paper": {"pool_size": 0, "sampler_model": "trained", "timestep_mode": "original", "devices": "cpu,cpu"},
    "fast": {"devices": "cpu"},
}


def iterations_of(path: str, args) -> int:
    return args.fast_iterations if path == "fast" and args.fast_iterations else args.iterations


def config(path: str, args, save_path: str):
    from esd import ESDConfig
    from esd.toy.demo import erase_prompt

    settings = dict(PATHS[path])
    if path == "paper" and args.paper_sampler == "frozen":
        settings.update(sampler_model="frozen", timestep_mode="matched")

    return ESDConfig(prompt=erase_prompt(args.concept), train_method="xattn", base_model=args.base_model,
                     iterations=iterations_of(path, args), batch_size=args.batch_size, lr=args.lr,
                     negative_guidance=args.negative_guidance, ddim_steps=args.ddim_steps, seed=args.seed,
                     save_path=save_path, name=path, save_format="trained", **settings)


def peak_memory_child(path: str, args) -> None:
    """Run one path and print its peak RSS rise in MiB over the RSS after imports (in a fresh process)."""
    import matplotlib  # saving imports it for loss.png: an import, so before the baseline like the others

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import esd  # noqa: F401 - imports done before the baseline reading
    from esd.train import train_esd

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


def erasure_quality(weights, args) -> tuple[float, float]:
    """(presence of the concept on its prompts, accuracy on the other prompts) by the toy judge."""
    from esd.toy.demo import prompts_for
    from esd.toy.judge import judge_batch
    from esd.toy.quality import load_toy_pipeline, sample
    from esd.weights import load_erased_unet

    unet = load_erased_unet(weights, base_model=args.base_model)
    pipe = load_toy_pipeline(args.base_model, unet=unet)
    erased, others, axis = prompts_for(args.concept)
    presence = np.mean([getattr(j, axis) == args.concept for s in erased
                        for j in judge_batch(sample(pipe, s.prompt, args.samples, args.seed))])
    preserved = np.mean([j.colour == s.colour and j.shape == s.shape for s in others
                         for j in judge_batch(sample(pipe, s.prompt, args.samples, args.seed))])
    return float(presence), float(preserved)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default="toy")
    p.add_argument("--concept", default="green", help="a toy colour or shape (green: the cleanest erasure)")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--negative_guidance", type=float, default=3.0, help="as the demo")
    p.add_argument("--ddim_steps", type=int, default=50, help="the paper's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=100, help="images per prompt for the judge")
    p.add_argument("--paper_sampler", default="trained", choices=["trained", "frozen"],
                   help="x_t of the paper path from the trained model (the paper's code) or the frozen one")
    p.add_argument("--fast_iterations", type=int, help="iterations of the fast path (default: --iterations); "
                   "fewer compare the two paths at equal erasure rather than at equal settings")
    p.add_argument("--memory_child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return peak_memory_child(args.memory_child, args)

    from esd.train import train_esd

    argv = [a for a in sys.argv[1:]]
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
            print(f"{path:>5}: {seconds:7.1f} s  {f['unet_evals_per_sample']:5.1f} UNet evals/sample  "
                  f"peak RSS rise {f['rss_rise_mib']:6.1f} MiB (anonymous {f['anon_rise_mib']:.1f}, "
                  f"file-backed {f['file_rise_mib']:.1f})  presence {presence:.1%}  preserved {preserved:.1%}",
                  flush=True)
    paper, fast = figures["paper"], figures["fast"]
    print(json.dumps({
        "unet_evals_ratio": round(fast["unet_evals_per_sample"] / paper["unet_evals_per_sample"], 4),
        "wall_ratio": round(fast["seconds"] / paper["seconds"], 4),
        "peak_mem_ratio": round(fast["rss_rise_mib"] / paper["rss_rise_mib"], 4),
        "peak_anon_mem_ratio": round(fast["anon_rise_mib"] / paper["anon_rise_mib"], 4),
        "rss_rise_mib_paper": round(paper["rss_rise_mib"], 1), "rss_rise_mib_fast": round(fast["rss_rise_mib"], 1),
        "presence_paper": round(paper["presence"], 4), "presence_fast": round(fast["presence"], 4),
        "preserved_paper": round(paper["preserved"], 4), "preserved_fast": round(fast["preserved"], 4),
        "paper_sampler": args.paper_sampler, "samples_per_prompt": args.samples,
        "training_samples": args.iterations * args.batch_size,
        "fast_training_samples": iterations_of("fast", args) * args.batch_size,
        "paper_seconds": round(paper["seconds"], 1), "fast_seconds": round(fast["seconds"], 1),
    }))


if __name__ == "__main__":
    main()
