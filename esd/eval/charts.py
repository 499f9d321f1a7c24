"""The charts and image grids of ``esd report`` and ``esd attack`` (matplotlib is passed in, imported by the caller)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from esd.eval.images import FILE_PATTERN, load_rgb
from esd.formats.records import atomic_write


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
