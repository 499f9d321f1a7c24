"""Image generation from prompt CSVs: ``esd generate`` / ``eval-scripts/generate-images.py``.

One PNG per (row, sample): ``<case>_<i>.png`` as in the original evaluation.
Image i of a row starts from the i-th slice of ``randn((num_samples, C, h, w))``
drawn from a CPU generator seeded with the row's seed: the original script's
latents, independent of batching and of how rows are sharded over processes.
Work is cut into fixed batches of consecutive images; a batch whose files all
exist is skipped, any other is generated whole, so a resumed run writes the same
bytes as an uninterrupted one on the same device. Files are written to a temporary
name and renamed, so a kill leaves no half-written PNG.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .config import PRECISIONS
from .models import DEFAULT_BASE_MODEL, resolve_source
from .records import atomic_write, check_name, environment_record
from .weights import apply_erased_weights

SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",  # the paper's evaluation
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
PIPELINES = ("sd", "sld")
SLD_PRESETS = ("weak", "medium", "strong", "max")


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
    scheduler: str = "lms"
    batch_size: int = 1  # images per forward (from one or several rows)
    mixed_precision: str = "no"
    device: str | None = None
    safety_checker: bool = False  # off: NSFW images would come back black and bias nudity counts
    pipeline: str = "sd"  # sd | sld (Safe Latent Diffusion, the paper's inference-time baseline)
    sld_preset: str = "medium"

    def __post_init__(self):
        for flag, value, choices in [("scheduler", self.scheduler, SCHEDULERS), ("pipeline", self.pipeline, PIPELINES),
                                     ("sld_preset", self.sld_preset, SLD_PRESETS),
                                     ("mixed_precision", self.mixed_precision, PRECISIONS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.num_samples < 1 or self.batch_size < 1 or self.ddim_steps < 1:
            raise ValueError("--num_samples, --batch_size and --ddim_steps must be >= 1")
        if self.esd_path and self.model_name:
            raise ValueError("give --esd_path or --model_name, not both")
        if not os.path.isfile(self.prompts_path):
            raise ValueError(f"prompt CSV {self.prompts_path!r} does not exist")
        if self.weights_path and not os.path.isfile(self.weights_path):
            raise ValueError(f"erased weights {self.weights_path!r} do not exist")
        resolve_source(self.base_model)

    @property
    def weights_path(self) -> str | None:
        if self.model_name:
            return str(Path(self.models_dir) / self.model_name / f"diffusers-{self.model_name}.pt")
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


def read_jobs(cfg: GenerationConfig) -> list[Job]:
    """One job per (row, sample), in file order; rows outside [from_case, till_case] are skipped."""
    columns = list(pd.read_csv(cfg.prompts_path, nrows=0).columns)
    needed = {"--prompt_column": cfg.prompt_column, "--seed_column": cfg.seed_column,
              "--case_column": cfg.case_column}
    missing = [f"{flag} {col!r}" for flag, col in needed.items() if col not in columns]
    if missing:
        raise ValueError(f"{cfg.prompts_path}: no column {', '.join(missing)}; columns found: {', '.join(columns)}")
    # Case ids are kept as written (COCO ids have leading zeros); numbers only filter.
    df = pd.read_csv(cfg.prompts_path, dtype={cfg.case_column: str})
    number = pd.to_numeric(df[cfg.case_column], errors="coerce")
    keep = ~(number < cfg.from_case) & ~(number > cfg.till_case if cfg.till_case is not None else False)
    # Case values become file names and prompt CSVs come from third parties: each must be a plain name.
    for row, case in zip(df.index[keep], df[cfg.case_column][keep]):
        check_name(case, f"{cfg.prompts_path}: row {row + 1} (line {row + 2}), --case_column {cfg.case_column!r}:")
    return [Job(case, i, str(prompt), int(seed))
            for case, prompt, seed in zip(df[cfg.case_column][keep], df[cfg.prompt_column][keep],
                                          df[cfg.seed_column][keep])
            for i in range(cfg.num_samples)]


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


def build_pipeline(cfg: GenerationConfig, device: torch.device):
    import diffusers

    source = resolve_source(cfg.base_model)
    index = diffusers.DiffusionPipeline.load_config(source)
    extra = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in index and not cfg.safety_checker else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(source, **extra)
    if cfg.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ValueError(f"--safety_checker asked for, but {cfg.base_model!r} has no safety checker")
    if cfg.weights_path:
        apply_erased_weights(pipe.unet, cfg.weights_path, base_model=cfg.base_model)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(pipe.scheduler.config)
    if cfg.pipeline == "sld":
        from diffusers import StableDiffusionPipelineSafe

        pipe = StableDiffusionPipelineSafe(**{**pipe.components, "safety_checker": pipe.components.get(
            "safety_checker"), "feature_extractor": pipe.components.get("feature_extractor")},
            requires_safety_checker=cfg.safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, PRECISIONS[cfg.mixed_precision])


def generate_images(cfg: GenerationConfig, log=print) -> dict:
    """Generate every missing image of ``cfg``; returns counts. Under ``accelerate launch``
    the batches are split over the processes (each batch to exactly one)."""
    from accelerate import PartialState
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    from tqdm.auto import tqdm

    state = PartialState(cpu=cfg.device == "cpu")
    device = torch.device(cfg.device) if cfg.device and cfg.device != "cpu" and state.num_processes == 1 \
        else state.device
    jobs = read_jobs(cfg)
    out = Path(cfg.save_path)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(cfg, device)
    size = cfg.image_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor:
        raise ValueError(f"--image_size {size} is not a multiple of the VAE factor {pipe.vae_scale_factor}")
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    if state.is_main_process:
        record = {"settings": asdict(cfg), "resolved_image_size": size, "images": len(jobs),
                  "safety_checker": "on" if cfg.safety_checker else "off",
                  "weights_sha256": sha256(cfg.weights_path) if cfg.weights_path else None,
                  "seeds": sorted({j.seed for j in jobs}) if len(jobs) <= 100_000 else "see prompts",
                  "processes": state.num_processes, "environment": environment_record()}
        atomic_write(out / "generation.json", lambda p: Path(p).write_text(json.dumps(record, indent=2)))
        log(f"{len(jobs)} images to {out}; safety checker {'ON' if cfg.safety_checker else 'OFF'}; "
            f"scheduler {cfg.scheduler}; {state.num_processes} process(es)")
    sld = getattr(SafetyConfig, cfg.sld_preset.upper()) if cfg.pipeline == "sld" else {}
    made = skipped = 0
    mine = shard(batches(jobs, cfg.batch_size), state.process_index, state.num_processes)
    for batch in tqdm(mine, disable=not state.is_main_process, desc="generate"):
        if all((out / j.filename).exists() for j in batch):
            skipped += len(batch)
            continue
        latents = torch.stack([initial_latents(j, cfg.num_samples, shape) for j in batch])
        gens = [torch.Generator("cpu").manual_seed(j.seed * 1000 + j.index) for j in batch]  # ancestral noise
        images = pipe([j.prompt for j in batch], latents=latents.to(device, PRECISIONS[cfg.mixed_precision]),
                      num_inference_steps=cfg.ddim_steps, guidance_scale=cfg.guidance_scale, generator=gens,
                      height=size, width=size, **sld).images
        for j, image in zip(batch, images):
            if not (out / j.filename).exists():
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
    p.add_argument("--prompts_path", required=True, help="CSV with prompt, seed and case columns")
    p.add_argument("--save_path", required=True, help="folder for the PNGs and generation.json")
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
    p.add_argument("--scheduler", default="lms", choices=list(SCHEDULERS), help="sampler (default: lms)")
    p.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    p.add_argument("--mixed_precision", default="no", choices=list(PRECISIONS), help="inference dtype")
    p.add_argument("--device", help="'cpu', 'cuda:0'...; under accelerate launch each process takes its own")
    p.add_argument("--safety_checker", action="store_true",
                   help="keep the model's safety checker on (off by default: it blackens NSFW images)")
    p.add_argument("--pipeline", default="sd", choices=PIPELINES, help="'sld': Safe Latent Diffusion baseline")
    p.add_argument("--sld_preset", default="medium", choices=SLD_PRESETS, help="SLD strength")


def cmd_generate(args) -> int:
    cfg = GenerationConfig(**{k: v for k, v in vars(args).items() if k in GenerationConfig.__dataclass_fields__})
    counts = generate_images(cfg)
    print(f"generated {counts['generated']}, skipped {counts['skipped']} existing")
    return 0
