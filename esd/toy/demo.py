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

from esd.core.stats import RATE, Rate, SeedMean, pooled
from esd.families.registry import check_method
from esd.families.sources import TOY_MODELS, resolve_source, source_family
from esd.formats.records import OutputError, atomic_write, check_inside, check_writable, environment_record
from esd.formats.weights import load_erased_unet, run_weight_files
from esd.toy.demo_report import chart, labelled_grid, render_markdown, summary
from esd.toy.judge import judge_batch
from esd.toy.measure import BaseCache, default_cache_dir, measure, right, shows
from esd.toy.quality import load_toy_pipeline
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
    seed: int = 0  # the first training seed, and image i of every prompt starts from seed + i
    seeds: int = 1  # erasures trained, with seeds seed, seed + 1, ...: the report gives each and their mean
    retain_weight: float = 0.0  # > 0: keep retain_phrasings() as theta* draws them (esd train --retain_prompts)
    cache: str = "auto"  # the base model's verdicts: auto ($ESD_CACHE, else ~/.cache/esd), none, or a folder


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
    for flag in ("samples", "iterations", "batch_size", "seeds"):
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
    if cfg.cache != "auto" and (folder := cache_folder(cfg.cache)):  # a folder the user named; auto falls back
        check_writable(Path(folder) / "toy-base", "--cache")  # to none (usable_cache)


def concept_presence(images, axis: str, concept: str) -> float:
    """Share of images judged to show ``concept`` on ``axis`` ("colour" or "shape")."""
    return sum(shows(j.colour, j.shape, axis, concept) for j in judge_batch(images)) / len(images)


def accuracy(images, p: Phrasing) -> float:
    """Share of images judged right in what the phrasing names."""
    return sum(right(j.colour, j.shape, p) for j in judge_batch(images)) / len(images)


def esd_x_of(base_model: str) -> str:
    """ESD-x for the model's family: cross-attention of a UNet, the text keys and values of an MMDiT."""
    family = source_family(base_model)
    return family.esd_x if family is not None else "xattn"


def training_seeds(cfg: DemoConfig) -> list[int]:
    """Erasure j trains with seed ``cfg.seed + j``; every image of every erasure starts from the same seeds."""
    return [cfg.seed + j for j in range(cfg.seeds)]


def run_demo(cfg: DemoConfig, log=print) -> dict:
    start = time.perf_counter()
    check_demo(cfg)
    cfg.train_method = cfg.train_method or esd_x_of(cfg.base_model)
    erased, others, axis = prompts_for(cfg.concept)
    phrasings = erased + others
    out = Path(cfg.out)
    for name in ("report.json", "report.md", "report.png", "retain_prompts.txt", "weights"):  # no link leads
        check_inside(out / name, out, "--out")  # a write elsewhere
    if ((out / "report.md").exists() or (out / "report.json").exists()) and not _demo_report(out / "report.json"):
        raise OutputError(f"--out {str(out)!r} holds a report.md or report.json that no earlier esd demo wrote; "
                          "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    retain = {}
    if cfg.retain_weight > 0:
        text = "\n".join(retain_phrasings(cfg.concept)) + "\n"
        atomic_write(out / "retain_prompts.txt", lambda p: Path(p).write_text(text))
        retain = {"retain_prompts": str(out / "retain_prompts.txt"), "retain_weight": cfg.retain_weight}
    cache = BaseCache(usable_cache(cfg, log), cfg.base_model)
    base_pipe = load_toy_pipeline(cfg.base_model)
    before = {p.text: cache.get(base_pipe, p.text, cfg.samples, cfg.seed) for p in phrasings}
    log(f"{len(before) * cfg.samples} images before erasure: {cache.hits} prompts from the cache, {cache.misses} drawn")
    afters, erasures, seconds = [], [], 0.0
    for train_seed in training_seeds(cfg):
        result = train_esd(ESDConfig(prompt=cfg.concept, train_method=cfg.train_method, base_model=cfg.base_model,
                                     iterations=cfg.iterations, batch_size=cfg.batch_size, lr=cfg.lr,
                                     negative_guidance=cfg.negative_guidance, ddim_steps=25, seed=train_seed,
                                     devices="cpu", save_path=str(out / "weights"), name=f"seed_{train_seed}",
                                     save_format="trained", overwrite=True, **retain))  # a rerun replaces its run
        seconds += result.seconds
        unet = load_erased_unet(run_weight_files(result.output_dir)["trained"], base_model=cfg.base_model)
        pipe = load_toy_pipeline(cfg.base_model, unet=unet)
        afters.append({p.text: measure(pipe, p.text, cfg.samples, cfg.seed) for p in phrasings})
        erasures.append(json.loads((result.output_dir / "args.json").read_text()))  # every resolved setting

    report = {
        "concept": cfg.concept,
        "axis": axis,
        **measured_rates(cfg.concept, before, afters),
        "samples_per_prompt": cfg.samples,
        "training_seeds": training_seeds(cfg),
        "seeds": f"image i of every prompt starts from seed {cfg.seed} + i, before and after; erasure j trains "
                 f"with seed {cfg.seed} + j",
        "base_images": f"{cache.hits} of {len(phrasings)} prompts read from the cache ({cache.folder}), "
                       f"{cache.misses} drawn" if cache.folder else "drawn (no cache)",
        "settings": {k: v for k, v in vars(cfg).items() if k != "out"},
        "erasure": erasures[0],
        "erasures": erasures,
        "training_seconds": round(seconds, 1),
        "environment": environment_record(),
    }
    for name, group in [("erased", erased), ("others", others)]:
        for when, measured in [("before", before), ("after", afters[0])]:
            grid = labelled_grid([(p.text, list(measured[p.text].grid),
                                   list(zip(measured[p.text].colours, measured[p.text].shapes))) for p in group])
            atomic_write(out / f"{name}_{when}.png", lambda p, g=grid: g.save(p, format="PNG"))
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write(out / "report.png", lambda p: chart(report, p))
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(render_markdown(report)))
    log(summary(report))
    return report


def measured_rates(concept: str, before: dict, afters: list[dict]) -> dict:
    """A report's ``erased`` (presence of ``concept`` on each phrasing naming it), ``others`` (accuracy on the other
    prompts) and ``summary`` (pooled over prompts), from the base model's measurements (prompt -> Measured) and each
    erasure's: before, each seed's after with its Wilson interval, and the mean over seeds."""
    erased, others, axis = prompts_for(concept)
    presence = {p.text: [m[p.text].rate(p, axis, concept) for m in [before, *afters]] for p in erased}
    correct = {p.text: [m[p.text].rate(p) for m in [before, *afters]] for p in others}
    return {
        "erased": {p.text: {"held_out": p.held_out, "presence_before": presence[p.text][0].p,
                            "presence_after": SeedMean(tuple(r.p for r in presence[p.text][1:])).mean,
                            "before": presence[p.text][0].record(),
                            "after_by_seed": [r.record() for r in presence[p.text][1:]]} for p in erased},
        "others": {p.text: {"held_out": p.held_out, "accuracy_before": correct[p.text][0].p,
                            "accuracy_after": SeedMean(tuple(r.p for r in correct[p.text][1:])).mean,
                            "before": correct[p.text][0].record(),
                            "after_by_seed": [r.record() for r in correct[p.text][1:]]} for p in others},
        "summary": {**_pooled_summary("presence", presence), **_pooled_summary("accuracy", correct)},
    }


def _pooled_summary(key: str, rates: dict[str, list[Rate]]) -> dict:
    """Over every image of the group's prompts: before, each seed's after (Wilson), and the mean of the seeds'
    pooled rates (t over seeds)."""
    by_stage = list(zip(*rates.values()))  # stage -> that stage's rate of every prompt
    after = [pooled(stage) for stage in by_stage[1:]]
    return {f"{key}_before": pooled(by_stage[0]).record(), f"{key}_after": [r.record() for r in after],
            f"{key}_after_mean": SeedMean(tuple(r.p for r in after), RATE).record()}


def cache_folder(setting: str) -> str:
    """--cache: "auto" (esd.toy.measure.default_cache_dir), "none" (no cache), or a folder."""
    return {"auto": default_cache_dir(), "none": ""}.get(setting, setting)


def usable_cache(cfg: DemoConfig, log) -> str:
    """The cache folder to use: --cache auto where nothing can be written (a read-only home) is no cache, said
    in the log; a folder the user named was checked by check_demo."""
    folder = cache_folder(cfg.cache)
    if cfg.cache == "auto" and folder:
        try:
            check_writable(Path(folder) / "toy-base", "--cache")
        except (OutputError, OSError) as e:
            log(f"no cache of the base model's verdicts: {e}")
            return ""
    return folder


def _demo_report(path: Path) -> bool:
    """Whether ``path`` is a report an earlier esd demo wrote (which a rerun may replace)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"erased", "others", "settings", "concept"} <= report.keys()


