"""What ``esd demo`` shows: labelled grids (each row its prompt, each image the judge's verdict), a chart of
presence and accuracy before and after with their intervals, the markdown report and the one-line summary."""

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

SCALE = 3  # 32 px shapes upscaled (nearest) so they show
LABEL_WIDTH = 190  # px for the prompt at the start of each row
CAPTION = 24  # px under each image for its verdict (colour, shape: two lines)


def labelled_grid(rows: list[tuple[str, list[np.ndarray], list[tuple[str, str]]]]) -> Image.Image:
    """One row per prompt: its text, then its first images (each (H, W, 3) in [0, 1]) with the judge's verdict
    (colour, shape) under each."""
    font = ImageFont.load_default()
    columns = max(len(images) for _, images, _ in rows)
    side = rows[0][1][0].shape[0] * SCALE
    cell = side + CAPTION
    grid = Image.new("RGB", (LABEL_WIDTH + columns * side, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images, verdicts) in enumerate(rows):
        top = r * cell
        draw.text((4, top + side // 2 - 6), prompt[:30], fill="black", font=font)
        for c, (image, (colour, shape)) in enumerate(zip(images, verdicts)):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            left = LABEL_WIDTH + c * side
            grid.paste(tile.resize((side, side), Image.NEAREST), (left, top))
            draw.text((left + 2, top + side + 1), colour, fill="black", font=font)
            draw.text((left + 2, top + side + 12), shape, fill="black", font=font)
    return grid


def chart(report: dict, path) -> None:
    """Presence of the concept on the erased prompts and accuracy on the others, before and after (per seed, and
    the mean over seeds), each with its 95% interval."""
    s = report["summary"]
    groups = [("presence", "erased prompts: concept presence"), ("accuracy", "other prompts: accuracy")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, title) in zip(axes, groups):
        bars = [("before", s[f"{key}_before"]["rate"], s[f"{key}_before"]["low"], s[f"{key}_before"]["high"])]
        for seed, r in zip(report["training_seeds"], s[f"{key}_after"]):
            bars.append((f"after\nseed {seed}", r["rate"], r["low"], r["high"]))
        mean = s[f"{key}_after_mean"]
        if mean["low"] is not None:
            bars.append(("after\nmean", mean["mean"], mean["low"], mean["high"]))
        x = np.arange(len(bars))
        values = np.array([100 * b[1] for b in bars])
        errors = np.array([[100 * max(0.0, b[1] - b[2]), 100 * max(0.0, b[3] - b[1])] for b in bars]).T
        ax.bar(x, values, yerr=errors, capsize=4, color=["#888"] + ["#c44"] * (len(bars) - 1))
        ax.set_xticks(x, [b[0] for b in bars], fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"esd demo: \"{report['concept']}\" (bars: Wilson 95% over images; mean: t 95% over seeds)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def _mean(m: dict) -> str:
    if m["low"] is None:
        return f"{100 * m['mean']:.1f}% (1 seed)"
    return f"{100 * m['mean']:.1f}% [{100 * m['low']:.1f}, {100 * m['high']:.1f}] ({m['seeds']} seeds)"


def _short(r: dict) -> str:
    return f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f}, {100 * r['high']:.0f}]"


def _after(v: dict) -> str:
    """A prompt's after: its rate with its Wilson interval (one seed), or the seeds' mean and each seed's rate."""
    runs = v["after_by_seed"]
    if len(runs) == 1:
        return _short(runs[0])
    return f"{100 * sum(r['rate'] for r in runs) / len(runs):.0f}% (" + ", ".join(f"{100 * r['rate']:.0f}"
                                                                                 for r in runs) + ")"


def render_markdown(report: dict) -> str:
    c, ax, st = report["concept"], report["axis"], report["settings"]
    s, seeds = report["summary"], report["training_seeds"]
    lines = [f"# ESD demo: erasing \"{c}\" from the toy model ({st['base_model']})", "",
             f"ESD-x ({st['train_method']}) of the prompt \"{c}\", eta {st['negative_guidance']}, "
             f"{st['iterations']} iterations"
             + (f", retain weight {st['retain_weight']} (the other values' unmeasured phrasings, retain_prompts.txt)"
                if st.get("retain_weight") else "")
             + f"; {len(seeds)} training seed(s) ({', '.join(map(str, seeds))}); {report['samples_per_prompt']} "
             f"images per prompt before and after with the same seeds; {report['seconds']} s in all "
             f"({report['training_seconds']} s of training; the base model's images "
             f"{report['base_images']}).", "",
             "Every rate: its Wilson 95% interval over images in brackets; a mean over seeds: its t 95% interval.",
             "", "## Summary", "", "| | before | after (per seed) | after, mean over seeds |", "|---|---|---|---|",
             f"| presence of \"{c}\" on the erased prompts | {_pct(s['presence_before'])} | "
             f"{'; '.join(_pct(r) for r in s['presence_after'])} | {_mean(s['presence_after_mean'])} |",
             f"| accuracy on the other prompts | {_pct(s['accuracy_before'])} | "
             f"{'; '.join(_pct(r) for r in s['accuracy_after'])} | {_mean(s['accuracy_after_mean'])} |", "",
             "![presence and accuracy](report.png)", "",
             f"## Erased prompts: share of images whose {ax} is judged \"{c}\"", "",
             "| prompt | held out | before | after" + (" (mean over seeds: each seed)" if len(seeds) > 1 else "")
             + " |", "|---|---|---|---|"]
    lines += [f"| {p} | {'yes' if v['held_out'] else ''} | {_short(v['before'])} | {_after(v)} |"
              for p, v in report["erased"].items()]
    lines += ["", "![before](erased_before.png) ![after](erased_after.png)", "",
              "## Other prompts: share judged right in colour and shape (collateral damage shows here)", "",
              "| prompt | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {p} | {_short(v['before'])} | {_after(v)} | "
              f"{100 * (v['accuracy_after'] - v['accuracy_before']):+.0f} pts |" for p, v in report["others"].items()]
    lines += ["", "![before](others_before.png) ![after](others_after.png)", "",
              f"The grids show each prompt's first images{' of the first seed' if len(seeds) > 1 else ''}, each "
              "with the judge's verdict (colour, shape) under it.", ""]
    return "\n".join(lines)


def _after_all(s: dict, key: str) -> str:
    """One seed: its rate with the Wilson interval; several: their mean with the t interval."""
    runs = s[f"{key}_after"]
    return _pct(runs[0]) + " (1 seed)" if len(runs) == 1 else _mean(s[f"{key}_after_mean"])


def summary(report: dict) -> str:
    s = report["summary"]
    highest = max(report["erased"].items(), key=lambda kv: kv[1]["presence_after"])
    worst = min(v["accuracy_after"] - v["accuracy_before"] for v in report["others"].values())
    return (f"erased \"{report['concept']}\": presence {_pct(s['presence_before'])} -> "
            f"{_after_all(s, 'presence')} (highest after: {highest[0]!r} {highest[1]['presence_after']:.0%}); "
            f"other prompts' accuracy {_pct(s['accuracy_before'])} -> {_after_all(s, 'accuracy')} (worst "
            f"prompt {100 * worst:+.0f} pts); {report['seconds']} s")
