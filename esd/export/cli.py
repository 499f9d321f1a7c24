"""``esd export``: the command line of :mod:`esd.export`."""

from pathlib import Path

from . import DEFAULT_DTYPE, DEFAULT_MAX_REL_ERROR, FORMATS, ExportSettings, run_export
from .lora import parse_rank


def register(sub) -> None:
    from ..config import SAVE_PRECISIONS

    p = sub.add_parser("export", help="write an erasure as a LoRA, a single-file checkpoint or a diffusers folder")
    p.add_argument("source", metavar="RUN_DIR_OR_WEIGHTS",
                   help="a run folder of `esd train` (its args.json names the base model), or a weights file")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="'lora': the weight change, SVD-truncated, kohya-named (diffusers load_lora_weights, "
                   "AUTOMATIC1111, ComfyUI); 'single-file': the whole erased model in the original "
                   "(CompVis/A1111) layout; 'diffusers': a pipeline folder with the erased UNet")
    p.add_argument("--out", required=True, help="the .safetensors file (lora, single-file) or folder (diffusers) "
                   "to write; an existing one is replaced only with --overwrite")
    p.add_argument("--rank", default="auto", help="lora: rank of every layer (a positive integer; capped at the "
                   "layer's own), 'full' (exact), or 'auto': per layer the smallest rank within --max_rel_error "
                   "(default: %(default)s)")
    p.add_argument("--max_rel_error", type=float, default=DEFAULT_MAX_REL_ERROR,
                   help="lora with --rank auto: the relative Frobenius error allowed per layer (default: %(default)s)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(SAVE_PRECISIONS),
                   help="dtype of the written weights (default: %(default)s)")
    p.add_argument("--base_model", help="the base model (hub id, diffusers folder or 'toy'), when the run's "
                   "args.json cannot be used")
    p.add_argument("--ckpt_path", help="the base model as an original single-file checkpoint")
    p.add_argument("--ckpt_config", help="local diffusers folder with the configs of --ckpt_path (offline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    settings = ExportSettings(args.format, Path(args.out), parse_rank(args.rank), args.max_rel_error, args.dtype,
                              args.overwrite)
    run_export(args.source, settings, args.base_model, args.ckpt_path, args.ckpt_config)
    return 0
