"""``esd export``: the command line of :mod:`esd.export`; and ``esd train --export``'s flags, the same settings."""

from pathlib import Path

from esd.core.precision import SAVE_PRECISIONS
from esd.formats.exports import (
    DEFAULT_DTYPE,
    DEFAULT_MAX_REL_ERROR,
    FORMATS,
    TRAIN_EXPORT_OPTIONS,
    ExportSettings,
    run_export,
)
from esd.formats.lora import parse_rank

FORMATS_HELP = ("'lora': the weight change, SVD-truncated, kohya-named (diffusers load_lora_weights, AUTOMATIC1111, "
                "ComfyUI; SD3/FLUX: diffusers' transformer.<module>.lora_A/B names); 'single-file': the whole "
                "erased model in the original (CompVis/A1111) layout, UNets only; 'diffusers': a pipeline folder "
                "with the erased UNet or transformer")


def option_flags() -> dict[str, dict]:
    """argparse keywords of the ExportSettings fields that both commands set (TRAIN_EXPORT_OPTIONS)."""
    return {"rank": dict(default="auto", help="lora: rank of every layer (a positive integer; capped at the layer's "
                         "own), 'full' (exact), or 'auto': per layer the smallest rank within --max_rel_error "
                         "(default: %(default)s)"),
            "max_rel_error": dict(type=float, default=DEFAULT_MAX_REL_ERROR, help="lora with rank auto: the "
                                  "relative Frobenius error allowed per layer (default: %(default)s)"),
            "dtype": dict(default=DEFAULT_DTYPE, choices=list(SAVE_PRECISIONS),
                          help="dtype of the written weights (default: %(default)s)")}


def register(sub) -> None:
    p = sub.add_parser("export", help="write an erasure as a LoRA, a single-file checkpoint or a diffusers folder")
    p.add_argument("source", metavar="RUN_DIR_OR_WEIGHTS",
                   help="a run folder of `esd train` (its args.json names the base model), or a weights file")
    p.add_argument("--format", required=True, choices=FORMATS, help=FORMATS_HELP)
    p.add_argument("--out", required=True, help="the .safetensors file (lora, single-file) or folder (diffusers) "
                   "to write; an existing one is replaced only with --overwrite")
    for name, kw in option_flags().items():
        p.add_argument(f"--{name}", **kw)
    p.add_argument("--base_model", help="the base model (hub id, diffusers folder or 'toy'), when the run's "
                   "args.json cannot be used")
    p.add_argument("--ckpt_path", help="the base model as an original single-file checkpoint")
    p.add_argument("--ckpt_config", help="local diffusers folder with the configs of --ckpt_path (offline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


def add_train_export_arguments(p) -> None:
    """``esd train --export FORMAT[,FORMAT]`` and ``--export_<option>``: esd export's settings, unset = its defaults."""
    p.add_argument("--export", action="append", default=[], metavar="FORMAT[,FORMAT]",
                   help="after training, also write the erasure as esd export does, into RUN/export/ "
                   "(lora.safetensors, single-file.safetensors, diffusers/); repeatable or comma-separated. "
                   + FORMATS_HELP)
    for name, kw in option_flags().items():
        kw = {**kw, "default": None, "help": f"--export: esd export's --{name}; " + kw["help"]}
        p.add_argument(f"--export_{name}", **kw)


def train_export_config(args) -> dict:
    """ESDConfig's ``export`` and ``export_options`` from the flags above (only the options given)."""
    formats = [f.strip() for item in args.export for f in item.split(",") if f.strip()]
    options = {name: getattr(args, f"export_{name}") for name in TRAIN_EXPORT_OPTIONS
               if getattr(args, f"export_{name}") is not None}
    if "rank" in options:
        options["rank"] = parse_rank(options["rank"], "--export_rank")
    return {"export": formats, "export_options": options}


def cmd_export(args) -> int:
    settings = ExportSettings(args.format, Path(args.out), parse_rank(args.rank), args.max_rel_error, args.dtype,
                              args.overwrite)
    run_export(args.source, settings, args.base_model, args.ckpt_path, args.ckpt_config)
    return 0
