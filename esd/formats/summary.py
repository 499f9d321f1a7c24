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


def percent(value, interval: dict | None = None) -> str:
    """``value`` as a percentage, with its interval (a record of esd.core.stats: low, high) where there is one."""
    if value is None:
        return ""
    if not interval:
        return f"{value:.1%}"
    return f"{value:.1%} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"
