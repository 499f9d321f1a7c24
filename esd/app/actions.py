"""What each tab of ``esd app`` does, apart from the page: plain functions over the runs folder that raise a
ValueError (one line) on bad input, before any expensive work. The page (:mod:`esd.app.ui`) only lays them out.

* Train: a form becomes an :class:`esd.train.config.ESDConfig` (checked whole when queued), trained by
  :mod:`esd.app.jobs` into the runs folder as ``esd train --save_path RUNS`` would.
* Test: the base model's and the erased model's images of one prompt from the same seeds; on the toy worlds with
  the judge's verdict under each.
* Evaluate: the demo's measurement of a toy run (presence over the concept's phrasings, the other prompts'
  accuracy, before and after, each with its Wilson interval), its chart and table.
* Attack: ``esd attack`` (prefix or inversion) against the erasure.
* Export: ``esd export`` (LoRA, single file, diffusers folder), as a file to download.
"""

import copy
import csv
import io
import json
import re
import shutil
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import diffusers
import numpy as np
import torch

from esd.app.runs import RunsFolder, latest_checkpoint
from esd.attack.config import AttackConfig
from esd.attack.run import run_attack
from esd.core.methods import resolve_method
from esd.core.stats import Rate
from esd.families.models import load_models, load_pipeline
from esd.families.registry import denoiser_of, detect_family, methods_of
from esd.families.sources import TOY_MODELS, native_resolution_of, resolve_source, source_family
from esd.formats.erasure_source import Erasure
from esd.formats.exports import FORMATS, ExportSettings, formats_of, run_export
from esd.formats.lora import parse_rank
from esd.formats.prompt_csv import MAX_SEED
from esd.formats.records import atomic_write, environment_record
from esd.formats.weights import apply_erased_weights, load_erased_unet
from esd.generate.config import SCHEDULERS, Job
from esd.generate.images import draw
from esd.toy.demo import DemoConfig, check_toy_model, measured_rates
from esd.toy.demo_report import chart
from esd.toy.dit import merges_zero_tokens
from esd.toy.judge import judge_batch
from esd.toy.measure import BaseCache, measure
from esd.toy.quality import load_toy_pipeline
from esd.toy.world import prompts_for
from esd.train.config import ESDConfig
from esd.train.presets import DEFAULT_PRESET, PRESETS, preset_values

MAX_SEEDS = 16  # images per side in the Test tab
MAX_BATCH, MAX_STEPS = 64, 1000  # the form's bounds (iterations: esd app --max_iterations)
MAX_TRAIN_SEED = 2**32 - 1
CACHE = ".cache"  # in the runs folder: the base model's verdicts that Evaluate draws once (esd.toy.measure)
TOY_DEMO = DemoConfig()  # the toy's training settings are the demo's (the toy UNet is far from SD's scale)


# -- Train ------------------------------------------------------------------------------------------
def method_choices(base_model: str) -> list[tuple[str, str]]:
    """(label, name) of each train method of the model's family, the label saying what it is for."""
    family = source_family(base_model)
    names = methods_of(family) if family is not None else ["xattn", "noxattn", "full"]
    return [(f"{n}: {resolve_method(n).description}", n) for n in names]


def form_defaults(base_model: str, preset: str = DEFAULT_PRESET) -> dict:
    """The Train form's starting values for ``base_model``: the toy's are the demo's (ESD-x at lr 1e-3, batch 8,
    25 sampler steps; the toy UNet is far from SD's scale); a real model's are ``preset``'s on its family."""
    family = source_family(base_model)
    method = family.esd_x if family is not None else "xattn"
    values = preset_values(preset, family, method)
    if _is_toy(base_model):
        return {"train_method": method, "negative_guidance": TOY_DEMO.negative_guidance,
                "iterations": TOY_DEMO.iterations, "lr": TOY_DEMO.lr, "batch_size": TOY_DEMO.batch_size,
                "ddim_steps": 25, "start_guidance": values["start_guidance"]}
    return {"train_method": method, "batch_size": 1,
            **{k: values[k] for k in ("negative_guidance", "iterations", "lr", "ddim_steps", "start_guidance")}}


def _is_toy_folder(base_model: str) -> bool:
    try:
        check_toy_model(base_model)
        return True
    except (ValueError, OSError):
        return False


def _number(value, flag: str, kind=float):
    """A form number: None when left empty, else ``kind`` (an int must be whole)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag} must be a number, got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"--{flag} must be a whole number, got {value!r}")
        return int(number)
    return number


def train_config(runs: RunsFolder, *, concept: str, base_model: str = "toy", train_method: str = "", erase_from="",
                 negative_guidance=None, iterations=None, lr=None, preset: str = "fast", seed=None, lora_rank=None,
                 batch_size=None, ddim_steps=None, start_guidance=None, save_every=None,
                 name: str = "", ckpt_path: str = "", ckpt_config: str = "") -> ESDConfig:
    """The Train form as an ESDConfig saving into the runs folder; every setting checked (one line each)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of: {', '.join(PRESETS)}")
    base_model = runs.check_model(base_model)  # before any file or the hub is looked at
    single = {"ckpt_path": runs.check_model(ckpt_path, "single-file checkpoint") if (ckpt_path or "").strip()
              else None, "ckpt_config": runs.check_model(ckpt_config, "checkpoint's configs")
              if (ckpt_config or "").strip() else None}
    given = {"negative_guidance": _number(negative_guidance, "negative_guidance"),
             "iterations": _number(iterations, "iterations", int), "lr": _number(lr, "lr"),
             "batch_size": _number(batch_size, "batch_size", int), "ddim_steps": _number(ddim_steps, "ddim_steps", int)}
    # A field left empty takes the form's default; a preset field equal to the preset's value is left to the preset,
    # so that args.json's preset_overrides names only what the user changed.
    defaults = form_defaults(base_model, preset)
    train_method = train_method or defaults["train_method"]
    preset_own = preset_values(preset, source_family(base_model), train_method)
    given["start_guidance"] = _number(start_guidance, "start_guidance")
    values = {k: defaults[k] if v is None else v for k, v in given.items()}
    values = {k: None if k in preset_own and v == preset_own[k] else v for k, v in values.items()}
    values["batch_size"] = 1 if values["batch_size"] is None else values["batch_size"]
    for flag, high in (("iterations", runs.max_iterations), ("batch_size", MAX_BATCH), ("ddim_steps", MAX_STEPS)):
        if values[flag] is not None and not 1 <= values[flag] <= high:  # one stranger cannot hold a device for days
            raise ValueError(f"--{flag} must be a whole number from 1 to {high}, got {values[flag]}")
    rank = _number(lora_rank, "lora_rank", int)
    if rank is not None and rank < 1:
        raise ValueError(f"--lora_rank must be a whole number >= 1 (empty: full fine-tuning), got {rank}")
    seed = _seed(seed)
    extra = {"save_every": _number(save_every, "save_every", int) or 0}
    return ESDConfig(**extra, **single, prompt=(concept or "").strip(), train_method=train_method,
                     base_model=base_model, erase_from=(erase_from or "").strip() or None, preset=preset,
                     seed=seed, lora_rank=rank, name=(name or "").strip() or None,
                     save_path=str(runs.root), save_format="both", **values)


def _seed(value) -> int | None:
    """A training seed from the form: empty (drawn), else a whole number from 0 to 2**32 - 1, read exactly."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    if not text.isdigit() or int(text) > MAX_TRAIN_SEED:
        raise ValueError(f"--seed must be a whole number from 0 to {MAX_TRAIN_SEED} (empty: drawn), got {value!r}")
    return int(text)


def resume_config(runs: RunsFolder, run: str) -> ESDConfig:
    """A resumable run (a cancelled training's checkpoint) as the settings that continue it."""
    folder = runs.path_of(run)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise ValueError(f"run {run!r} has no checkpoint to resume from")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)  # its settings, not its tensors
    recorded = state.get("config") if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"{checkpoint} is not an ESD checkpoint")
    settings = {f.name: recorded[f.name] for f in fields(ESDConfig) if f.init and f.name in recorded}
    return ESDConfig(**{**settings, "resume": str(checkpoint), "save_path": str(runs.root), "name": folder.name,
                        "overwrite": False, "devices": None})


# -- the models: loaded once, kept for the next click ---------------------------------------------------
@dataclass
class Loaded:
    key: tuple
    pipe: object


class Pipelines:
    """The last base pipeline and the last erased one, kept between clicks (a real model takes long to load); one
    caller at a time."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self._base: Loaded | None = None
        self._erased: Loaded | None = None

    def base(self, base_model: str | None, ckpt_path: str | None = None, ckpt_config: str | None = None):
        """The base pipeline: the toy's, a folder's or hub id's, or one assembled from a single-file checkpoint."""
        key = (base_model, ckpt_path, ckpt_config)
        if self._base is None or self._base.key != key:
            self._base = None
            if ckpt_path is not None:
                models = load_models(base_model or "", ckpt_path, ckpt_config, load_vae=True)
                pipe = models.family.assemble_pipeline(models, models.unet)
                if pipe is None:
                    raise ValueError(f"{ckpt_path!r} is {models.family.phrase} in one file, which the app cannot draw "
                                     "from; give its diffusers folder as the base model")
                pipe.native_size = models.native_resolution
            else:
                pipe = load_toy_pipeline(base_model) if _is_toy(base_model) else load_pipeline(base_model)
            pipe.set_progress_bar_config(disable=True)
            self._base = Loaded(key, pipe.to(self.device))
        return self._base.pipe

    def erased(self, erasure: Erasure):
        weights = Path(erasure.weights)
        key = (erasure.base_model, erasure.ckpt_path, str(weights), weights.stat().st_mtime_ns)
        if self._erased is None or self._erased.key != key:
            self._erased = None
            if erasure.ckpt_path is None and _is_toy(erasure.base_model):
                unet = load_erased_unet(weights, base_model=erasure.base_model)
                pipe = load_toy_pipeline(erasure.base_model, unet=unet)
            else:
                base = self.base(erasure.base_model, erasure.ckpt_path, erasure.ckpt_config)
                denoiser = copy.deepcopy(denoiser_of(base))
                text_encoder = copy.deepcopy(getattr(base, "text_encoder", None))
                apply_erased_weights(denoiser, weights, base_model=erasure.base, text_encoder=text_encoder)
                slot = "transformer" if getattr(base, "transformer", None) is not None else "unet"
                parts = {**base.components, slot: denoiser}
                if text_encoder is not None:
                    parts["text_encoder"] = text_encoder
                pipe = type(base)(**parts)
                pipe.native_size = getattr(base, "native_size", None)
            pipe.set_progress_bar_config(disable=True)
            self._erased = Loaded(key, pipe.to(self.device))
        return self._erased.pipe


def _is_toy(base_model: str) -> bool:
    return base_model in TOY_MODELS or _is_toy_folder(base_model)


def _erasure(runs: RunsFolder, name: str, upload_base: str = "") -> Erasure:
    return runs.erasure(name, (upload_base or "").strip() or None)


def _toy_erasure(erasure: Erasure) -> bool:
    """Drawn and judged as the toy instrument does: a toy model's erasure (not one of a single-file checkpoint)."""
    return erasure.ckpt_path is None and _is_toy(erasure.base_model)


# -- Test -------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """"0, 1, 2", "0-3" or a mix; at most MAX_SEEDS."""
    seeds = []
    for part in re.split(r"[,\s]+", (text or "").strip()):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"seeds {text!r}: {part!r} is not a seed or a range such as 0-3; give whole numbers >= 0")
        low, high = int(match[1]), int(match[2] or match[1])
        if high >= MAX_SEED:
            raise ValueError(f"seeds {text!r}: {high} is too large; seeds are below 2**53")
        if high < low:
            raise ValueError(f"seeds {text!r}: the range {part!r} runs backwards")
        seeds += range(low, min(high, low + MAX_SEEDS) + 1)
    if not seeds:
        raise ValueError("no seeds given; e.g. 0-3 or 0, 7, 42")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{len(seeds)} seeds given; at most {MAX_SEEDS} per side")
    return seeds


def _check_count(value, flag: str, low: int = 1, high: int = 1000) -> int:
    number = _number(value, flag, int)
    if number is None or not low <= number <= high:
        raise ValueError(f"--{flag} must be a whole number from {low} to {high}, got {value!r}")
    return number


def _check_guidance(value) -> float:
    number = _number(value, "guidance_scale")
    if number is None or not 0 <= number <= 50:
        raise ValueError(f"--guidance_scale must be a number from 0 to 50, got {value!r}")
    return number


@torch.no_grad()
def _draw(pipe, toy: bool, base_model: str | None, prompt: str, seeds: list[int], steps: int, guidance: float,
          negative_prompt: str | None = None) -> list[np.ndarray]:
    """One image per seed, the same noise for the base and the erased model: on the toys as the instrument's
    sampler (:func:`esd.toy.quality.sample`) draws, elsewhere as ``esd generate`` does (its scheduler for the
    family, latents from the seed)."""
    if toy:  # as esd.toy.quality.sample draws, each image from its own seed, in one batch
        extra = {"max_sequence_length": 1} if merges_zero_tokens(pipe) else {}
        if negative_prompt:
            extra["negative_prompt"] = [negative_prompt] * len(seeds)
        return list(pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                         generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images)
    denoiser = denoiser_of(pipe)
    family = detect_family(denoiser)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[family.generation_scheduler]).from_config(pipe.scheduler.config)
    size = getattr(pipe, "native_size", None) or native_resolution_of(base_model)  # a single file's: its own
    channels = denoiser.config.in_channels // family.packed_channels
    shape = (channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    images = []
    for s in seeds:
        job = Job("test", 0, prompt, s)
        drawn = draw(pipe, [job], 1, shape, steps=steps, guidance=guidance, device=pipe.device, dtype=pipe.dtype,
                     size=size, packed=family.packed_channels > 1, output_type="np",
                     **({"negative_prompt": [negative_prompt]} if negative_prompt else {}))
        images.extend(np.asarray(im) for im in drawn)
    return [np.asarray(im) for im in images]


def side_by_side(runs: RunsFolder, pipelines: Pipelines, erasure_name: str, prompt: str, seeds: str = "0-3",
                 steps=25, guidance=7.5, upload_base: str = "", negative_prompt: str = "") -> dict:
    """The base and the erased model's images of ``prompt`` from the same seeds; on the toys, the judge's verdict
    (colour, shape) for each. Returns {"base": [(image, caption)], "erased": [...], "line": a one-line account}."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty; type what to draw, e.g. the erased concept")
    seed_list = parse_seeds(seeds)
    steps, guidance = _check_count(steps, "steps", 1, 200), _check_guidance(guidance)
    erasure = _erasure(runs, erasure_name, upload_base)
    toy = _toy_erasure(erasure)
    with pipelines.lock:
        negative = (negative_prompt or "").strip() or None
        base_pipe = pipelines.base(erasure.base_model, erasure.ckpt_path, erasure.ckpt_config)
        base = _draw(base_pipe, toy, erasure.base_model, prompt, seed_list, steps, guidance, negative)
        erased = _draw(pipelines.erased(erasure), toy, erasure.base_model, prompt, seed_list, steps, guidance,
                       negative)

    def captions(images):
        verdicts = [f"{j.colour} {j.shape}" for j in judge_batch(images)] if toy else [""] * len(images)
        return [(np.clip(im, 0, 1), f"seed {s}" + (f": {v}" if v else "")) for im, s, v in zip(images, seed_list,
                                                                                               verdicts)]

    line = (f"{prompt!r}" + (f" (negative: {negative!r})" if negative else "") + f" on {erasure.base}, seeds "
            f"{', '.join(map(str, seed_list))}, {steps} steps, guidance {guidance:g}; erased: {erasure_name} "
            f"({erasure.train_method or 'method unknown'}, concept "
            f"{erasure.concept!r})" + ("; under each image the toy judge's verdict (colour shape)" if toy else ""))
    return {"base": captions(base), "erased": captions(erased), "line": line}


# -- Evaluate ---------------------------------------------------------------------------------------
def _next_folder(runs: RunsFolder, erasure_name: str, kind: str) -> Path:
    """A new ``<kind>-<n>`` output folder of the erasure: an earlier result is never replaced."""
    n = 1
    while (folder := runs.output_dir(erasure_name, f"{kind}-{n}")).exists():
        n += 1
    return folder


def evaluate(runs: RunsFolder, pipelines: Pipelines, erasure_name: str, samples=25, seed=0,
             upload_base: str = "") -> dict:
    """The demo's measurement of a toy erasure: presence of its concept over every phrasing that names it, and the
    other prompts' accuracy, before and after, with the same seeds (image i from seed + i). The base model's
    verdicts are kept in ``<runs>/.cache`` (the demo's cache, esd.toy.measure.BaseCache), drawn once. Writes
    report.json and report.png in ``<run>/app/evaluate-<n>``."""
    samples, seed = _check_count(samples, "samples", 1, 500), _check_count(seed, "seed", 0, 2**31 - 1)
    erasure = _erasure(runs, erasure_name, upload_base)
    if not _toy_erasure(erasure):
        raise ValueError(f"Evaluate measures the toy worlds' erasures with their judge; {erasure.base_model!r} is "
                         "not a toy model (for a real model: esd generate, then esd evaluate)")
    erased, others, axis = prompts_for(erasure.concept)
    phrasings = erased + others
    out = _next_folder(runs, erasure_name, "evaluate")
    with pipelines.lock:
        cache = BaseCache(str(runs.root / CACHE), erasure.base_model)  # inside the runs folder, as all it writes
        base = pipelines.base(erasure.base_model)
        before = {p.text: cache.get(base, p.text, samples, seed) for p in phrasings}
        pipe = pipelines.erased(erasure)
        after = {p.text: measure(pipe, p.text, samples, seed) for p in phrasings}
    report = {"concept": erasure.concept, "axis": axis, **measured_rates(erasure.concept, before, [after]),
              "training_seeds": [erasure.record.get("seed", "?")], "samples_per_prompt": samples,
              "seeds": f"image i of every prompt starts from seed {seed} + i, before and after",
              "erasure": erasure_name, "weights": str(erasure.weights), "base_model": erasure.base_model,
              "base_images": f"{cache.hits} of {len(phrasings)} prompts read from the cache" if cache.folder else
              "drawn (no cache)", "environment": environment_record()}
    out.mkdir(parents=True)
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    atomic_write(out / "report.png", lambda p: chart(report, p))
    rows = [[p, "erased", "yes" if v["held_out"] else "", str(_rate(v["before"])), str(_rate(v["after_by_seed"][0]))]
            for p, v in report["erased"].items()]
    rows += [[p, "other", "yes" if v["held_out"] else "", str(_rate(v["before"])), str(_rate(v["after_by_seed"][0]))]
             for p, v in report["others"].items()]
    s = report["summary"]
    line = (f"{erasure.concept!r}: presence {_rate(s['presence_before'])} -> {_rate(s['presence_after'][0])}; other "
            f"prompts' accuracy {_rate(s['accuracy_before'])} -> {_rate(s['accuracy_after'][0])} (Wilson 95% over "
            f"{samples} images per prompt, one erasure; {out.relative_to(runs.root)})")
    return {"rows": rows, "chart": str(out / "report.png"), "line": line, "report": report}


def _rate(record: dict) -> Rate:
    return Rate(record["k"], record["n"])


# -- Attack -----------------------------------------------------------------------------------------
def attack(runs: RunsFolder, pipelines: "Pipelines", erasure_name: str, kind: str = "prefix", prompt: str = "",
           seeds: str = "0-1", samples=2, steps=None, upload_base: str = "", judge: str = "", log=print) -> dict:
    """``esd attack`` against the erasure, its prompts the typed one with each seed, into
    ``<run>/app/attack-<kind>-<n>``; returns the recovered rates and the grid."""
    if kind not in ("prefix", "inversion"):
        raise ValueError(f"attack {kind!r} is not one of: prefix, inversion")
    seed_list = parse_seeds(seeds)
    erasure = _erasure(runs, erasure_name, upload_base)
    if erasure.ckpt_path is not None:
        raise ValueError(f"{erasure_name!r} was trained from the single file {erasure.ckpt_path}; esd attack loads a "
                         "diffusers folder, hub id or toy model as the base (train from the folder to attack it)")
    prompt = (prompt or "").strip() or erasure.concept
    out = _next_folder(runs, erasure_name, f"attack-{kind}")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["case_number", "prompt", "evaluation_seed"])
    writer.writerows([i, prompt, s] for i, s in enumerate(seed_list))
    judge = judge or ("toy" if _is_toy(erasure.base_model) else None)  # a real model's: nudenet or classify
    cfg = AttackConfig(weights=str(erasure.weights), prompts=str(out / "prompts.csv"), attack=kind,
                       concept=erasure.concept, out=str(out), base_model=erasure.base_model, judge=judge,
                       steps=_number(steps, "steps", int), samples=_check_count(samples, "samples", 1, 16),
                       device=str(pipelines.device))  # every setting checked before the folder is made
    out.mkdir(parents=True)
    atomic_write(out / "prompts.csv", lambda p: Path(p).write_text(table.getvalue()))
    with pipelines.lock:  # one model at a time on the device, as Test and Evaluate
        summary = run_attack(cfg, log=log)
    shown = {stage: _rate(r) for stage, r in summary["intervals"]["presence"].items()}
    line = (f"{erasure.concept!r} judged present (Wilson 95% over {summary['images_per_stage']} images): base model "
            f"{shown['reference']}; erased, literal prompt {shown['before']}; erased under the {kind} attack "
            f"{shown['after']} ({out.relative_to(runs.root)})")
    return {"line": line, "grid": str(out / "grid.png"), "summary": summary}


# -- Export -----------------------------------------------------------------------------------------
def export(runs: RunsFolder, erasure_name: str, fmt: str = "lora", rank: str = "auto", upload_base: str = "",
           log=print) -> dict:
    """``esd export`` of the erasure into ``<run>/app/export-<n>/``: a LoRA or single-file .safetensors, or a
    diffusers folder (zipped beside it for the download). Returns the file and the run's model card."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of: {', '.join(FORMATS)}")
    rank_value = parse_rank(str(rank or "auto").strip()) if fmt == "lora" else "auto"
    erasure = _erasure(runs, erasure_name, upload_base)
    family = erasure.family
    if family is not None and fmt not in formats_of(family):
        raise ValueError(f"{erasure.base_model!r} is {family.phrase}: its exports are {', '.join(formats_of(family))}")
    folder = _next_folder(runs, erasure_name, "export")
    target = folder / (f"{fmt}.safetensors" if fmt != "diffusers" else "diffusers")
    source = runs.path_of(erasure_name, "erasure")
    run_export(str(source), ExportSettings(format=fmt, out=target, rank=rank_value),  # a run: its own base; an
               base_model=None if source.is_dir() else erasure.base_model, log=log)  # upload: the checked one
    download = target
    if fmt == "diffusers":
        download = Path(shutil.make_archive(str(folder / "diffusers"), "zip", root_dir=target))
    card = source / "README.md" if source.is_dir() else None
    return {"file": str(download), "card": card.read_text() if card is not None and card.is_file() else
            "(an uploaded weights file has no model card)",
            "line": f"{fmt} export of {erasure_name}: {download.relative_to(runs.root)} "
                    f"({download.stat().st_size / 2**20:.1f} MB)"}


def run_rows(runs: RunsFolder) -> list[list]:
    """The runs table: every run in the runs folder, the command line's too."""
    return [[r.name, r.status, r.concept, r.train_method, r.base_model, r.iterations or ""] for r in runs.runs()]


def resolved_base(runs: RunsFolder, base_model: str) -> str:
    """A base model the form names: one the app offers (checked first), then readable (a missing folder, a model
    the app cannot read: one line)."""
    base_model = runs.check_model(base_model)
    resolve_source(base_model)
    return base_model
