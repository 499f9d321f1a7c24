"""``esd evaluate`` and ``esd report``: flags generated from EvalConfig and ReportConfig."""

from esd.eval.config import EvalConfig, ReportConfig
from esd.eval.core import evaluate
from esd.eval.report import report
from esd.flags import add_setting_flags, settings_from_args
from esd.formats.summary import METRICS


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score generated images (one row per image) and summarise")
    add_setting_flags(p, EvalConfig, metric={"choices": list(METRICS)})
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("report", help="compare several `esd evaluate` outputs of one metric")
    add_setting_flags(p, ReportConfig)
    p.set_defaults(func=cmd_report)


def cmd_evaluate(args) -> int:
    evaluate(settings_from_args(EvalConfig, args))
    return 0


def cmd_report(args) -> int:
    report(settings_from_args(ReportConfig, args))
    return 0
