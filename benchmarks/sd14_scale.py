"""Speed and memory of the paper's ESD loop and the fast path at real scale: the SD v1.4
UNet and CLIP ViT-L/14 text encoder architectures with random weights (speed and
memory do not depend on weight values, so nothing is downloaded), 512 px.

    python benchmarks/sd14_scale.py --pool_size 1            # CPU: one step of each path, short sampler
    python benchmarks/sd14_scale.py --device cuda --mixed_precision bf16 --ddim_steps 50 --iterations 20

Each path runs in its own process so that peak memory is its own (CUDA: max allocated;
CPU: peak RSS rise over the process after imports).

Paths are presets of esd.train.presets.PRESETS. Paper path (preset paper): sampler = trained model,
whole frozen UNet copy, a fresh partial trajectory per iteration with the original code's
pairing (seconds/iteration averaged over --iterations). Fast path (preset fast): one pool
refresh (pool_size whole trajectories, timed) plus --iterations training steps from the pool
(timed); seconds/iteration = step time + refresh time / (pool entries per refresh / batch
size), the refresh's cost spread over the iterations it feeds.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from peak_memory import PeakRSS  # noqa: E402 - benchmarks/ is on sys.path when run as a script

PATHS = ("paper", "fast")


def sd14_models(seed: int = 0):
    """SD v1.4's UNet and text encoder configs (as published in its diffusers folder), random weights."""
    import torch
    from diffusers import DDIMScheduler
    from tiny import sd14_unet
    from transformers import CLIPTextConfig, CLIPTextModel

    from esd.families.models import DiffusionModels
    from esd.toy.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = sd14_unet("cpu")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768))
    # Token ids only index the embedding table; a small vocabulary tokenizer is enough for timing.
    tokenizer = build_clip_tokenizer(["nudity", "van", "gogh", "a", "photo"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return DiffusionModels(unet, scheduler, [tokenizer], [text_encoder], None, 8, "sd14-architecture-random")


def child(path: str, args) -> dict:
    import torch

    from esd.train.config import ESDConfig
    from esd.train.recipe import ESDTrainer

    cuda = args.device.startswith("cuda")
    peak = PeakRSS()
    if not cuda:
        peak.reset()  # the rise over the RSS after imports: the models and both paths' working memory
    models = sd14_models()
    settings = {"paper": {}, "fast": {"pool_size": args.pool_size}}  # the paper preset keeps a whole frozen copy
    cfg = ESDConfig(prompt="nudity", train_method=args.train_method, base_model="CompVis/stable-diffusion-v1-4",
                    preset=path, iterations=args.iterations, ddim_steps=args.ddim_steps, batch_size=args.batch_size,
                    mixed_precision=args.mixed_precision, seed=0, save_path="/tmp/esd-bench",
                    gradient_checkpointing=args.gradient_checkpointing and path == "fast",
                    optimizer=args.optimizer if path == "fast" else "adam", devices="0" if cuda else "cpu",
                    **settings[path])
    trainer = ESDTrainer(cfg, models)
    trainer.setup()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    refresh = 0.0
    if path == "fast":
        sync()
        start = time.perf_counter()
        trainer.source.refresh()
        sync()
        refresh = time.perf_counter() - start
    if cuda:  # warm-up step outside the timing (kernel selection, allocator)
        trainer.step()
    sync()
    start = time.perf_counter()
    evals0 = trainer.unet_evals
    for _ in range(args.iterations):
        trainer.step()
    sync()
    step_seconds = (time.perf_counter() - start) / args.iterations
    per_refresh = args.pool_size * args.ddim_steps / args.batch_size  # iterations one refresh feeds
    seconds = step_seconds + (refresh / per_refresh if path == "fast" else 0.0)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        peak.rise_mib() / 1024
    return {"path": path, "seconds_per_iteration": seconds, "step_seconds": step_seconds,
            "refresh_seconds": refresh, "peak_memory_gib": memory,
            "unet_evals_per_iteration": (trainer.unet_evals - evals0) / args.iterations,
            "trained_parameters": sum(p.numel() for p in trainer.params)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--ddim_steps", type=int, default=4, help="sampler steps (50 on a GPU, as the paper)")
    p.add_argument("--iterations", type=int, default=1, help="timed iterations per path")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--pool_size", type=int, default=8, help="trajectories per pool refresh (1 on a CPU)")
    p.add_argument("--train_method", default="xattn")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="fast path only: recompute activations in backward (the paper path stays as the original)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adam8bit"],
                   help="fast path only (the paper path keeps Adam): adam8bit needs bitsandbytes")
    p.add_argument("--paths", default="paper,fast", help="which paths to run (comma-separated)")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {}
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS):
        sys.exit(f"--paths {args.paths!r}: each must be one of {', '.join(PATHS)}")
    for path in paths:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", path], capture_output=True,
                             text=True)
        if out.returncode:
            sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[path]
        print(f"{path:>5}: {r['seconds_per_iteration']:8.2f} s/iteration ({r['unet_evals_per_iteration']:.1f} UNet "
              f"evals/iteration; refresh {r['refresh_seconds']:.1f} s)  peak memory {r['peak_memory_gib']:.2f} GiB",
              flush=True)
    if len(results) == 1:  # one path: its figures only
        print(json.dumps({"device": args.device, "mixed_precision": args.mixed_precision, "ddim_steps": args.ddim_steps,
                          "train_method": args.train_method, "gradient_checkpointing": args.gradient_checkpointing,
                          "optimizer": args.optimizer, **next(iter(results.values()))}))
        return
    paper, fast = results["paper"], results["fast"]
    summary = {"gradient_checkpointing": args.gradient_checkpointing, "optimizer": args.optimizer,
               "device": args.device, "mixed_precision": args.mixed_precision, "ddim_steps": args.ddim_steps,
               "train_method": args.train_method, "trained_parameters": fast["trained_parameters"],
               "paper_s_per_it": round(paper["seconds_per_iteration"], 3),
               "fast_s_per_it": round(fast["seconds_per_iteration"], 3),
               "speedup": round(paper["seconds_per_iteration"] / fast["seconds_per_iteration"], 2),
               "paper_peak_gib": round(paper["peak_memory_gib"], 2), "fast_peak_gib": round(fast["peak_memory_gib"], 2),
               "peak_mem_ratio": round(fast["peak_memory_gib"] / paper["peak_memory_gib"], 3),
               "fast_1000_iterations_min": round(1000 * fast["seconds_per_iteration"] / 60, 1),
               "paper_1000_iterations_min": round(1000 * paper["seconds_per_iteration"] / 60, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
