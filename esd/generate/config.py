"""The settings of ``esd generate`` and its unit of work (one image of one prompt row)."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

from esd.core.devices import check_device
from esd.core.precision import PRECISIONS
from esd.families.sources import DEFAULT_BASE_MODEL, resolve_source, source_family
from esd.formats.weights import run_weight_files

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
            family = source_family(self.base_model)  # None: unreadable yet, a UNet's as before loading
            self.scheduler = family.generation_scheduler if family is not None else "lms"
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
