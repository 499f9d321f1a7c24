"""How well a LoRA of each rank keeps an erasure: relative error of the weight change and file size, and with
--judge (toy model runs only) the erased concept's presence in images of the fused model, as esd demo measures it.

    python benchmarks/lora_ranks.py RUN_DIR [--ranks 1,4,16,full] [--judge --samples 20] [--out ranks.json]
"""

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esd.formats.erasure_source import find_erasure, load_erasure  # noqa: E402
from esd.formats.lora import fuse_into, lora_from_erasure, parse_rank  # noqa: E402
from esd.formats.records import atomic_write, environment_record  # noqa: E402
from esd.formats.weights import deterministic_safetensors  # noqa: E402

DTYPE = "fp16"  # what esd export writes by default


def judge(base_model: str, unet, concept: str, samples: int, seed: int) -> dict:
    """Mean presence of ``concept`` over every phrasing that names it, and mean accuracy on the other prompts (every
    prompt has ``samples`` images, so each mean is the rate over all of its images: ``*_k`` of ``*_n``)."""
    from esd.toy.demo import accuracy, concept_presence
    from esd.toy.quality import load_toy_pipeline, sample
    from esd.toy.world import prompts_for

    erased, others, axis = prompts_for(concept)
    pipe = load_toy_pipeline(base_model, unet=unet)
    presence = [concept_presence(sample(pipe, p.text, samples, seed), axis, concept) for p in erased]
    kept = [accuracy(sample(pipe, p.text, samples, seed), p) for p in others]
    return {"presence": sum(presence) / len(presence), "others_accuracy": sum(kept) / len(kept),
            "presence_k": round(sum(presence) * samples), "presence_n": len(presence) * samples,
            "others_k": round(sum(kept) * samples), "others_n": len(kept) * samples}


def main() -> None:
    from esd.core.precision import SAVE_PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder of esd train (or its weights file)")
    p.add_argument("--ranks", default="1,4,16,full", help="comma-separated ranks (integers, 'full', 'auto')")
    p.add_argument("--max_rel_error", type=float, default=0.01, help="for the rank 'auto'")
    p.add_argument("--base_model", help="override the run's base model")
    p.add_argument("--judge", action="store_true", help="toy runs: generate images with each fused LoRA and judge "
                   "the erased concept's presence (and the other prompts' accuracy)")
    p.add_argument("--samples", type=int, default=20, help="--judge: images per prompt")
    p.add_argument("--seed", type=int, default=0, help="--judge: image i of every prompt uses seed + i")
    p.add_argument("--out", help="also write the rows, arguments and versions to this JSON file")
    args = p.parse_args()
    ranks = [parse_rank(r) for r in args.ranks.split(",")]
    erasure = find_erasure(args.run, args.base_model)
    loaded = load_erasure(erasure)
    models = loaded.models
    rows = []
    if args.judge:
        base = judge(erasure.base_model, models.unet, erasure.concept, args.samples, args.seed)
        exact = judge(erasure.base_model, loaded.erased_unet, erasure.concept, args.samples, args.seed)
        rows += [{"model": "base", **base}, {"model": "erased (exact)", **exact}]
    for rank in ranks:
        export = lora_from_erasure(models.unet, loaded.changed, models.family, rank, args.max_rel_error,
                                   SAVE_PRECISIONS[DTYPE])
        row = {"model": f"lora rank {rank}", "total_rel_error": export.total_rel_error,
               "max_layer_rel_error": max(f.rel_error for f in export.layers.values()),
               "mean_rank": sum(f.rank for f in export.layers.values()) / len(export.layers),
               "dropped_tensors": len(export.dropped),
               "file_mb": len(deterministic_safetensors(export.tensors, {})) / 2**20}
        if args.judge:
            row.update(judge(erasure.base_model, fuse_into(copy.deepcopy(models.unet), export), erasure.concept,
                             args.samples, args.seed))
        rows.append(row)
    print(f"{erasure.weights} ({erasure.train_method}, concept {erasure.concept!r}, base {erasure.base}); "
          f"LoRA factors in {DTYPE}" + (f"; {args.samples} images per prompt" if args.judge else ""))
    columns = [c for c in ("model", "total_rel_error", "max_layer_rel_error", "mean_rank", "dropped_tensors",
                           "file_mb", "presence", "others_accuracy") if any(c in r for r in rows)]
    print(" | ".join(columns))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns))
    if args.out:
        record = {"rows": rows, "arguments": vars(args), "erasure": erasure.record,
                  "environment": environment_record()}
        atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(record, indent=2)))


if __name__ == "__main__":
    main()
