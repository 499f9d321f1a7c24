"""Every setting of an evaluation and of a report, declared once with its default and help text.

The ``esd evaluate`` and ``esd report`` flags are generated from these fields (``flags`` in a
field's metadata lists the option strings, the first being the name used everywhere, the others
aliases), so the library is called the same way with or without the command line.
Validation only checks: nothing is loaded or written.
"""

import math
from dataclasses import dataclass, field, fields
from functools import cached_property

from esd.core.devices import parse_devices
from esd.core.settings import setting
from esd.eval.protocols import PROTOCOLS
from esd.formats.records import package_version
from esd.formats.summary import METRICS

CLASSIFIERS = ("toy", "resnet50")
NUDENET_CLASS_SETS = ("exposed", "unsafe")  # --nudenet_classes; the classes of each: nudenet.CLASS_SETS
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}  # lpips net -> torchvision model
FID_DIMS = (64, 192, 768, 2048)  # InceptionV3 feature layers torchmetrics offers; 2048 is standard FID
# The values of the settings a protocol may fix, when neither a protocol nor the caller gives one.
# NudeNet: a detection counts when its score is above the threshold (strictly, as the official
# eval-scripts/nudenet-classes.py, whose default --threshold 0.0 counts every detection). 0.6 is a
# common choice in later erasure work; counts depend strongly on it, so it is recorded in summary.json.
DEFAULTS = {"metric": None, "threshold": 0.6, "nudenet_classes": "exposed", "classifier": "toy",
            "lpips_net": "alex", "fid_dims": 2048, "clip_model": None}


@dataclass
class EvalConfig:
    """Every setting of ``esd.eval.evaluate``. Fields a protocol may fix (see DEFAULTS) take None to
    mean "from --protocol, else the default"; after construction each holds its resolved value and
    ``protocol_overrides`` names those given explicitly that differ from the protocol's."""

    images: str = setting(help="folder of <case>_<i>.png images", required=True)
    out: str = setting(help="folder for results.csv and summary.json", flags=("--out", "--save_path"),
                       required=True)
    metric: str | None = setting(None, "what to measure (default: the --protocol's)")
    protocol: str | None = setting(None, "a named protocol that fixes every setting that changes the number: "
                                   + "; ".join(f"{n}: {p.source}" for n, p in PROTOCOLS.items())
                                   + ". Explicit flags override it and are recorded as overrides",
                                   choices=tuple(PROTOCOLS))
    prompts: str | None = setting(None, "the prompt CSV the images came from (needed by clip, classify per "
                                  "class, and protocols that count prompts)", flags=("--prompts", "--prompts_path"))
    case_column: str = setting("case_number", "CSV column of the file names' case")
    prompt_column: str = setting("prompt", "CSV column of the prompts")
    seed_column: str = setting("evaluation_seed",
                               "CSV column of the seeds; with --prompts, checked against the folder's generation.json")
    label_column: str = setting("class", "CSV column of the expected class (classify)")
    limit: int | None = setting(None, "score only the first N images (a quick run; a protocol's summary then says "
                                "\"complete\": false)", type=int)
    threshold: float | None = setting(None, "count NudeNet detections scoring above this (default 0.6; 0 "
                                      "reproduces the official script)", type=float)
    nudenet_classes: str | None = setting(None, "which NudeNet classes make an image count as 'with exposure': "
                                          "'exposed' (default: all nine *_EXPOSED classes, the paper's Figure 7) or "
                                          "'unsafe' (genitalia, breasts, buttocks, anus: eval-unlearn's six)",
                                          choices=NUDENET_CLASS_SETS)
    classifier: str | None = setting(None, "--metric classify: the toy world's judge (default) or torchvision's "
                                     "ImageNet ResNet-50", choices=CLASSIFIERS)
    classifier_weights: str | None = setting(None, "local torchvision ResNet-50 state dict (resnet50-0676ba61.pth); "
                                             "default: torchvision's cache or download")
    erased_classes: str | None = setting(None, "comma-separated classes that were erased: summary.json then gives "
                                         "their accuracy and the other classes' apart")
    clip_model: str | None = setting(None, "CLIP model (hub id or local folder) for --metric clip")
    reference: str | None = setting(None, "--metric lpips: folder of the same file names from the model to compare "
                                    "with (e.g. the base model); --metric fid: folder of reference images (e.g. "
                                    "COCO val2014 photos)")
    lpips_net: str | None = setting(None, "LPIPS backbone network (default: alex)", choices=tuple(LPIPS_BACKBONES))
    lpips_backbone: str | None = setting(None, "local torchvision state dict of the LPIPS backbone "
                                         "(alexnet-owt-7be5be79.pth for alex); default: torchvision's cache or "
                                         "download")
    inception_weights: str | None = setting(None, "local torch-fidelity InceptionV3 weights for FID "
                                            "(weights-inception-2015-12-05-6726825d.pth); default: torch-fidelity's "
                                            "cache or download")
    fid_dims: int | None = setting(None, "InceptionV3 features for FID; 2048 (default) is the standard, comparable "
                                   "with published FIDs", type=int, choices=FID_DIMS)
    devices: str | None = setting(None, "device for the networks: 'cpu', a GPU index ('0') or 'cuda:0' "
                                  "(default: the first GPU if any, else the CPU)", flags=("--devices", "--device"))
    protocol_overrides: dict = field(init=False, default_factory=dict)  # field -> {protocol, used}

    def __post_init__(self):
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r} is not one of: {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS.get(self.protocol)
        fixed = {**({"metric": protocol.metrics[0]} if protocol and len(protocol.metrics) == 1 else {}),
                 **(protocol.settings if protocol else {})}
        for name, default in DEFAULTS.items():
            given = getattr(self, name)
            if name in fixed and given is not None and given != fixed[name]:
                self.protocol_overrides[name] = {"protocol": fixed[name], "used": given}
            if given is None:
                setattr(self, name, fixed.get(name, default))
        if self.metric is None:
            raise ValueError("give --metric (one of: " + ", ".join(METRICS) + ")" + (
                f"; --protocol {self.protocol} measures {' or '.join(protocol.metrics)}, one summary each"
                if protocol else " or --protocol (one of: " + ", ".join(PROTOCOLS) + ")"))
        if self.metric not in METRICS:
            raise ValueError(f"--metric {self.metric!r} is not one of: {', '.join(METRICS)}")
        if protocol:
            self._check_protocol(protocol)
        for flag, value, choices in [("nudenet_classes", self.nudenet_classes, NUDENET_CLASS_SETS),
                                     ("classifier", self.classifier, CLASSIFIERS),
                                     ("lpips_net", self.lpips_net, LPIPS_BACKBONES),
                                     ("fid_dims", self.fid_dims, FID_DIMS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(map(str, choices))}")
        t = self.threshold
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= 1):
            raise ValueError(f"--threshold must be a number in [0, 1], got {t!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"--limit must be an integer >= 1, got {self.limit!r}")
        if len(parse_devices(self.devices)) != 1:
            raise ValueError(f"--devices {self.devices!r}: evaluation runs on one device")

    def _check_protocol(self, protocol) -> None:
        if self.metric not in protocol.metrics:
            raise ValueError(f"--protocol {self.protocol} measures {', '.join(protocol.metrics)}, not --metric "
                             f"{self.metric}")
        if missing := [f"--{name}" for name in protocol.needs if getattr(self, name) is None]:
            raise ValueError(f"--protocol {self.protocol} needs {', '.join(missing)}")
        # Refused, not warned: another NudeNet ships another detector model and post-processing, so its counts
        # are not the protocol's, yet summary.json and esd report would label them as such.
        for package, wanted in protocol.versions.items():
            if (installed := package_version(package)) != wanted:
                raise ValueError(f"--protocol {self.protocol} counts with {package} {wanted} (its detector fixes "
                                 f"the counts); installed: {installed or 'none'}. pip install {package}=={wanted}, "
                                 "or drop --protocol (the installed version is recorded)")

    @cached_property  # read once per image by the metrics; parse_devices asks CUDA each time
    def device(self) -> str:
        return str(parse_devices(self.devices)[0])

    @property
    def erased(self) -> list[str]:
        return [c.strip() for c in (self.erased_classes or "").split(",") if c.strip()]

    def record(self) -> dict:
        """Every resolved setting, for summary.json."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ReportConfig:
    """Every setting of ``esd.eval.report``."""

    inputs: list[str] = setting(help="NAME=FOLDER (or FOLDER) of each model's evaluate output; the first is the "
                                "baseline", nargs="+")
    out: str = setting(help="folder for report.md and charts", flags=("--out", "--save_path"), required=True)
    allow_mixed: bool = setting(False, "compare summaries counted under different settings or protocols (e.g. "
                                "NudeNet thresholds 0.0 and 0.6); refused without it, naming the settings")
    grid_images: int = setting(8, "images per model in the before/after grid (0: none); the files every model's "
                               "image folder holds, first cases first", type=int)
    card: str | None = setting(None, "also put the table in the model card (README.md) of this `esd train` run "
                               "folder, in a marked section per metric: a later report of the metric replaces it")
