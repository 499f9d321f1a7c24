"""The settings of ``esd attack``, its judges and outputs, and the checks made before any model loads."""

import math
from dataclasses import dataclass
from pathlib import Path

from esd.core.devices import check_device
from esd.eval.metric import import_metrics_package
from esd.families.sources import DEFAULT_BASE_MODEL, source_family
from esd.formats.prompt_csv import MAX_SEED
from esd.formats.records import (
    check_inside,
    check_output_folder,
)
from esd.generate.config import GenerationConfig
from esd.generate.images import read_prompt_rows
from esd.toy.world import prompts_for
from esd.train.attacks import ATTACKS

JUDGES = {
    "toy": "the toy world's judge (colour and shape by measurement): the concept is a toy colour or shape",
    "nudenet": "NudeNet 3.4: an image shows the concept when an exposed class scores above esd evaluate's threshold",
    "classify": "torchvision's ImageNet ResNet-50: an image shows the concept when its top-1 class is the concept",
}

SCHEDULER = "ddim"  # esd generate's name for the sampler used here; toy quality is defined with it

STAGES = ("reference", "before", "after")  # base model + literal prompt, erased + literal, erased + attacked

OUTPUTS = ("results.csv", "summary.json", "adversarial_prompts.csv", "losses.csv", "grid.png", "token.safetensors")


@dataclass
class AttackConfig:
    weights: str  # erased weights, any format esd.load_erased_unet reads
    prompts: str  # CSV with prompt, evaluation_seed and case_number columns
    attack: str  # a key of ATTACKS
    concept: str  # what was erased, as the judge names it (and the word concept inversion replaces)
    out: str
    base_model: str = DEFAULT_BASE_MODEL
    judge: str | None = None  # None: 'toy' for the toy model; required otherwise
    steps: int | None = None  # None: the attack's default (ATTACKS)
    tokens: int = 5  # prefix length k (UnlearnDiffAtk's default)
    lr: float | None = None  # None: the attack's default (ATTACKS); in embedding standard deviations
    batch_size: int = 8  # inversion: references per step
    samples: int = 4  # images per prompt row, in each stage
    ddim_steps: int = 25  # sampling steps (the toy model's quality bar is defined at 25)
    guidance_scale: float = 7.5
    seed: int = 0  # the attacks' random starts, timesteps and noise; images use the CSV's seeds
    device: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        """Every setting checked, one line each, before any model loads."""
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack {self.attack!r} is not one of: {', '.join(ATTACKS)}")
        if self.judge is None:
            if self.base_model != "toy":
                raise ValueError(f"--judge is needed for a model other than the toy one; one of: {', '.join(JUDGES)}")
            self.judge = "toy"
        if self.judge not in JUDGES:
            raise ValueError(f"--judge {self.judge!r} is not one of: {', '.join(JUDGES)}")
        spec = ATTACKS[self.attack]
        self.steps = spec.steps if self.steps is None else self.steps
        self.lr = spec.lr if self.lr is None else self.lr
        for flag in ("steps", "tokens", "batch_size", "samples", "ddim_steps"):
            if not isinstance(getattr(self, flag), int) or getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be an integer >= 1, got {getattr(self, flag)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"--guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"--seed must satisfy 0 <= seed < 2**53, got {self.seed}")
        if not self.concept.strip():
            raise ValueError("--concept is empty; name the erased concept, e.g. 'red' or 'nudity'")
        if self.device is not None:
            self.device = str(check_device(self.device, "--device"))
        if not Path(self.weights).is_file():
            raise ValueError(f"--weights {self.weights!r} does not exist")
        check_concept(self.judge, self.concept)
        check_family(self.base_model)
        check_output_folder(Path(self.out), "--out")
        for name in (*OUTPUTS, *(f"images/{stage}" for stage in STAGES)):  # no link leads a write or the
            check_inside(Path(self.out) / name, Path(self.out), "--out")  # clean-up of stale PNGs elsewhere
        taken = [n for n in OUTPUTS if (Path(self.out) / n).exists()]
        if taken and not self.overwrite:
            raise ValueError(f"--out {self.out!r} already holds {', '.join(taken)}; choose a new folder or pass "
                             "--overwrite")

    def rows(self) -> dict[str, dict]:
        """case -> {"prompt", "seed"}, checked as ``esd generate`` checks them; at least one."""
        rows = read_prompt_rows(GenerationConfig(prompts_path=self.prompts, save_path=self.out,
                                                 base_model=self.base_model))
        if not rows:
            raise ValueError(f"no prompts in {self.prompts!r} (a header row only); --prompts needs a row per "
                             "prompt: case_number, prompt, evaluation_seed")
        return rows


def check_concept(judge: str, concept: str) -> None:
    """A concept the judge can see: a toy colour or shape, or an ImageNet class name."""
    if judge == "toy":
        prompts_for(concept)
    elif judge == "classify":
        tv = import_metrics_package("torchvision", "--judge classify")
        classes = tv.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
        if concept not in classes:
            raise ValueError(f"--concept {concept!r} is not an ImageNet class name of the ResNet-50 (e.g. "
                             f"{', '.join(classes[:5])}, ...; {len(classes)} in all)")


def check_family(base_model: str) -> None:
    """One text encoder only (Family.one_text_encoder): SDXL's second encoder and pooled embeddings, and SD3's
    and FLUX's encoders, are not attacked here."""
    family = source_family(base_model)
    if family is None:
        raise ValueError(f"--base_model {base_model!r}: cannot read its configs (not a local diffusers folder and not "
                         "in the hub cache); offline, pass a local folder or 'toy'")
    if not family.one_text_encoder:
        raise ValueError(f"--base_model {base_model!r} is {family.phrase}; esd attack supports SD 1.x and 2.x models")
