"""``esd report``: several ``esd evaluate`` outputs of one metric in one table, with charts and a
before/after image grid. Summaries whose numbers were made differently (another protocol, or another
value of a setting the metric names in ``counting_settings``) are refused unless ``allow_mixed``."""

import json
from pathlib import Path

from esd.eval.charts import image_grid
from esd.eval.config import ReportConfig
from esd.eval.core import read_summary
from esd.formats.records import atomic_write
from esd.formats.summary import metric_class
from esd.train.modelcard import check_card, put_report_section


def counting_differences(metric: str, summaries: dict) -> list[str]:
    """'setting: name=value, name=value' for the protocol and each counting setting whose recorded values
    differ among ``summaries``. A summary that does not record a setting (an older esd) is not compared
    on it; one without a protocol counts as protocol None once any summary names one."""
    out = []
    if any("protocol" in s for s in summaries.values()):
        protocols = {name: s.get("protocol") for name, s in summaries.items()}
        if len(set(protocols.values())) > 1:
            out.append("protocol: " + ", ".join(f"{name}={p}" for name, p in protocols.items()))
    for key in metric_class(metric).counting_settings:
        known = {name: s[key] if key in s else s["arguments"][key] for name, s in summaries.items()
                 if key in s or key in s.get("arguments", {})}
        if len({json.dumps(v, sort_keys=True, default=str) for v in known.values()}) > 1:
            out.append(f"{key}: " + ", ".join(f"{name}={v}" for name, v in known.items()))
    return out


def report(cfg: ReportConfig, log=print) -> Path:
    """Compare several ``esd evaluate`` outputs of one metric: report.md and charts in ``cfg.out``."""
    import matplotlib  # here, not at import: choosing its Agg backend must not change a notebook's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    if cfg.card:
        check_card(cfg.card)
    summaries, folders = {}, {}
    for item in cfg.inputs:
        name, _, folder = item.rpartition("=")
        folders[name or Path(folder).name] = folder
        summaries[name or Path(folder).name] = read_summary(folder)
    metrics = {s.get("metric") for s in summaries.values()}
    if len(metrics) != 1:
        raise ValueError(f"esd report compares one metric at a time; got {sorted(map(str, metrics))}")
    metric = metrics.pop()
    cls = metric_class(metric)
    if differences := counting_differences(metric, summaries):
        if not cfg.allow_mixed:
            raise ValueError(f"these {metric} summaries were counted differently, so one table would compare "
                             f"unlike numbers: {'; '.join(differences)} (pass --allow_mixed to compare them anyway)")
        log(f"warning: mixed counting ({'; '.join(differences)})")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| model | " + " | ".join(cls.columns) + " |", "|---" * (1 + len(cls.columns)) + "|"]
    table += [f"| {n} | " + " | ".join(cls.cells(s)) + " |" for n, s in summaries.items()]
    h = cls.headline(next(iter(summaries.values())))
    table += ["", f"Headline: {h.name}; {h.better} is better ({h.why})."]
    if protocols := {s.get("protocol") for s in summaries.values()} - {None}:
        table += [f"Protocol: {', '.join(sorted(protocols))}."]
    lines = [f"# Comparison: {metric}", "", *table]
    lines += cls.report_section(summaries, out, plt)
    grid = image_grid({n: s.get("images_dir") for n, s in summaries.items()}, out / "grid.png", cfg.grid_images)
    if grid:
        lines += ["", f"Same case and seed across models, one row per model ({', '.join(grid)}):", "",
                  "![images](grid.png)"]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text))
    log(f"report: {out / 'report.md'}")
    if cfg.card:
        made = f"Made by `esd report` from {', '.join(f'{n}={f}' for n, f in folders.items())}; charts in {out}."
        log(f"model card: {put_report_section(cfg.card, metric, [*table, '', made])}")
    return out / "report.md"
