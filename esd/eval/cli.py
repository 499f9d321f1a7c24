"""``esd evaluate`` and ``esd report``: flags generated from EvalConfig and ReportConfig."""

from dataclasses import MISSING, fields

from esd.eval.config import EvalConfig, ReportConfig
from esd.eval.core import evaluate
from esd.eval.report import report
from esd.formats.summary import METRICS


def add_config_arguments(p, config_class) -> None:
    """One flag per field of ``config_class`` (fields declared with ``init=False`` are not settings)."""
    for f in fields(config_class):
        if not f.init:
            continue
        meta = dict(f.metadata)
        flags, help_text = meta.pop("flags", ()) or (f"--{f.name}",), meta.pop("help")
        if f.name == "metric":
            meta["choices"] = list(METRICS)
        if meta.get("nargs") == "+":
            p.add_argument(f.name, help=help_text, **meta)
        elif f.type is bool:
            p.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        else:
            default = None if f.default is MISSING else f.default
            p.add_argument(*flags, dest=f.name, default=default, help=help_text, **meta)


def config_from_args(config_class, args):
    names = {f.name for f in fields(config_class) if f.init}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score generated images (one row per image) and summarise")
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("report", help="compare several `esd evaluate` outputs of one metric")
    add_config_arguments(p, ReportConfig)
    p.set_defaults(func=cmd_report)


def cmd_evaluate(args) -> int:
    evaluate(config_from_args(EvalConfig, args))
    return 0


def cmd_report(args) -> int:
    report(config_from_args(ReportConfig, args))
    return 0
