"""Image generation from prompt CSVs: ``esd generate`` / ``eval-scripts/generate-images.py``.

One PNG per (row, sample): ``<case>_<i>.png`` as in the original evaluation.
Image i of a row starts from the i-th slice of ``randn((num_samples, C, h, w))``
drawn from a CPU generator seeded with the row's seed: the original script's
latents, independent of batching and of how rows are sharded over processes.
Work is cut into fixed batches of consecutive images; a batch whose files all
exist is skipped, any other is generated whole, so a resumed run writes the same
bytes as an uninterrupted one on the same device. Files are written to a temporary
name and renamed, so a kill leaves no half-written PNG.

A folder is bound to what made its pixels, because skipping existing files is only
sound when they came from the same settings. ``generation.json`` holds
``fingerprint_settings``: the base model (a hub id by name; a local folder, 'toy'
included, by a hash of its files' relative paths, sizes and sha256), the erased
weights' sha256, scheduler, steps, guidance, resolved image size, precision,
pipeline, SLD preset (under ``--pipeline sld`` only), safety checker and samples per
row; ``settings_fingerprint``, their sha256; ``rows``, case -> prompt and seed; and
``fingerprint``, a sha256 over both, which ``esd evaluate`` copies into summary.json.
Device and batch size are recorded in ``settings`` but not fingerprinted: they change
at most the rounding of a pixel, not what is drawn. Before any model loads, a run is
refused (one line naming what differs) when the folder was made with other settings,
records one of its cases with another prompt or seed, or holds a file the run would
skip that no record accounts for; ``--overwrite`` starts the folder over. A compatible
run over other cases of the CSV adds its rows: generation.json is re-read, merged and
rewritten under an exclusive lock on ``.generation.lock``, so generators sharing a
folder never lose each other's rows.
"""

import fcntl
import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .config import PRECISIONS
from .flow import pack_latents
from .models import (
    DEFAULT_BASE_MODEL,
    FLOW_FAMILIES,
    FLOW_PIPELINES,
    check_device,
    load_pipeline,
    native_resolution_of,
    pipeline_family,
    resolve_source,
    vae_scale_factor_of,
)
from .records import PLAIN_NAME, atomic_write, check_name, environment_record, error_summary, read_json
from .weights import apply_erased_weights, run_weight_files

SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",  # the paper's evaluation
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # SD3/FLUX: flow matching (their pipelines' own sampler)
}
PIPELINES = ("sd", "sld")
SLD_PRESETS = ("weak", "medium", "strong", "max")
RECORD = "generation.json"
LOCK = ".generation.lock"  # held while generation.json is read, merged and rewritten
# Seeds must be integers 0 <= seed < 2**53: every such integer survives a float CSV column
# (12.0) and a JSON reader exactly, so the seed recorded is the seed used.
MAX_SEED = 2 ** 53
SEED_TEXT = re.compile(r"[0-9]+(\.0*)?")  # 12, or 12.0 as a float column writes it


@dataclass
class GenerationConfig:
    prompts_path: str  # CSV with a prompt, a seed and a case column
    save_path: str  # images go here
    base_model: str = DEFAULT_BASE_MODEL
    esd_path: str | None = None  # erased weights, any format esd.load_erased_unet reads
    model_name: str | None = None  # the original's convention: <models_dir>/<name>/diffusers-<name>.pt
    models_dir: str = "models"
    prompt_column: str = "prompt"
    seed_column: str = "evaluation_seed"
    case_column: str = "case_number"  # coco_30k.csv has none: use image_id
    num_samples: int = 10
    from_case: int = 0
    till_case: int | None = None
    guidance_scale: float = 7.5
    ddim_steps: int = 100
    image_size: int | None = None  # None: the model's native size
    scheduler: str | None = None  # None: lms for the UNet pipelines (the paper's), flow-euler for SD3/FLUX
    batch_size: int = 1  # images per forward (from one or several rows)
    mixed_precision: str = "no"
    device: str | None = None
    safety_checker: bool = False  # off: NSFW images would come back black and bias nudity counts
    pipeline: str = "sd"  # sd | sld (Safe Latent Diffusion, the paper's inference-time baseline)
    sld_preset: str = "medium"
    overwrite: bool = False  # start the folder over: regenerate every image, rewrite generation.json

    def __post_init__(self):
        if self.scheduler is None:  # an unreadable --base_model is named below, by resolve_source
            self.scheduler = "flow-euler" if pipeline_family(self.base_model) in FLOW_FAMILIES else "lms"
        for flag, value, choices in [("scheduler", self.scheduler, SCHEDULERS), ("pipeline", self.pipeline, PIPELINES),
                                     ("sld_preset", self.sld_preset, SLD_PRESETS),
                                     ("mixed_precision", self.mixed_precision, PRECISIONS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.num_samples < 1 or self.batch_size < 1 or self.ddim_steps < 1:
            raise ValueError("--num_samples, --batch_size and --ddim_steps must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}")
        g = self.guidance_scale
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
            raise ValueError(f"--guidance_scale must be a finite number >= 0, got {g!r}")
        if self.esd_path and self.model_name:
            raise ValueError("give --esd_path or --model_name, not both")
        if self.device is not None:  # 'tpu9' would otherwise fail in torch after the folder checks
            self.device = str(check_device(self.device, "--device"))
        if not os.path.isfile(self.prompts_path):
            raise ValueError(f"prompt CSV {self.prompts_path!r} does not exist")
        if self.weights_path and not os.path.isfile(self.weights_path):
            raise ValueError(f"erased weights {self.weights_path!r} do not exist")
        resolve_source(self.base_model)

    @property
    def weights_path(self) -> str | None:
        if self.model_name:
            return str(run_weight_files(Path(self.models_dir) / self.model_name)["full"])
        return self.esd_path


@dataclass(frozen=True)
class Job:
    case: str
    index: int  # sample number within the row
    prompt: str
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.case}_{self.index}.png"


def read_prompt_table(path, what: str = "prompt CSV") -> pd.DataFrame:
    """The CSV with every cell the string written in it: case ids keep their leading zeros (COCO),
    a prompt 'None' or 'NA' stays a prompt, and an empty cell is '' rather than NaN (which str()
    would have turned into the prompt 'nan'). A file that is not UTF-8, empty or not CSV is one line
    naming it (``what``: the flag or kind of file it was given as)."""
    where = f"{what} {str(path)!r}"
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (undecodable byte 0x{e.object[e.start]:02x}); save it as "
                         "UTF-8") from e
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{where} is empty; a prompt CSV starts with a header row (e.g. "
                         "case_number,prompt,evaluation_seed)") from e
    except pd.errors.ParserError as e:
        raise ValueError(f"{where} is not a readable CSV ({error_summary(e)})") from e


def parse_seed(value, where: str) -> int:
    """The integer seed in a CSV cell ('12', or '12.0' from a float column); anything else, or a seed
    outside 0 <= seed < 2**53, is an error starting with ``where``."""
    text = str(value).strip()
    seed = int(text.split(".")[0]) if SEED_TEXT.fullmatch(text) else None
    if seed is None or seed >= MAX_SEED:
        raise ValueError(f"{where} {value!r} is not an integer seed with 0 <= seed < 2**53")
    return seed


def read_prompt_rows(cfg: GenerationConfig) -> dict[str, dict]:
    """case -> {"prompt", "seed"} of the rows in [from_case, till_case], in file order. Prompt CSVs
    come from third parties, so each kept row is checked before any model loads: its case must be a
    plain file name (it becomes one) and unique (two rows would write the same files), its prompt
    not empty, its seed an integer (see parse_seed)."""
    table = read_prompt_table(cfg.prompts_path)
    columns = list(table.columns)
    needed = {"--prompt_column": cfg.prompt_column, "--seed_column": cfg.seed_column,
              "--case_column": cfg.case_column}
    missing = [f"{flag} {col!r}" for flag, col in needed.items() if col not in columns]
    if missing:
        raise ValueError(f"{cfg.prompts_path}: no column {', '.join(missing)}; columns found: {', '.join(columns)}")
    number = pd.to_numeric(table[cfg.case_column], errors="coerce")  # numbers only filter; text cases are kept
    keep = ~(number < cfg.from_case) & ~(number > cfg.till_case if cfg.till_case is not None else False)
    rows, first_row = {}, {}
    for row in table.index[keep]:
        where = f"{cfg.prompts_path}: row {row + 1} (line {row + 2}),"
        case = check_name(table.at[row, cfg.case_column], f"{where} --case_column {cfg.case_column!r}:")
        if case in rows:
            raise ValueError(f"{where} --case_column {cfg.case_column!r}: {case!r} repeats row {first_row[case] + 1} "
                             "(a case names its files, so each may appear once)")
        prompt = table.at[row, cfg.prompt_column]
        if not prompt.strip():
            raise ValueError(f"{where} --prompt_column {cfg.prompt_column!r}: {prompt!r} is an empty prompt")
        seed = parse_seed(table.at[row, cfg.seed_column], f"{where} --seed_column {cfg.seed_column!r}:")
        rows[case], first_row[case] = {"prompt": prompt, "seed": seed}, row
    return rows


def jobs_of(rows: dict[str, dict], num_samples: int) -> list[Job]:
    """One job per (row, sample), in row order."""
    return [Job(case, i, row["prompt"], row["seed"]) for case, row in rows.items() for i in range(num_samples)]


def read_jobs(cfg: GenerationConfig) -> list[Job]:
    """One job per (row, sample), in file order; rows outside [from_case, till_case] are skipped."""
    return jobs_of(read_prompt_rows(cfg), cfg.num_samples)


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def shard(items: list, index: int, count: int) -> list:
    """Contiguous share ``index`` of ``count``: together the shares hold every item once."""
    n = len(items)
    return items[index * n // count:(index + 1) * n // count]


def initial_latents(job: Job, num_samples: int, shape: tuple) -> torch.Tensor:
    """The original script's latents: randn((num_samples, *shape)) from a CPU generator seeded
    with the row's seed; image ``job.index`` takes its slice."""
    g = torch.Generator("cpu").manual_seed(job.seed)
    return torch.randn((num_samples, *shape), generator=g)[job.index]


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder) -> str:
    """sha256 over every file of a local model folder: relative path, size and sha256 of each, in path
    order. Hidden files and folders (``.cache/`` of a hub download, ``.git/``) are left out: they hold
    download metadata, not the model."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if not any(part.startswith(".") for part in relative.parts):
            h.update(f"{relative.as_posix()}\0{path.stat().st_size}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal settings hash alike."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolved_image_size(cfg: GenerationConfig) -> int:
    """--image_size, or the model's native size, read from its configs alone: the size is part of the
    fingerprint, which is checked before any model loads. SD3/FLUX pipelines (flow matching) are checked
    here too: they sample with --scheduler flow-euler only, which the UNet pipelines cannot, and have no SLD."""
    source = resolve_source(cfg.base_model)
    flow = pipeline_family(cfg.base_model) in FLOW_FAMILIES
    if flow != (cfg.scheduler == "flow-euler"):
        raise ValueError(f"--scheduler {cfg.scheduler} does not fit {cfg.base_model!r}: SD3/FLUX pipelines sample "
                         "with --scheduler flow-euler, the UNet pipelines with any other")
    if flow and cfg.pipeline != "sd":
        raise ValueError(f"--pipeline {cfg.pipeline} is for the SD 1.x UNet; SD3/FLUX take --pipeline sd")
    factor = vae_scale_factor_of(source)
    size = cfg.image_size or native_resolution_of(cfg.base_model)
    if size % factor:
        raise ValueError(f"--image_size {size} is not a multiple of the VAE factor {factor}")
    if flow and size % (2 * factor):
        raise ValueError(f"--image_size {size} is not a multiple of {2 * factor} (the VAE factor times the "
                         "transformer's 2x2 patches)")
    return size


def pixel_settings(cfg: GenerationConfig, weights_sha256: str | None, size: int) -> dict:
    """Everything besides the rows that decides the pixels; its digest is the settings fingerprint.
    A hub model is known by its id; a local folder by its files, so an edited or retrained model
    under the same path counts as another model. Values are normalised (7 and 7.0 are one guidance)."""
    source = resolve_source(cfg.base_model)
    local = Path(source).is_dir()
    return {"base_model": None if local else source, "base_model_sha256": folder_sha256(source) if local else None,
            "weights_sha256": weights_sha256, "scheduler": cfg.scheduler, "ddim_steps": int(cfg.ddim_steps),
            "guidance_scale": float(cfg.guidance_scale), "image_size": int(size),
            "mixed_precision": cfg.mixed_precision, "pipeline": cfg.pipeline,
            "sld_preset": cfg.sld_preset if cfg.pipeline == "sld" else None,  # the sd pipeline ignores it
            "safety_checker": bool(cfg.safety_checker), "num_samples": int(cfg.num_samples),
            **flow_pipeline_class(cfg.base_model)}


def flow_pipeline_class(base_model: str) -> dict:
    """{"pipeline_class": StableDiffusion3Pipeline | FluxPipeline} for a flow-matching model, else {}: the
    UNet pipelines' fingerprints predate the key and stay as they were."""
    family = pipeline_family(base_model)
    names = [name for name, f in FLOW_PIPELINES.items() if f == family]
    return {"pipeline_class": names[0]} if names else {}


def read_record(folder) -> dict | None:
    """The folder's generation.json, or None when it has none."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a generation record (a JSON object)")
    return record


def image_names(rows: dict, num_samples: int) -> set[str]:
    """The file names of ``num_samples`` images per case; a case that is not a plain file name (a
    tampered record) names no file, so nothing outside the folder is ever touched."""
    return {f"{case}_{i}.png" for case in rows if PLAIN_NAME.fullmatch(case) for i in range(num_samples)}


def recorded_images(record: dict) -> set[str]:
    """The image files a generation record accounts for (none for a record without rows)."""
    if "rows" not in record or "fingerprint_settings" not in record:
        return set()
    return image_names(record["rows"], record["fingerprint_settings"]["num_samples"])


def _shown(key: str, value) -> str:
    if value is None:
        return "none"
    if key == "safety_checker":
        return "on" if value else "off"
    return value[:12] if key.endswith("sha256") else str(value)


def settings_differences(ours: dict, recorded: dict) -> list[str]:
    """Each fingerprinted setting that differs, phrased with its flag: '--guidance_scale 3.0 vs 7.5 recorded'."""
    labels = {"base_model_sha256": "base model files' sha256", "weights_sha256": "erased weights' sha256"}
    out = []
    for key in [*ours, *(k for k in recorded if k not in ours)]:
        a, b = ours.get(key), recorded.get(key)
        if a == b:
            continue
        label = labels.get(key, f"--{key}")
        if key in labels and a and b:
            out.append(f"{label} differ ({_shown(key, a)} vs {_shown(key, b)} recorded)")
        else:
            out.append(f"{label} {_shown(key, a)} vs {_shown(key, b)} recorded")
    return out


def row_differences(rows: dict, recorded: dict) -> list[str]:
    """Each case of ``rows`` that the record holds with another prompt or seed."""
    return [f"case {case!r}: {key} differs ({_clip(row[key])} vs {_clip(recorded[case].get(key))} recorded)"
            for case, row in rows.items() if case in recorded
            for key in ("prompt", "seed") if recorded[case].get(key) != row[key]]


def _clip(value, width: int = 60) -> str:
    text = repr(value)  # repr keeps a prompt's newlines out of a one-line message
    return text if len(text) <= width else text[:width - 3] + "..."


def _listed(items: list[str], first: int = 3) -> str:
    return "; ".join(items[:first]) + (f"; and {len(items) - first} more" if len(items) > first else "")


def check_folder(out: Path, settings: dict, rows: dict, num_samples: int) -> None:
    """Refuse to add images to ``out`` unless everything in it came from these settings: a run skips the
    files that exist, so a file made otherwise would pass as this run's."""
    if not out.is_dir():
        return
    # Listed before the record is read: a concurrent generator records its rows before writing their images.
    present = {p.name for p in out.glob("*.png")}
    record = read_record(out)
    hint = "use another --save_path, or --overwrite to start the folder over"
    if record is None:
        if present:
            raise ValueError(f"{out} holds {len(present)} PNG file(s) but no {RECORD}, so their provenance is "
                             f"unknown; {hint}")
        return
    if "settings_fingerprint" not in record or "rows" not in record:
        raise ValueError(f"{out / RECORD} has no settings fingerprint (an older esd wrote it); {hint}")
    if record["settings_fingerprint"] != digest(settings):
        differences = settings_differences(settings, record.get("fingerprint_settings", {}))
        raise ValueError(f"{out} was generated with other settings: {_listed(differences or ['fingerprint differs'])}"
                         f"; {hint}")
    if conflicts := row_differences(rows, record["rows"]):
        raise ValueError(f"{out}: {_listed(conflicts)}; {hint}")
    if unknown := sorted((image_names(rows, num_samples) & present) - recorded_images(record)):
        raise ValueError(f"{out}: {len(unknown)} image(s) this run would keep are not in {RECORD} "
                         f"({_listed(unknown)}); {hint}")


@contextmanager
def folder_lock(out: Path):
    """An exclusive lock on ``out/.generation.lock``: generators sharing a folder take turns to read,
    merge and rewrite generation.json (closing the file releases it, even when a run is killed)."""
    with open(out / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def remove_recorded_images(out: Path, record: dict | None) -> None:
    """--overwrite: delete the images the old record names, and no other file."""
    for name in sorted(recorded_images(record or {})):
        (out / name).unlink(missing_ok=True)


def write_record(out: Path, cfg: GenerationConfig, settings: dict, rows: dict, run: dict) -> dict:
    """Write generation.json under the folder's lock and return it. Another generator may have written
    since this run's check: the record is re-read and checked again, and its rows merged with this run's;
    --overwrite instead deletes the images the old record names and keeps only this run's rows."""
    with folder_lock(out):
        if cfg.overwrite:
            try:
                remove_recorded_images(out, read_record(out))
            except ValueError:  # an unreadable record names no images: delete nothing
                pass
            merged = dict(rows)
        else:
            check_folder(out, settings, rows, cfg.num_samples)
            merged = {**(read_record(out) or {}).get("rows", {}), **rows}
        settings_fingerprint = digest(settings)
        seeds = sorted({r["seed"] for r in merged.values()}) if len(merged) <= 100_000 else "see rows"
        record = {"fingerprint": digest({"settings_fingerprint": settings_fingerprint, "rows": merged}),
                  "settings_fingerprint": settings_fingerprint, **run, "images": len(merged) * cfg.num_samples,
                  "seeds": seeds, "fingerprint_settings": settings, "rows": merged}
        atomic_write(out / RECORD, lambda p: Path(p).write_text(json.dumps(record, indent=2)))
    return record


def build_pipeline(cfg: GenerationConfig, device: torch.device):
    import diffusers

    pipe = load_pipeline(cfg.base_model, cfg.safety_checker)
    if cfg.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ValueError(f"--safety_checker asked for, but {cfg.base_model!r} has no safety checker")
    if cfg.weights_path:
        denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
        apply_erased_weights(denoiser, cfg.weights_path, base_model=cfg.base_model,
                             text_encoder=getattr(pipe, "text_encoder", None))  # --train_text_encoder's tensors
    pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(pipe.scheduler.config)
    if cfg.pipeline == "sld":
        from diffusers import StableDiffusionPipelineSafe

        pipe = StableDiffusionPipelineSafe(**{**pipe.components, "safety_checker": pipe.components.get(
            "safety_checker"), "feature_extractor": pipe.components.get("feature_extractor")},
            requires_safety_checker=cfg.safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, PRECISIONS[cfg.mixed_precision])


def generate_images(cfg: GenerationConfig, log=print) -> dict:
    """Generate every missing image of ``cfg`` (with --overwrite, every image); returns counts. The prompt
    rows and the folder are checked before any model loads. Under ``accelerate launch`` the batches are
    split over the processes (each batch to exactly one); the main process writes generation.json."""
    from accelerate import PartialState
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    from tqdm.auto import tqdm

    state = PartialState(cpu=cfg.device == "cpu")
    device = torch.device(cfg.device) if cfg.device and cfg.device != "cpu" and state.num_processes == 1 \
        else state.device
    rows = read_prompt_rows(cfg)
    jobs = jobs_of(rows, cfg.num_samples)
    out = Path(cfg.save_path)
    size = resolved_image_size(cfg)
    weights_sha256 = sha256(cfg.weights_path) if cfg.weights_path else None
    settings = pixel_settings(cfg, weights_sha256, size)
    if not cfg.overwrite:
        check_folder(out, settings, rows, cfg.num_samples)
    pipe = build_pipeline(cfg, device)  # before the folder is made: bad weights leave nothing behind
    out.mkdir(parents=True, exist_ok=True)
    flux = type(pipe).__name__ == "FluxPipeline"  # reads its latents packed 2x2 into tokens
    channels = pipe.transformer.config.in_channels // (4 if flux else 1) if hasattr(pipe, "transformer") \
        else pipe.unet.config.in_channels
    shape = (channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    if state.is_main_process:
        run = {"settings": asdict(cfg), "resolved_image_size": size,
               "safety_checker": "on" if cfg.safety_checker else "off", "weights_sha256": weights_sha256,
               "processes": state.num_processes, "environment": environment_record()}
        record = write_record(out, cfg, settings, rows, run)
        log(f"{len(jobs)} images to {out} (fingerprint {record['fingerprint'][:12]}); safety checker "
            f"{'ON' if cfg.safety_checker else 'OFF'}; scheduler {cfg.scheduler}; {state.num_processes} process(es)")
    state.wait_for_everyone()  # --overwrite: the old images are gone before any process writes new ones
    sld = getattr(SafetyConfig, cfg.sld_preset.upper()) if cfg.pipeline == "sld" else {}
    made = skipped = 0
    mine = shard(batches(jobs, cfg.batch_size), state.process_index, state.num_processes)
    for batch in tqdm(mine, disable=not state.is_main_process, desc="generate"):
        if not cfg.overwrite and all((out / j.filename).exists() for j in batch):
            skipped += len(batch)
            continue
        latents = torch.stack([initial_latents(j, cfg.num_samples, shape) for j in batch])
        latents = pack_latents(latents) if flux else latents
        gens = [torch.Generator("cpu").manual_seed(j.seed * 1000 + j.index) for j in batch]  # ancestral noise
        images = pipe([j.prompt for j in batch], latents=latents.to(device, PRECISIONS[cfg.mixed_precision]),
                      num_inference_steps=cfg.ddim_steps, guidance_scale=cfg.guidance_scale, generator=gens,
                      height=size, width=size, **sld).images
        for j, image in zip(batch, images):
            if cfg.overwrite or not (out / j.filename).exists():
                atomic_write(out / j.filename, lambda p, im=image: im.save(p, format="PNG"))
                made += 1
    return {"generated": made, "skipped": skipped, "process": state.process_index,
            "processes": state.num_processes, "files": [j.filename for b in mine for j in b]}


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt CSV (resumable, shardable)")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)


def add_generate_arguments(p) -> None:
    d = GenerationConfig.__dataclass_fields__
    p.add_argument("--prompts_path", "--prompts", dest="prompts_path", required=True,
                   help="CSV with prompt, seed and case columns")
    p.add_argument("--save_path", "--out", dest="save_path", required=True,
                   help="folder for the PNGs and generation.json")
    p.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="hub id, local diffusers folder, or 'toy'")
    p.add_argument("--esd_path", help="erased weights (.pt, .safetensors, CompVis .ckpt), loaded strictly")
    p.add_argument("--model_name", help="as the original: load <models_dir>/<name>/diffusers-<name>.pt")
    p.add_argument("--models_dir", default="models", help="where --model_name looks")
    for col in ("prompt_column", "seed_column", "case_column"):
        p.add_argument(f"--{col}", default=d[col].default, help="CSV column (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=10, help="images per prompt (default: %(default)s)")
    p.add_argument("--from_case", type=int, default=0, help="skip rows whose case number is below this")
    p.add_argument("--till_case", type=int, help="skip rows whose case number is above this")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    p.add_argument("--ddim_steps", type=int, default=100, help="sampling steps (default: 100, as the original)")
    p.add_argument("--image_size", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler (default: lms for SD 1.x/2.x/XL, flow-euler for SD3/FLUX, their only one)")
    p.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    p.add_argument("--mixed_precision", default="no", choices=list(PRECISIONS), help="inference dtype")
    p.add_argument("--device", "--devices", dest="device",
                   help="'cpu', 'cuda:0'...; under accelerate launch each process takes its own")
    p.add_argument("--safety_checker", action="store_true",
                   help="keep the model's safety checker on (off by default: it blackens NSFW images)")
    p.add_argument("--pipeline", default="sd", choices=PIPELINES, help="'sld': Safe Latent Diffusion baseline")
    p.add_argument("--sld_preset", default="medium", choices=SLD_PRESETS, help="SLD strength")
    p.add_argument("--overwrite", action="store_true",
                   help="start the folder over: delete the images its generation.json records (no other file), "
                   "regenerate every image of this run and rewrite generation.json. Without it a folder made "
                   "with other settings, prompts or seeds is refused")


def cmd_generate(args) -> int:
    cfg = GenerationConfig(**{k: v for k, v in vars(args).items() if k in GenerationConfig.__dataclass_fields__})
    counts = generate_images(cfg)
    print(f"generated {counts['generated']}, skipped {counts['skipped']} existing")
    return 0
