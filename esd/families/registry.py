"""The model families, and which one a model is: a loaded denoiser (:func:`detect_family`), a pipeline class
(:func:`families_of_pipeline`), or a denoiser config; and the train methods each family takes.

A new family is one new file holding its :class:`esd.families.family.Family`, and one entry below.
"""

import torch

from esd.core.methods import ALIASES, METHOD_CHOICES, TRAIN_METHODS, TrainMethod, resolve_method, select_by
from esd.families.family import Family
from esd.families.flux import FLUX
from esd.families.sd import SD1, SD2
from esd.families.sd3 import SD3
from esd.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}

PIPELINE_CLASSES = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.pipeline_classes))

DENOISER_CLASSES = tuple(dict.fromkeys(f.denoiser_class for f in FAMILIES.values()))


def family_named(name) -> Family:
    """The family a record names (args.json's ``family``); a record from before families were recorded names
    none, and was a UNet's: SD 1.x's, as every such run's."""
    return FAMILIES.get(name, SD1)


def detect_family(denoiser: torch.nn.Module) -> Family:
    """The family of a loaded denoiser: by its class (the transformers), then by its config (the UNets)."""
    for family in FAMILIES.values():
        if family.holds(denoiser):
            return family
    raise ValueError(f"no model family has a {type(denoiser).__name__}; valid models: "
                     f"{', '.join(c.__name__ for c in DENOISER_CLASSES)}")


def denoiser_of(pipe) -> torch.nn.Module:
    """A loaded diffusers pipeline's denoiser: its transformer (SD3, FLUX), else its UNet."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else pipe.unet


def families_of_pipeline(class_name) -> list[Family]:
    """The families whose diffusers folders name ``class_name`` in model_index.json (SD 1.x and 2.x share one)."""
    return [f for f in FAMILIES.values() if class_name in f.pipeline_classes]


def family_of_config(candidates: list[Family], config) -> Family | None:
    """Of ``candidates`` (one pipeline class's families), the one whose denoiser ``config`` this is."""
    found = [f for f in candidates if f.has_config(config)]
    return found[0] if len(found) == 1 else None


def applies(method: TrainMethod, family: Family) -> bool:
    """Whether ``method``'s parameter names exist in ``family``'s denoiser."""
    return bool(set(method.layouts) & set(family.layouts))


def methods_of(family: Family) -> list[str]:
    """The train methods (and aliases) that apply to ``family``, in the table's order."""
    return [c for c in METHOD_CHOICES if applies(TRAIN_METHODS[ALIASES.get(c, c)], family)]


def check_method(name: str, family: Family | None = None) -> TrainMethod:
    """The train method called ``name`` (aliases accepted), checked against ``family`` when it is known: a method
    of another denoiser (SD3.5's ``attn2`` is a second *image* self-attention, not the UNet's cross-attention) is
    refused in one line naming the valid ones."""
    method = resolve_method(name)
    if family is not None and not applies(method, family):
        titles = dict.fromkeys(f.denoiser_title for f in FAMILIES.values() if applies(method, f))
        raise ValueError(f"train method {name!r} is for the {' or '.join(titles)}, not the {family.denoiser_title}; "
                         f"valid for it: {', '.join(methods_of(family))}")
    return method


def select_parameters(model: torch.nn.Module, method: str) -> list[str]:
    """Names of the parameters of ``model`` (a UNet or transformer) that ``method`` trains (never empty)."""
    family = next((f for f in FAMILIES.values() if f.holds(model)), None)
    if family is None:
        raise ValueError(f"no train methods for a {type(model).__name__}; valid models: "
                         f"{', '.join(c.__name__ for c in DENOISER_CLASSES)}")
    return select_by(model, check_method(method, family), family.blocks_only_official)
