"""``esd reproduce``: the command's flags, on :func:`esd.reproduce.run.reproduce`."""

from pathlib import Path

from esd.flags import add_setting_flags, settings_from_args
from esd.reproduce.config import EXPERIMENTS, ReproduceConfig
from esd.reproduce.run import reproduce


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="erase, generate, evaluate and report one result of the ESD paper")
    add_setting_flags(p, ReproduceConfig, name={"positional": True, "choices": list(EXPERIMENTS)})
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    cfg = settings_from_args(ReproduceConfig, args)
    result = reproduce(cfg)
    print(f"report in {Path(cfg.out) / 'report.md'} (complete: {result['complete']})")
    return 0
