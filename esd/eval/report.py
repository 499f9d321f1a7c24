"""``esd report``: several ``esd evaluate`` outputs of one metric in one table, with charts and a
before/after image grid. Summaries whose numbers were made differently (another protocol, or another
value of a setting the metric names in ``counting_settings``) are refused unless ``allow_mixed``."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..modelcard import check_card, put_report_section
from ..records import atomic_write
from .config import ReportConfig
from .core import read_summary
from .metric import FILE_PATTERN, load_rgb, metric_class


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def per_group_section(cls, summaries: dict, out: Path, plt) -> list[str]:
    """A table and a grouped bar chart (``<metric>.png``) of the metric per class (or overall) per model."""
    charted = {n: cls.chart(s) for n, s in summaries.items()}
    what = next((w for w, v in charted.values() if v), "")
    groups = sorted({g for _, v in charted.values() for g in v})
    if not groups:
        return []
    names = list(summaries)
    erased = set().union(*(s.get("erased_classes", []) for s in summaries.values()))
    lines = ["", f"{what}{' (* erased)' if erased else ''}:", "", "| | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for g in groups:
        cells = [f"{charted[n][1][g]:.4g}" if charted[n][1].get(g) is not None else "" for n in names]
        lines.append(f"| {g}{' *' if g in erased else ''} | " + " | ".join(cells) + " |")
    grouped_bars(plt, out / f"{cls.name}.png", groups,
                 {n: [charted[n][1].get(g) or 0.0 for g in groups] for n in names}, what)
    return lines + ["", f"![{cls.name}]({cls.name}.png)"]


def grouped_bars(plt, path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """One bar per series (model) in each group, the group's label under the middle of its bars."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * len(series)), 4))
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=40, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def image_grid(folders: dict, path: Path, n: int, cell: int = 128) -> list[str]:
    """Before/after grid: one row per model, one column per image file that every model's folder holds
    (the same case and seed, so the columns compare like with like). Returns the files shown."""
    from PIL import ImageDraw

    if n <= 0 or not all(f and Path(f).is_dir() for f in folders.values()):
        return []
    names = [{p.name for p in Path(f).glob("*.png") if FILE_PATTERN.match(p.name)} for f in folders.values()]
    common = sorted(set.intersection(*names), key=lambda f: (FILE_PATTERN.match(f)["case"],
                                                             int(FILE_PATTERN.match(f)["index"])))[:n]
    if not common:
        return []
    label_w = 120
    sheet = Image.new("RGB", (label_w + cell * len(common), cell * len(folders)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, folder) in enumerate(folders.items()):
        draw.text((4, r * cell + cell // 2 - 6), name[:18], fill="black")
        for c, f in enumerate(common):
            img = load_rgb(Path(folder) / f)
            resample = Image.NEAREST if img.width < cell else Image.BICUBIC  # small toy images stay crisp
            sheet.paste(img.resize((cell, cell), resample), (label_w + c * cell, r * cell))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))
    return common
