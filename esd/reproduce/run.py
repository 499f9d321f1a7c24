"""``esd reproduce NAME``: one command per result of the ESD paper (Gandikota et al., ICCV 2023).

Each experiment runs erase -> generate (base and erased models, the prompt CSV's seeds) -> evaluate
(a named protocol) -> report, all under ``--out``::

    OUT/prompts.csv                 the first --limit rows of --prompts (only with --limit)
    OUT/erase/<concept>/            esd train's run folder (args.json, weights)
    OUT/images/<model>/             esd generate's folder (generation.json fingerprints it)
    OUT/eval/<model>-<metric>/      esd evaluate's results.csv, summary.json, and stage.json
    OUT/compare/<metric>/           esd report's comparison of the models
    OUT/report.md, OUT/report.json  our figures beside the published ones, with provenance

Every stage resumes: a training run whose args.json records the same settings is kept, generation
skips the images its generation.json accounts for, and an evaluation whose stage.json records the same
inputs (settings and the fingerprints of the image folders) is kept. Each skip is logged.
"""

import json
from pathlib import Path

from esd.core.devices import parse_devices
from esd.eval import EvalConfig, ReportConfig, evaluate, report
from esd.eval.nudenet import MACE_CLASSES
from esd.eval.protocols import PROTOCOLS
from esd.formats.generation_record import digest, read_record
from esd.formats.prompt_csv import read_prompt_table
from esd.formats.records import (
    OutputError,
    atomic_write,
    environment_record,
    read_json,
    safe_name,
)
from esd.formats.summary import metric_class
from esd.formats.weights import run_weight_files
from esd.generate.config import GenerationConfig
from esd.generate.images import generate_images
from esd.reproduce.checks import check_evaluation_ready
from esd.reproduce.config import MACE, NOT_PUBLISHED, ReproduceConfig
from esd.train.config import ESDConfig
from esd.train.recipe import train_esd


# -- the stages ----------------------------------------------------------------------------------
def prompt_rows(cfg: ReproduceConfig):
    """The CSV's rows (the first --limit), checked for the columns generation and evaluation read."""
    table = read_prompt_table(cfg.prompts, "--prompts")
    needed = ["prompt", "evaluation_seed", cfg.experiment.case_column] + (["class"] if cfg.name == "objects" else [])
    if missing := [c for c in needed if c not in table.columns]:
        raise ValueError(f"--prompts {cfg.prompts}: no column {', '.join(map(repr, missing))} (reproduce "
                         f"{cfg.name} reads {', '.join(needed)}); columns found: {', '.join(table.columns)}")
    if table.empty:
        raise ValueError(f"--prompts {cfg.prompts} has no rows")
    return table.head(cfg.limit) if cfg.limit else table


def concepts_of(cfg: ReproduceConfig, table) -> list[str]:
    """What is erased: the --concept, or (objects) each class in CSV order, one with --limit."""
    if cfg.concept is not None:
        return [cfg.concept]
    classes = list(dict.fromkeys(table["class"]))
    return classes[:1] if cfg.limit else classes


def model_name(concept: str) -> str:
    return "erased-" + safe_name(concept)


def erase(esd_cfg: ESDConfig, log) -> Path:
    """Train, unless the run folder already holds a finished run with these settings."""
    folder = Path(esd_cfg.save_path) / esd_cfg.run_name
    weights = run_weight_files(folder)["trained"]
    if (folder / "args.json").is_file() and weights.is_file():
        recorded = read_json(folder / "args.json")
        conflicts = esd_cfg.resume_conflicts(recorded)
        if esd_cfg.iterations > recorded.get("iterations", esd_cfg.iterations):  # fewer: resume_conflicts says so
            conflicts.append(f"--iterations {esd_cfg.iterations} vs {recorded.get('iterations')}")
        if conflicts:
            raise ValueError(f"{folder} holds a run trained with other settings ({'; '.join(conflicts)}); use "
                             "another --out")
        log(f"erase {esd_cfg.prompt!r}: {folder} holds this run, skipped")
        return weights
    train_esd(esd_cfg)
    return weights


def generate(gen_cfg: GenerationConfig, label: str, log) -> None:
    counts = generate_images(gen_cfg, log=log)
    if counts["generated"] == 0:
        log(f"generate {label}: all {counts['skipped']} images exist, skipped")


def evaluate_stage(eval_cfg: EvalConfig, log) -> dict:
    """``esd evaluate``, unless its folder's stage.json records the same settings and image folders."""
    folders = [eval_cfg.images] + ([eval_cfg.reference] if eval_cfg.reference else [])
    inputs = digest({"arguments": json.loads(json.dumps(eval_cfg.record(), default=str)),
                     "fingerprints": [(read_record(f) or {}).get("fingerprint") for f in folders]})
    out = Path(eval_cfg.out)
    if (out / "summary.json").is_file() and (out / "stage.json").is_file() \
            and read_json(out / "stage.json").get("inputs") == inputs:
        log(f"evaluate {out.name}: summary.json matches these images and settings, skipped")
        return read_json(out / "summary.json")
    summary = evaluate(eval_cfg, log=log)
    atomic_write(out / "stage.json", lambda p: Path(p).write_text(json.dumps({"inputs": inputs})))
    return summary


# -- the figures -----------------------------------------------------------------------------------
def figures(cfg: ReproduceConfig, summaries: dict) -> list[dict]:
    """One row per (model, quantity): ours, the published value where sourced, the difference."""
    rows = []

    def add(model, quantity, ours):
        value, source = cfg.experiment.published.get((model, quantity), (None, None))
        if cfg.name == "nudity" and cfg.protocol != "i2p-mace":
            value, source = None, None  # MACE counted at 0.6; no published count at another threshold
        rows.append({"model": model, "quantity": quantity, "ours": ours, "published": value,
                     "published_source": source or NOT_PUBLISHED,
                     "difference": None if value is None or ours is None else ours - value})

    for (model, metric), s in summaries.items():  # each metric says which of its numbers papers report
        for quantity, ours in metric_class(metric).quantities(s, base=model == "base"):
            add(model, quantity, ours)
    return rows


def notes_of(cfg: ReproduceConfig, complete: bool) -> list[str]:
    notes = []
    if not complete:
        notes.append("Not comparable with the published figures: " + (
            f"--limit {cfg.limit} (a smoke run)" if cfg.limit else "the protocol's counts were not met "
            "(see each summary.json's protocol_counts)") + ".")
    if cfg.name == "nudity":
        notes.append("The ESD paper's Figure 7 values were never published; under protocol i2p-mace the "
                     f"comparison is {MACE}: SD1.4 743 and ESD-u 123 exposed parts (NudeNet, threshold 0.6), "
                     "summed over " + ", ".join(MACE_CLASSES) + ".")
    if cfg.name == "coco" and cfg.reference is None:
        notes.append("No --reference folder of real COCO images: FID was not computed, CLIP score only.")
    return notes


def write_report(cfg: ReproduceConfig, rows: list[dict], complete: bool, summaries: dict, seeds: dict,
                 log) -> None:
    out = Path(cfg.out)
    record = {"experiment": cfg.name, "source": cfg.experiment.source, "complete": complete,
              "protocol": cfg.protocol, "protocol_source": PROTOCOLS[cfg.protocol].source,
              "figures": rows, "notes": notes_of(cfg, complete), "seeds": seeds,
              "evaluations": {f"{m}-{metric}": str(out / "eval" / f"{m}-{metric}") for m, metric in summaries},
              "arguments": cfg.record(), "environment": environment_record()}

    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# esd reproduce {cfg.name}", "", cfg.experiment.source + ".", "",
             f"Protocol {cfg.protocol}: {PROTOCOLS[cfg.protocol].source}.", "",
             f"Complete: {'yes' if complete else 'no'}.", "",
             "| model | quantity | ours | published | difference | source |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['quantity']} | {cell(r['ours'])} | {cell(r['published'])} | "
              f"{cell(r['difference'])} | {r['published_source']} |" for r in rows]
    lines += [""] + [f"- {n}" for n in record["notes"]]
    lines += ["", f"Seeds: {json.dumps(seeds)}. Arguments, versions and git hash: report.json. Comparisons and "
              "image grids: compare/."]
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(record, indent=2, default=str)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    log(f"report: {out / 'report.md'}, {out / 'report.json'}")


# -- the whole run ------------------------------------------------------------------------------
def reproduce(cfg: ReproduceConfig, log=print) -> dict:
    """Erase, generate, evaluate and report one experiment; returns report.json's figures and flags.
    Every input (CSV columns, training, generation and evaluation settings) is checked before any
    model loads or any file is written."""
    exp, out = cfg.experiment, Path(cfg.out)
    table = prompt_rows(cfg)
    concepts = concepts_of(cfg, table)
    device = str(parse_devices(cfg.devices)[0])
    esd_cfgs = {model_name(c): ESDConfig(prompt=c, train_method=exp.train_method, preset=cfg.preset,
                                         base_model=cfg.base_model, iterations=cfg.iterations, seed=cfg.seed,
                                         devices=cfg.devices, save_path=str(out / "erase"), name=safe_name(c),
                                         save_format="trained") for c in concepts}
    prompts = out / "prompts.csv" if cfg.limit else Path(cfg.prompts)
    metrics = {"nudity": ("nudenet",), "objects": ("classify",), "art": ("lpips",),
               "coco": ("clip",) + (("fid",) if cfg.reference else ())}[cfg.name]
    models = ([] if cfg.name == "art" else ["base"]) + list(esd_cfgs)  # art: LPIPS of each erased model to base

    def eval_cfg(model, metric):
        extra = {"nudenet": {}, "classify": {"erased_classes": ",".join(concepts) if model == "base" else
                                             esd_cfgs[model].prompt, "classifier_weights": cfg.classifier_weights},
                 "lpips": {"reference": str(out / "images" / "base"), "lpips_backbone": cfg.lpips_backbone},
                 "clip": {"clip_model": cfg.clip_model},
                 "fid": {"reference": cfg.reference, "inception_weights": cfg.inception_weights,
                         "fid_dims": cfg.fid_dims}}[metric]
        return EvalConfig(images=str(out / "images" / model), out=str(out / "eval" / f"{model}-{metric}"),
                          metric=metric, protocol=cfg.protocol, prompts=str(prompts),
                          case_column=exp.case_column, devices=device, **extra)

    eval_cfgs = {(m, metric): eval_cfg(m, metric) for m in models for metric in metrics}  # checks settings
    check_evaluation_ready(cfg, eval_cfgs)  # packages and weights, before a model is trained
    if cfg.limit:
        text = table.to_csv(index=False)
        if prompts.exists() and prompts.resolve() == Path(cfg.prompts).resolve():
            raise OutputError(f"--prompts {cfg.prompts!r} is OUT/prompts.csv, which --limit rewrites to its first "
                              "rows; put the prompt CSV outside --out")
        existing = prompts.read_text() if prompts.is_file() else None
        if existing not in (None, text) and not (out / "report.json").is_file():
            raise OutputError(f"--out {str(out)!r} holds a prompts.csv that no earlier esd reproduce wrote; "
                              "choose another folder")
        if existing != text:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(prompts, lambda p: Path(p).write_text(text))

    def gen_cfg(model, weights):
        return GenerationConfig(prompts_path=str(prompts), save_path=str(out / "images" / model),
                                base_model=cfg.base_model, esd_path=weights and str(weights),
                                case_column=exp.case_column, num_samples=cfg.samples, ddim_steps=cfg.steps,
                                device=device)

    base_gen = gen_cfg("base", None)  # checks the generation settings before training
    log(f"***** esd reproduce {cfg.name}: {len(table)} prompt rows, {len(concepts)} erasure(s), protocol "
        f"{cfg.protocol} *****")
    weights = {m: erase(c, log) for m, c in esd_cfgs.items()}
    generate(base_gen, "base", log)
    for model, w in weights.items():
        generate(gen_cfg(model, w), model, log)
    summaries = {key: evaluate_stage(c, log) for key, c in eval_cfgs.items()}
    for metric in metrics:
        inputs = [f"{m}={out / 'eval' / f'{m}-{metric}'}" for m in models]
        report(ReportConfig(inputs=inputs, out=str(out / "compare" / metric)), log=log)
    complete = cfg.limit is None and all(s.get("complete", True) for s in summaries.values())
    rows = figures(cfg, summaries)
    seeds = {"training": cfg.seed, "generation": f"the evaluation_seed column of {prompts}"}
    write_report(cfg, rows, complete, summaries, seeds, log)
    return {"complete": complete, "figures": rows, "summaries": summaries}
