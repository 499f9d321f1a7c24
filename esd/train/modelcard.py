"""The model card beside every erasure: a README.md in the Hugging Face layout (YAML header, then what
was erased, how, with which command, how to load the weights, and any evaluations found beside it),
written from the run's args.json so that it never says more than the record does."""

import json
import os
import re
import shlex
from dataclasses import MISSING, fields
from pathlib import Path

from esd.core.methods import resolve_method
from esd.families.registry import family_named
from esd.formats.exports import train_export_path
from esd.formats.records import atomic_write, read_json
from esd.formats.summary import METRICS, metric_class
from esd.formats.weights import run_weight_files
from esd.train.config import ESDConfig
from esd.train.presets import PRESET_FIELDS

CARD = "README.md"
TAGS = ("esd", "concept-erasure", "stable-diffusion", "text-to-image")
# Settings that say where and how a run was written or continued, not what it computed.
NOT_IN_COMMAND = {"overwrite", "resume", "preset_overrides"}


def run_weights(run_dir: Path) -> list[Path]:
    """The weights files ``esd train`` wrote in ``run_dir`` (see :mod:`esd.formats.weights`)."""
    return [p for p in run_weight_files(run_dir).values() if p.is_file()]


def train_command(record: dict) -> str:
    """The ``esd train`` command with the settings of ``record`` (an args.json): the concept, method,
    base model, preset and seed always; a preset's field when it was given explicitly; any other
    setting that differs from its default."""
    defaults = {f.name: f.default for f in fields(ESDConfig) if f.default is not MISSING}
    overridden = set(record.get("preset_overrides", ()))
    always = ("prompt", "train_method", "base_model", "preset", "seed")
    words = ["esd", "train"]
    for f in fields(ESDConfig):
        name = f.name
        if name not in record or name in NOT_IN_COMMAND:
            continue
        value = record[name]
        wanted = name in always or (name in overridden if name in PRESET_FIELDS else value != defaults.get(name))
        if not wanted or value is None:
            continue
        if isinstance(value, bool):
            words.append(f"--{name}" if value else f"--no-{name}")
        elif name == "export":  # esd train --export FORMAT,FORMAT
            words += [f"--{name}", ",".join(value)] if value else []
        elif name == "export_options":  # esd train --export_<option> VALUE
            words += [w for k, v in value.items() for w in (f"--export_{k}", shlex.quote(str(v)))]
        else:
            words += [f"--{name}", shlex.quote(str(value))]
    return " ".join(words)


def _base_pipeline_lines(record: dict) -> list[str]:
    """Python lines that load the base model as ``pipe``."""
    family = family_named(record.get("family"))
    if record.get("ckpt_path") and family.flow:  # the transformer file, the rest from ckpt_config
        cls = family.denoiser_class.__name__
        config = record.get("ckpt_config")
        return [f"from diffusers import DiffusionPipeline, {cls}", "",
                f"transformer = {cls}.from_single_file({record['ckpt_path']!r}, config={config!r}, "
                "subfolder='transformer')",
                f"pipe = DiffusionPipeline.from_pretrained({config!r}, transformer=transformer)"]
    if record.get("ckpt_path"):
        cls = family.pipeline_classes[0]
        return [f"from diffusers import {cls}", "", f"pipe = {cls}.from_single_file({record['ckpt_path']!r})"]
    base = record.get("base_model", "")
    source = "resolve_source('toy')" if base == "toy" else repr(base)
    lines = ["from diffusers import DiffusionPipeline"]
    if base == "toy":
        lines.append("from esd.families.sources import resolve_source  # the toy model ships with esd")
    return lines + ["", f"pipe = DiffusionPipeline.from_pretrained({source})"]


def loading_section(record: dict, weights: list[Path], run_dir: Path) -> list[str]:
    """How to load each weights file into a diffusers pipeline (paths relative to the card's folder)."""
    if not weights:
        return ["No weights file was saved with this run."]
    lines = []
    family = family_named(record.get("family"))
    denoiser = family.subfolder  # the pipeline's unet or transformer
    for w in weights:
        path = os.path.relpath(w, run_dir)
        if w == run_weight_files(run_dir)["lora"]:
            layout = "kohya layout that AUTOMATIC1111 and ComfyUI also load" if family.kohya is not None \
                else "diffusers' transformer layout (alpha folded into lora_B)"
            what = (f"the trained LoRA, rank {record.get('lora_rank')}, alpha {record.get('lora_alpha')}, in the "
                    f"{layout}; the files above hold the same erasure merged into the weights")
            load = [*_base_pipeline_lines(record), f"pipe.load_lora_weights({path!r})  # needs peft",
                    "pipe.fuse_lora()  # optional: merge it into the weights"]
        elif w.suffix == ".safetensors" and record.get("train_text_encoder"):
            what = ("the trained tensors only, the text encoder's under 'text_encoder.' (--train_text_encoder); "
                    "the others stay the base model's")
            load = ["from safetensors.torch import load_file", *_base_pipeline_lines(record),
                    f"state = load_file({path!r})",
                    "encoder = {k.removeprefix('text_encoder.'): v for k, v in state.items() "
                    "if k.startswith('text_encoder.')}",
                    "unet = {k: v for k, v in state.items() if not k.startswith('text_encoder.')}",
                    "assert not pipe.unet.load_state_dict(unet, strict=False).unexpected_keys",
                    "assert not pipe.text_encoder.load_state_dict(encoder, strict=False).unexpected_keys"]
        elif w.suffix == ".safetensors":
            what = "the trained tensors only; the others stay the base model's"
            load = ["from safetensors.torch import load_file", *_base_pipeline_lines(record),
                    f"result = pipe.{denoiser}.load_state_dict(load_file({path!r}), strict=False)",
                    "assert not result.unexpected_keys  # missing: the untrained tensors, kept from the base model"]
        else:
            what = f"the whole {family.denoiser_word} state dict, the published ESD " \
                "weights' format"
            load = ["import torch", *_base_pipeline_lines(record),
                    f"pipe.{denoiser}.load_state_dict(torch.load({path!r}, weights_only=True))"]
        lines += [f"`{path}` ({what}), in diffusers:", "", "```python", *load, "```", ""]
    exports = [f"`{os.path.relpath(train_export_path(run_dir, f), run_dir)}` (`esd export --format {f}`)"
               for f in record.get("export") or ()]
    if exports:
        lines += ["Written by `esd train --export` at the end of training: " + ", ".join(exports) + ".", ""]
    if record.get("train_text_encoder"):
        return lines + [
            "With esd installed, `esd.apply_erased_weights(pipe.unet, path, text_encoder=pipe.text_encoder)` loads "
            "it strictly, and `esd generate --esd_path PATH` makes images from it. `esd export` does not take it: "
            "its formats hold the UNet alone and would drop the text encoder's erasure."]
    return lines + [
        f"With esd installed, `esd.apply_erased_weights(pipe.{denoiser}, path)` loads either format strictly, and "
        "`esd generate --esd_path PATH` makes images from it. For AUTOMATIC1111 and ComfyUI, "
        "`esd export RUN_DIR --format lora|single-file|diffusers --out PATH` (RUN_DIR: this folder) converts the "
        "weights to a LoRA, a single-file checkpoint or a diffusers folder."]


def lora_rows(record: dict) -> list[tuple[str, str]]:
    """The settings table's row about a LoRA-trained run (none for full fine-tuning)."""
    if not record.get("lora_rank"):
        return []
    excluded = record.get("lora_excluded") or []
    kept = (f"; the {len(excluded)} biases/norm parameters the method selects stay the base model's (a LoRA cannot "
            "hold them)") if excluded else ""
    return [("trained as", f"a LoRA (peft): rank {record['lora_rank']}, alpha {record.get('lora_alpha')}, on "
                           f"{record.get('lora_layers')} Linear/Conv2d layers{kept}")]


def _cell(value) -> str:
    """``value`` as one Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def evaluation_rows(run_dir: Path) -> list[str]:
    """One table row per ``summary.json`` of ``esd evaluate`` found under ``run_dir``: its folder, the
    metric and the headline numbers of ``esd report``."""
    paths = sorted(run_dir.rglob("summary.json"))
    rows = []
    for path in paths:
        folder = path.parent.relative_to(run_dir).as_posix()
        try:
            summary = read_json(path)
            metric = summary["metric"]
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}")
            cls = metric_class(metric)  # the columns of esd report's table
            result = ", ".join(f"{c}: {v}" for c, v in zip(cls.columns, cls.cells(summary)) if v)
        except (ValueError, KeyError, TypeError) as e:  # one unreadable summary does not stop the card
            metric, result = "?", f"unreadable summary.json ({type(e).__name__})"
        rows.append(f"| {_cell(folder)} | {_cell(metric)} | {_cell(result)} |")
    return rows


def write_model_card(run_dir: str | os.PathLike, weights: list[Path] | None = None) -> Path:
    """Write ``run_dir``/README.md from its args.json; ``weights`` are the files to document (default:
    those ``esd train`` wrote in ``run_dir``). Called again (e.g. after ``esd evaluate``), it rewrites
    the card with the evaluation summaries found under ``run_dir`` since."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "args.json")
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{str(run_dir / 'args.json')!r} is not the record of an ESD run")
    weights = run_weights(run_dir) if weights is None else [Path(w) for w in weights]
    base = record.get("ckpt_path") or record.get("base_model", "")
    method = resolve_method(record["train_method"])
    eta = record["negative_guidance"]
    concept = record["prompt"]
    env = record.get("environment", {})
    header = ["---", f"base_model: {json.dumps(base)}", "library_name: diffusers", "pipeline_tag: text-to-image",
              "# ESD fine-tunes the base model, so the base model's license applies to these weights: set it here",
              "# (creativeml-openrail-m for CompVis/stable-diffusion-v1-4).",
              "license: other", "tags:", *[f"- {t}" for t in TAGS], "---", ""]
    sampler = (f"{record.get('sampler_model')} model, {record.get('sampler_scheduler')} scheduler, "
               f"T = {record.get('ddim_steps')}, guidance {record.get('start_guidance')}, "
               f"pool {record.get('pool_size')}, timesteps {record.get('timestep_mode')}")
    settings = [("erased concept", concept + (f" (concepts split on {record['separator']!r})"
                                              if record.get("separator") else "")),
                ("erased from", record.get("erase_from") or "the concept itself"),
                ("method", f"ESD, train method `{method.name}`: {method.description}"),
                ("preset", record.get("preset")),
                ("eta (negative_guidance)", f"{eta} (the official code's negative_guidance {eta + 1})"),
                ("iterations", record.get("iterations")), ("learning rate", record.get("lr")),
                ("seed", record.get("seed")), ("x_t sampler", sampler),
                ("image size", record.get("resolved_image_size")), ("batch size", record.get("batch_size")),
                ("frozen weights' precision", record.get("mixed_precision")),
                ("trained parameters", f"{record.get('trained_parameters', 0):,} in "
                                       f"{record.get('trained_tensors')} tensors"),
                *lora_rows(record),
                *([("text encoder", f"trained too (--train_text_encoder): {record.get('text_encoder_tensors')} tensors "
                                    "of its transformer layers and final layer norm, at lr "
                                    f"{record.get('text_encoder_lr') or record.get('lr')}; the embeddings stay the "
                                    "base's")]
                  if record.get("train_text_encoder") else []),
                ("training time", f"{record['seconds']:.1f} s" if "seconds" in record else "not recorded"),
                ("made with", f"esd {env.get('esd')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
                              f"git {env.get('git_hash')}, {env.get('date')}")]
    body = [f"# ESD: {json.dumps(concept)} erased from {base}", "",
            f"The UNet of {base} with {json.dumps(concept)} erased by ESD (Gandikota et al., \"Erasing Concepts from "
            "Diffusion Models\", ICCV 2023): fine-tuned so that, prompted with the concept, it predicts the "
            f"negatively guided e0 - eta (ep - e0) of the frozen model, with eta = {eta}.", "",
            "| setting | value |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in settings], "",
            "## Command", "", "The `esd train` command with these settings (args.json records every one):", "",
            "```bash", train_command(record), "```", "", "## Loading the weights", "",
            *loading_section(record, weights, run_dir), ""]
    evaluations = evaluation_rows(run_dir)
    if evaluations:
        body += ["## Evaluations", "", "`esd evaluate` summaries found in this folder:", "",
                 "| folder | metric | result |", "|---|---|---|", *evaluations, ""]
    path = run_dir / CARD
    kept = "".join(m[0] for m in REPORT_SECTION.finditer(path.read_text())) if path.is_file() else ""
    text = "\n".join(header + body) + kept
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


# A section `esd report --card` put in a card, one per metric; a rewritten card keeps it.
REPORT_SECTION = re.compile(r"<!-- esd report: (?P<metric>[\w-]+) -->\n.*?<!-- end esd report: (?P=metric) -->\n",
                            re.S)


def check_card(run_dir) -> Path:
    """The model card of ``run_dir``, which ``esd report --card`` will rewrite: it must exist and be writable."""
    path = Path(run_dir) / CARD
    if not path.is_file():
        raise ValueError(f"--card {str(run_dir)!r} holds no model card ({CARD}); pass a run folder of `esd train`")
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise ValueError(f"--card: {path} is not writable")
    return path


def put_report_section(run_dir, metric: str, lines: list[str]) -> Path:
    """Put ``lines`` (an ``esd report`` table) in the card's section for ``metric``: replaced if there is one
    (a second report does not add a second table), else appended."""
    path = check_card(run_dir)
    section = "\n".join([f"<!-- esd report: {metric} -->", f"## esd report: {metric}", "", *lines,
                         f"<!-- end esd report: {metric} -->"]) + "\n"
    text = path.read_text()
    old = next((m for m in REPORT_SECTION.finditer(text) if m["metric"] == metric), None)
    if old:
        text = text[:old.start()] + section + text[old.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path
