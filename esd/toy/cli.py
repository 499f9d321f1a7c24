"""``esd demo``, ``esd toy-train`` and ``esd toy-eval``."""

import json
from dataclasses import fields
from pathlib import Path

from esd.families.sources import resolve_source
from esd.formats.records import atomic_write
from esd.toy.card import write_model_card
from esd.toy.demo import DemoConfig, check_count, check_demo, check_toy_model, run_demo
from esd.toy.dit import DitRecipeConfig, toy_dit_train
from esd.toy.quality import judge_accuracy, load_toy_pipeline, quality_table, unconditional_shares
from esd.toy.recipe import RecipeConfig, toy_train


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{text!r} is not a yes/no value; valid: true, false, 1, 0, yes, no")


def _add_dataclass_flags(p, cls, skip=()):
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = _flag_bool if isinstance(f.default, bool) else type(f.default)
        p.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"(default: {f.default})")


def register(sub) -> None:
    p = sub.add_parser("demo", help="erase a concept from the toy model and report before/after")
    _add_dataclass_flags(p, DemoConfig)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("toy-train", help="rebuild the toy model from scratch (about 25 min on 2 CPU cores)")
    p.add_argument("--out", required=True, help="folder for the new model")
    _add_dataclass_flags(p, RecipeConfig)
    p.set_defaults(func=cmd_toy_train)

    p = sub.add_parser("toy-train-dit", help="rebuild the flow-matching toy model (toy-dit, an SD3-style MMDiT) "
                       "from scratch")
    p.add_argument("--out", required=True, help="folder for the new model")
    _add_dataclass_flags(p, DitRecipeConfig)
    p.set_defaults(func=cmd_toy_train_dit)

    p = sub.add_parser("toy-eval", help="measure a toy model (quality table and judge accuracy) as JSON")
    p.add_argument("--base_model", default="toy", help="'toy', 'toy-dit' or a toy model folder")
    p.add_argument("--samples", type=int, default=100, help="images per prompt")
    p.add_argument("--out", help="write the JSON here as well as printing it")
    p.add_argument("--card", action="store_true", help="also write the model card (README.md) into the model folder")
    p.set_defaults(func=cmd_toy_eval)


def cmd_demo(args) -> int:
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
    check_demo(cfg)  # validate before any work
    run_demo(cfg)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def cmd_toy_train(args) -> int:
    _check_empty(args.out)
    toy_train(Path(args.out), RecipeConfig(**{f.name: getattr(args, f.name) for f in fields(RecipeConfig)}))
    return 0


def cmd_toy_train_dit(args) -> int:
    _check_empty(args.out)
    toy_dit_train(args.out, DitRecipeConfig(**{f.name: getattr(args, f.name) for f in fields(DitRecipeConfig)}))
    return 0


def _check_empty(out: str) -> None:
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ValueError(f"--out {out!r} is not empty; choose a new folder")


def cmd_toy_eval(args) -> int:
    check_count("--samples", args.samples)
    check_toy_model(args.base_model)
    pipe = load_toy_pipeline(args.base_model)
    report = {"judge_clean": judge_accuracy(), "judge_vae": judge_accuracy(vae=pipe.vae),
              "quality": quality_table(pipe, n=args.samples), "unconditional": unconditional_shares(pipe)}
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write(args.out, lambda p: Path(p).write_text(text))
    print(text)
    if args.card:
        print(f"model card: {write_model_card(resolve_source(args.base_model), report)}")
    return 0
