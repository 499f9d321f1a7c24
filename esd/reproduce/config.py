"""The experiments of ``esd reproduce`` (each a paper result: its prompts, concepts, settings and published
figures) and the command's settings."""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from esd.core.devices import parse_devices
from esd.core.settings import setting
from esd.eval.config import FID_DIMS
from esd.eval.protocols import PROTOCOLS
from esd.families.sources import DEFAULT_BASE_MODEL, resolve_source
from esd.formats.records import check_output_folder
from esd.train.presets import PRESETS

MACE = "Lu et al. 2024 (MACE, CVPR), Table 1"

ESD_TABLE2 = "Gandikota et al. 2023 (ESD), Table 2 (ESD-u)"


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
