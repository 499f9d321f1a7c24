"""``esd reproduce``: the command's flags, on :func:`esd.reproduce.run.reproduce`."""

from dataclasses import fields
from pathlib import Path

from esd.reproduce.config import EXPERIMENTS, ReproduceConfig
from esd.reproduce.run import reproduce


# -- command line ---------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("reproduce", help="erase, generate, evaluate and report one result of the ESD paper")
    for f in fields(ReproduceConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        meta.pop("flags")
        if f.name == "name":
            p.add_argument("name", choices=list(EXPERIMENTS), help=help_text)
        else:
            default = None if meta.get("required") else f.default
            p.add_argument(f"--{f.name}", default=default, help=help_text, **meta)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    cfg = ReproduceConfig(**{f.name: getattr(args, f.name) for f in fields(ReproduceConfig)})
    result = reproduce(cfg)
    print(f"report in {Path(cfg.out) / 'report.md'} (complete: {result['complete']})")
    return 0
