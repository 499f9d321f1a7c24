"""The summaries of ``esd evaluate`` (summary.json) and the registry of the metrics that read them, by name.

:mod:`esd.eval` registers each of its metrics here (``register_metric``), and the ``esd`` package imports
:mod:`esd.eval`, so the registry is full before a model card (:mod:`esd.train.modelcard`) or a report reads a
summary. A metric class answers ``name``, ``columns`` and ``cells(summary)`` (see :class:`esd.eval.metric.Metric`).
"""

METRICS: dict[str, type] = {}


def register_metric(cls: type) -> type:
    METRICS[cls.name] = cls
    return cls


def metric_class(name: str) -> type:
    """The registered metric ``name``; an unknown one is an error listing the known ones (never a fallback)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]


def percent(value) -> str:
    return "" if value is None else f"{value:.1%}"
