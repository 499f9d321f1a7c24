"""Evaluation: ``esd evaluate`` scores every image with one registered metric, ``esd report``
compares models. Call it without the command line as
``esd.eval.evaluate(EvalConfig(metric="nudenet", images=..., out=...))``.

A metric is a class registered by name (see ``metric.Metric`` for the contract): nudenet, classify,
lpips, fid, clip. Named protocols (``protocols.PROTOCOLS``) fix every setting of a published number.
"""

from esd.eval import classify, clip, fid, lpips, nudenet  # noqa: F401 - each registers its metric
from esd.eval.config import DEFAULTS, EvalConfig, ReportConfig
from esd.eval.core import evaluate, read_summary
from esd.eval.images import load_rgb
from esd.eval.metric import Headline, Metric
from esd.eval.protocols import PROTOCOLS, Protocol
from esd.eval.report import counting_differences, report
from esd.formats.summary import METRICS, metric_class, register_metric

__all__ = ["DEFAULTS", "METRICS", "PROTOCOLS", "EvalConfig", "Headline", "Metric", "Protocol", "ReportConfig",
           "counting_differences", "evaluate", "load_rgb", "metric_class", "read_summary", "register_metric",
           "report"]
