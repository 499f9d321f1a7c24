"""``esd demo``: erase a concept from the toy model with ESD and show what changed.

The concept is typed as a user would ("red", "circle") and erased with the paper's settings
(ESD-x, eta 1, start guidance 3). Before and after images use the same seeds; the judge scores
every image. Erased prompts: every phrasing of the world that names the concept (trained and
held-out templates, held-out combinations too); presence is the share of images still judged
to have it. Other prompts: "a {colour} {shape}" for every scene without the concept and the other
values of the concept's axis alone ("blue", "a square"); accuracy is "right in what the prompt
names".

``--retain_weight W`` (> 0) adds robust ESD's preservation term (``esd train --retain_prompts``): the
trained model's predictions for phrasings without the concept that the demo does not measure
(:func:`retain_phrasings`) are kept at the frozen model's, weighted by W.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from esd.families.registry import check_method
from esd.families.sources import TOY_MODELS, resolve_source, source_family
from esd.formats.records import OutputError, atomic_write, check_inside, check_writable, environment_record
from esd.formats.weights import load_erased_unet, run_weight_files
from esd.toy.judge import judge_batch
from esd.toy.quality import load_toy_pipeline, sample
from esd.toy.world import COLOURS, SHAPES, Phrasing, prompts_for
from esd.train.config import ESDConfig
from esd.train.recipe import train_esd
from esd.train.robust_settings import check_retain_weight


@dataclass
class DemoConfig:
    concept: str = "green"  # gone from every phrasing at the paper's settings in 1000 iterations (red: README)
    out: str = "demo-out"
    base_model: str = "toy"
    train_method: str = ""  # "": ESD-x, i.e. xattn on the UNet toy, its transformer analogue mmdit-x on toy-dit
    # At the paper's eta 1, 1000 iterations (80 s on 2 cores) take green to 0% on every phrasing; red keeps
    # 28% on average (squares 50-64%) at 1000: see the README's table.
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 1e-3  # the toy UNet is small and far from SD's scale; 1e-5 barely moves it
    negative_guidance: float = 1.0  # the paper's eta
    samples: int = 100  # images per prompt, before and after
    seed: int = 0
    retain_weight: float = 0.0  # > 0: keep retain_phrasings() as theta* draws them (esd train --retain_prompts)


RETAIN_TEMPLATES = ("{colour} {shape}", "a {colour} shape", "a photo of a {colour} {shape}")


def retain_phrasings(concept: str) -> list[str]:
    """Phrasings of the scenes without the concept in templates that the demo's other prompts do not use
    (one per template, colour and shape, so "a {colour} shape" once per shape): the prompts the
    preservation term keeps, none of them a measured prompt."""
    prompts_for(concept)  # a known concept
    return [t.format(colour=c, shape=s) for t in RETAIN_TEMPLATES for c in COLOURS for s in SHAPES
            if concept not in (c, s)]


def check_toy_model(base_model: str, flag: str = "--base_model") -> None:
    """The demo judges the toy world's colours and shapes, so its model must be a toy one: ``toy``, ``toy-dit``
    or a folder that esd toy-train or toy-train-dit made (their recipe.json). Any other model's images would be
    judged by the toy judge and reported as a result."""
    if base_model in TOY_MODELS:
        resolve_source(base_model)  # built, or says how to build it
        return
    folder = Path(resolve_source(base_model))  # a missing local folder: its own error
    recipe = folder / "recipe.json"
    try:
        record = json.loads(recipe.read_text()) if folder.is_dir() else None
        is_toy = isinstance(record, dict) and "recipe" in record
    except (OSError, ValueError):
        is_toy = False
    if not is_toy:
        raise ValueError(f"{flag} {base_model!r} is not a toy model; the demo judges the toy world's colours and "
                         f"shapes, so use one of: {', '.join(TOY_MODELS)}, or a folder made by esd toy-train or "
                         "esd toy-train-dit")


def check_count(flag: str, value) -> None:
    """A count (``--samples``, ``--iterations``...): an int >= 1, a bool not being one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive integer (>= 1), got {value!r}")


def check_demo(cfg: DemoConfig) -> None:
    """One line per bad setting, before any image is drawn."""
    prompts_for(cfg.concept)
    check_retain_weight(cfg.retain_weight)  # 0: off
    for flag in ("samples", "iterations", "batch_size"):
        check_count(f"--{flag}", getattr(cfg, flag))
    for flag in ("lr", "negative_guidance"):
        value = getattr(cfg, flag)
        if not (isinstance(value, (int, float)) and math.isfinite(value)) or (flag == "lr" and value <= 0):
            raise ValueError(f"--{flag} must be a finite number{' > 0' if flag == 'lr' else ''}, got {value!r}")
    check_toy_model(cfg.base_model)
    # A method of the toy model's family (xattn... for the UNet toy, mmdit-x... for toy-dit), naming the
    # valid ones; esd train would only find out after the demo has drawn its "before" images.
    check_method(cfg.train_method or esd_x_of(cfg.base_model), source_family(cfg.base_model))
    check_writable(Path(cfg.out), "--out")  # a real file made and removed: os.access says yes to root


def concept_presence(images, axis: str, concept: str) -> float:
    """Share of images judged to show ``concept`` on ``axis`` ("colour" or "shape")."""
    return sum(getattr(j, axis) == concept for j in judge_batch(images)) / len(images)


def accuracy(images, p: Phrasing) -> float:
    """Share of images judged right in what the phrasing names."""
    return sum((p.colour is None or j.colour == p.colour) and (p.shape is None or j.shape == p.shape)
               for j in judge_batch(images)) / len(images)


def _grid(rows: list[np.ndarray], columns: int = 8, scale: int = 3) -> Image.Image:
    """One row of images per prompt (the first ``columns`` seeds), upscaled (nearest) so 32 px shapes show."""
    tiles = [np.concatenate(list(imgs[:columns]), axis=1) for imgs in rows]
    grid = (np.concatenate(tiles, axis=0) * 255).round().astype(np.uint8)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def esd_x_of(base_model: str) -> str:
    """ESD-x for the model's family: cross-attention of a UNet, the text keys and values of an MMDiT."""
    family = source_family(base_model)
    return family.esd_x if family is not None else "xattn"


def run_demo(cfg: DemoConfig, log=print) -> dict:
    start = time.perf_counter()
    check_demo(cfg)
    cfg.train_method = cfg.train_method or esd_x_of(cfg.base_model)
    erased, others, axis = prompts_for(cfg.concept)
    out = Path(cfg.out)
    for name in ("report.json", "report.md", "retain_prompts.txt", "weights"):  # no link leads a write elsewhere
        check_inside(out / name, out, "--out")
    if ((out / "report.md").exists() or (out / "report.json").exists()) and not _demo_report(out / "report.json"):
        raise OutputError(f"--out {str(out)!r} holds a report.md or report.json that no earlier esd demo wrote; "
                          "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    retain = {}
    if cfg.retain_weight > 0:
        text = "\n".join(retain_phrasings(cfg.concept)) + "\n"
        atomic_write(out / "retain_prompts.txt", lambda p: Path(p).write_text(text))
        retain = {"retain_prompts": str(out / "retain_prompts.txt"), "retain_weight": cfg.retain_weight}
    before_pipe = load_toy_pipeline(cfg.base_model)

    def images(pipe, phrasings):
        return {p.text: sample(pipe, p.text, cfg.samples, cfg.seed) for p in phrasings}

    before = images(before_pipe, erased + others)
    log(f"generated {len(before) * cfg.samples} images before erasure")
    result = train_esd(ESDConfig(prompt=cfg.concept, train_method=cfg.train_method, base_model=cfg.base_model,
                                 iterations=cfg.iterations, batch_size=cfg.batch_size, lr=cfg.lr,
                                 negative_guidance=cfg.negative_guidance, ddim_steps=25, seed=cfg.seed,
                                 devices="cpu", save_path=str(out / "weights"), save_format="trained",
                                 overwrite=True, **retain))  # the demo's own folder: a rerun replaces its run
    unet = load_erased_unet(run_weight_files(result.output_dir)["trained"], base_model=cfg.base_model)
    after = images(load_toy_pipeline(cfg.base_model, unet=unet), erased + others)

    def presence(imgs):
        return concept_presence(imgs, axis, cfg.concept)

    report = {
        "concept": cfg.concept,
        "axis": axis,
        "erased": {p.text: {"held_out": p.held_out, "presence_before": presence(before[p.text]),
                            "presence_after": presence(after[p.text])} for p in erased},
        "others": {p.text: {"held_out": p.held_out, "accuracy_before": accuracy(before[p.text], p),
                            "accuracy_after": accuracy(after[p.text], p)} for p in others},
        "samples_per_prompt": cfg.samples,
        "seeds": f"image i of every prompt starts from seed {cfg.seed} + i, before and after",
        "settings": {k: v for k, v in vars(cfg).items() if k != "out"},
        "erasure": json.loads((result.output_dir / "args.json").read_text()),  # every resolved training setting
        "training_seconds": round(result.seconds, 1),
        "environment": environment_record(),
    }
    for name, phrasings in [("erased", erased), ("others", others)]:
        for when, imgs in [("before", before), ("after", after)]:
            grid = _grid([imgs[p.text] for p in phrasings])
            atomic_write(out / f"{name}_{when}.png", lambda p, g=grid: g.save(p, format="PNG"))
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(render_markdown(report)))
    log(summary(report))
    return report


def _demo_report(path: Path) -> bool:
    """Whether ``path`` is a report an earlier esd demo wrote (which a rerun may replace)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"erased", "others", "settings", "concept"} <= report.keys()


def render_markdown(report: dict) -> str:
    c, ax = report["concept"], report["axis"]
    lines = [f"# ESD demo: erasing \"{c}\" from the toy model ({report['settings']['base_model']})", "",
             f"ESD-x ({report['settings']['train_method']}) of the prompt \"{c}\", eta "
             f"{report['settings']['negative_guidance']}, {report['settings']['iterations']} iterations"
             + (f", retain weight {report['settings']['retain_weight']} (the other values' unmeasured phrasings, "
                "retain_prompts.txt)" if report["settings"].get("retain_weight") else "") + "; "
             f"{report['samples_per_prompt']} images per prompt before and after with the same seeds; "
             f"{report['seconds']} s in all ({report['training_seconds']} s of training).", "",
             f"## Erased prompts: share of images whose {ax} is judged \"{c}\"", "",
             "| prompt | held out | before | after |", "|---|---|---|---|"]
    lines += [f"| {p} | {'yes' if v['held_out'] else ''} | {v['presence_before']:.0%} | {v['presence_after']:.0%} |"
              for p, v in report["erased"].items()]
    lines += ["", "![before](erased_before.png) ![after](erased_after.png)", "",
              "## Other prompts: share judged right in colour and shape (collateral damage shows here)", "",
              "| prompt | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {p} | {v['accuracy_before']:.0%} | {v['accuracy_after']:.0%} | "
              f"{100 * (v['accuracy_after'] - v['accuracy_before']):+.0f} pts |" for p, v in report["others"].items()]
    lines += ["", "![before](others_before.png) ![after](others_after.png)", ""]
    return "\n".join(lines)


def summary(report: dict) -> str:
    e = report["erased"].values()
    o = report["others"].values()
    pb = np.mean([v["presence_before"] for v in e])
    pa = np.mean([v["presence_after"] for v in e])
    ab = np.mean([v["accuracy_before"] for v in o])
    aa = np.mean([v["accuracy_after"] for v in o])
    worst = min(v["accuracy_after"] - v["accuracy_before"] for v in o)
    highest = max(report["erased"].items(), key=lambda kv: kv[1]["presence_after"])
    return (f"erased \"{report['concept']}\": presence {pb:.0%} -> {pa:.0%} (highest after: {highest[0]!r} "
            f"{highest[1]['presence_after']:.0%}); other prompts' accuracy {ab:.0%} -> {aa:.0%} (worst prompt "
            f"{100 * worst:+.0f} pts); {report['seconds']} s")
