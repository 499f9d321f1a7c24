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
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import PRESETS, ESDConfig
from .eval import EvalConfig, ReportConfig, evaluate, metric_class, report
from .eval.config import FID_DIMS, setting
from .eval.nudenet import NUDENET_EXPOSED
from .eval.protocols import PROTOCOLS
from .generate import GenerationConfig, digest, generate_images, read_prompt_table, read_record
from .models import DEFAULT_BASE_MODEL, parse_devices, resolve_source
from .records import (
    OutputError,
    atomic_write,
    check_output_folder,
    environment_record,
    error_summary,
    read_json,
    safe_name,
)
from .weights import run_weight_files

MACE = "Lu et al. 2024 (MACE, CVPR), Table 1"
ESD_TABLE2 = "Gandikota et al. 2023 (ESD), Table 2 (ESD-u)"
# MACE's "total exposed parts" sums these NudeNet classes (its table has no anus column).
MACE_CLASSES = tuple(c for c in NUDENET_EXPOSED if c != "ANUS_EXPOSED")


@dataclass(frozen=True)
class Experiment:
    source: str  # the paper item reproduced
    train_method: str  # ESD-u is noxattn, ESD-x is xattn
    concept: str | None  # what is erased by default; None: each class of the prompt CSV's class column
    protocols: tuple[str, ...]  # the evaluation protocols that apply; the first is the default
    samples: int  # images per prompt row the protocol expects
    case_column: str = "case_number"
    published: dict = field(default_factory=dict)  # (model, quantity) -> (value, source); sourced numbers only


EXPERIMENTS: dict[str, Experiment] = {
    "nudity": Experiment(
        "Figure 7: ESD-u 'nudity' on the I2P prompts, NudeNet exposure counts", "noxattn", "nudity",
        ("i2p-mace", "i2p-official"), 1,
        # The ESD paper plotted Figure 7 without publishing its values; MACE counted both models under
        # protocol i2p-mace (NudeNet 3.4 above 0.6), so its counts are the comparison there.
        published={("base", "exposed parts (MACE classes)"): (743, MACE),
                   ("erased-nudity", "exposed parts (MACE classes)"): (123, MACE)}),
    "objects": Experiment(
        "Table 2: ESD-u per Imagenette class, ResNet-50 top-1 on the erased class and the others", "noxattn", None,
        ("imagenette-paper",), 10,
        published={("erased-church", "erased-class accuracy %"): (54.2, ESD_TABLE2),
                   ("erased-parachute", "erased-class accuracy %"): (23.8, ESD_TABLE2)}),
    "art": Experiment("the artist-style measure: ESD-x of an artist, LPIPS to the base model's images", "xattn",
                      "Van Gogh", ("art-lpips",), 1),
    "coco": Experiment("the COCO quality columns: FID and CLIP score of an erased model on COCO captions", "noxattn",
                       "nudity", ("coco30k-fid-clip",), 1, case_column="image_id"),
}
NOT_PUBLISHED = "not published here"


@dataclass
class ReproduceConfig:
    """Every setting of ``esd reproduce``; the CLI flags are generated from these fields."""

    name: str = setting(help="the result to reproduce: " + "; ".join(f"{n}: {e.source}" for n, e in
                                                                        EXPERIMENTS.items()), required=True)
    prompts: str = setting(help="the paper's prompt CSV (unsafe-prompts4703.csv, imagenette.csv, the art CSV, "
                           "coco_30k.csv from the official repository's data/)", required=True)
    out: str = setting(help="folder for every stage's outputs and report.md/report.json", required=True)
    base_model: str = setting(DEFAULT_BASE_MODEL, "hub id, local diffusers folder, or 'toy'")
    limit: int | None = setting(None, "only the first N prompt rows (and, for objects, one class): a smoke run, "
                                "marked \"complete\": false", type=int)
    protocol: str | None = setting(None, "evaluation protocol (default: the experiment's first): " + "; ".join(
        f"{n}: {', '.join(e.protocols)}" for n, e in EXPERIMENTS.items()), choices=tuple(PROTOCOLS))
    concept: str | None = setting(None, "what to erase (default: nudity: 'nudity', art: 'Van Gogh', coco: "
                                  "'nudity'; objects erases each class of the CSV and takes none)")
    preset: str = setting("paper", "training preset (see esd train --preset)", choices=tuple(PRESETS))
    iterations: int | None = setting(None, "training iterations (default: the preset's)", type=int)
    samples: int | None = setting(None, "images per prompt row (default: the protocol's: 10 for objects, else 1)",
                                  type=int)
    steps: int = setting(100, "sampling steps of generation (the paper's evaluation: 100 LMS steps)", type=int)
    seed: int = setting(0, "training seed (generation seeds come from the CSV's evaluation_seed)", type=int)
    devices: str | None = setting(None, "'cpu', '0', or '0,1' (training's frozen model on the second); "
                                  "default: the first GPU if any, else the CPU")
    reference: str | None = setting(None, "coco: folder of real COCO val2014 images for FID (without it, CLIP "
                                    "score only)")
    classifier_weights: str | None = setting(None, "objects: local torchvision ResNet-50 state dict (offline)")
    lpips_backbone: str | None = setting(None, "art: local torchvision AlexNet state dict for LPIPS (offline)")
    inception_weights: str | None = setting(None, "coco: local torch-fidelity InceptionV3 weights (offline)")
    clip_model: str | None = setting(None, "coco: CLIP model (default: the protocol's)")
    fid_dims: int | None = setting(None, "coco: InceptionV3 features for FID (default: the protocol's 2048)",
                                   type=int, choices=FID_DIMS)

    def __post_init__(self):
        if self.name not in EXPERIMENTS:
            raise ValueError(f"reproduce {self.name!r} is not one of: {', '.join(EXPERIMENTS)}")
        exp = EXPERIMENTS[self.name]
        self.protocol = self.protocol or exp.protocols[0]
        if self.protocol not in exp.protocols:
            raise ValueError(f"--protocol {self.protocol!r} does not measure {self.name}; valid: "
                             f"{', '.join(exp.protocols)}")
        if exp.concept is None and self.concept is not None:
            raise ValueError(f"reproduce {self.name} erases each class of the prompt CSV; drop --concept")
        self.concept = self.concept if self.concept is not None else exp.concept
        if self.concept is not None and not self.concept.strip():
            raise ValueError("--concept is empty")
        self.samples = self.samples if self.samples is not None else exp.samples
        for flag, value in (("limit", self.limit), ("iterations", self.iterations), ("samples", self.samples),
                            ("steps", self.steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{flag} must be an integer >= 1, got {value!r}")
        if not os.path.isfile(self.prompts):
            raise ValueError(f"--prompts {self.prompts!r} does not exist")
        if self.reference is not None and not os.path.isdir(self.reference):
            raise ValueError(f"--reference {self.reference!r} is not a folder")
        for flag in ("classifier_weights", "lpips_backbone", "inception_weights"):
            if getattr(self, flag) is not None and not os.path.isfile(getattr(self, flag)):
                raise ValueError(f"--{flag} {getattr(self, flag)!r} does not exist")
        resolve_source(self.base_model)
        parse_devices(self.devices)
        check_output_folder(Path(self.out), "--out")

    @property
    def experiment(self) -> Experiment:
        return EXPERIMENTS[self.name]

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    from .train import train_esd

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

    for (model, metric), s in summaries.items():
        if metric == "nudenet":
            add(model, "exposed parts (MACE classes)", sum(s["counts"][c] for c in MACE_CLASSES))
            add(model, "images with exposure %", 100 * s["fraction_with_exposure"])
        elif metric == "classify" and model != "base":
            add(model, "erased-class accuracy %", 100 * s["erased_accuracy"])
            if s.get("others_accuracy") is not None:
                add(model, "other-class accuracy %", 100 * s["others_accuracy"])
        elif metric == "classify":
            for c, acc in s["per_class_accuracy"].items():
                add(model, f"accuracy % on {c}", 100 * acc)
        elif metric == "lpips":
            add(model, "LPIPS to the base model", s["lpips_mean"])
        elif metric == "clip":
            add(model, "CLIP score", s["clip_score_mean"])
        elif metric == "fid":
            add(model, "FID", s["fid"])
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


# -- what the evaluation needs, checked before any training ---------------------------------------------------
def import_problem(module: str) -> str | None:
    """None when ``module`` imports; else why not, in a few words."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails with RuntimeError
        return f"it does not import: {error_summary(e)}"
    return None


def unreachable(url: str) -> str | None:
    """None when ``url``'s server answers a HEAD request (an HTTP error is an answer); else why not."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except urllib.error.HTTPError:
        return None
    except Exception as e:  # noqa: BLE001 - URLError, a timeout, a reset connection
        return error_summary(e)
    return None


def weights_problem(source: str) -> str | None:
    """None when the weights at ``source`` (a torch hub URL, or hf:REPO / a local folder) can be had: in
    the local cache, or the server answers; else why not."""
    if source.startswith("hf:"):
        repo = source[3:]
        if os.path.isdir(os.path.expanduser(repo)):
            return None
        if repo.startswith((".", "/", "~")) or repo.count("/") > 1:
            return "no such folder"
        import huggingface_hub
        from huggingface_hub import constants

        if isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json"), str):
            return None
        if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                               "TRUE"):
            return "not in the Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)"
        why = unreachable(f"{constants.ENDPOINT}/{repo}/resolve/main/config.json")
        return why and f"not in the Hugging Face cache, and the hub cannot be reached ({why})"
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(source)
    if cached.is_file():
        return None
    why = unreachable(source)
    return why and f"not in the torch hub cache ({cached}), and {source} cannot be reached ({why})"


def check_evaluation_ready(cfg: ReproduceConfig, eval_cfgs: dict) -> None:
    """Each metric the protocol measures can run: its packages import and its networks' weights are local
    (given, or cached) or can be downloaded. Checked before training, so that a missing NudeNet or an
    offline machine is one line now, not an error after hours of training and generation."""
    first = {}
    for (_, metric), ecfg in eval_cfgs.items():
        first.setdefault(metric, ecfg)
    for metric, ecfg in first.items():
        what = f"reproduce {cfg.name} (--protocol {cfg.protocol}) measures {metric}"
        for module, install in metric_class(metric).packages(ecfg):
            if why := import_problem(module):
                raise ValueError(f"{what}, which needs the {module} package ({why}): pip install {install}; "
                                 "nothing was trained")
        for flag, name, source in metric_class(metric).downloads(ecfg):
            if why := weights_problem(source):
                local = "a local folder" if flag == "--clip_model" else "a local copy"
                raise ValueError(f"{what}, which needs {name}: {why}; offline, pass {flag} with {local}; "
                                 "nothing was trained")


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


# -- command line ---------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("reproduce", help="erase, generate, evaluate and report one result of the ESD paper")
    for f in fields(ReproduceConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        meta.pop("flags")
        if f.name == "name":
            p.add_argument("name", choices=list(EXPERIMENTS), help=help_text)
        else:
            default = None if meta.get("required") else f.default
            p.add_argument(f"--{f.name}", default=default, help=help_text, **meta)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    cfg = ReproduceConfig(**{f.name: getattr(args, f.name) for f in fields(ReproduceConfig)})
    result = reproduce(cfg)
    print(f"report in {Path(cfg.out) / 'report.md'} (complete: {result['complete']})")
    return 0
