"""Where a model comes from, checked before any weights load: a hub id, a local diffusers folder (its
model_index.json and configs read as data, only diffusers and transformers classes allowed), the embedded
toy models, or an original single file; and what the source says of its family and resolution."""

import json
import os
import re
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin

from esd.families.family import Family
from esd.families.flow_single_file import FLOW_CHECKPOINTS, checkpoint_shapes, flow_checkpoint_family
from esd.families.ldm_single_file import UNET_PREFIX as LDM_UNET_PREFIX
from esd.families.registry import FAMILIES, PIPELINE_CLASSES, families_of_pipeline, family_of_config

DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"

TOY_MODEL_DIR = Path(__file__).parents[1] / "toy" / "model"

TOY_DIT_DIR = Path(__file__).parents[1] / "toy" / "model-dit"

# The shipped toy models by name, and the command that rebuilds each.
TOY_MODELS = {"toy": (TOY_MODEL_DIR, "esd toy-train"), "toy-dit": (TOY_DIT_DIR, "esd toy-train-dit")}

# What a model folder's model_index.json may name (folders may come from strangers, and diffusers imports
# whatever module an entry names): the pipelines this tool loads, and per component the [library, class]
# pairs it loads; ("diffusers", SCHEDULER) stands for any of diffusers' scheduler classes. Every entry may
# also be [null, null] (a component saved without, as the toy models' safety checker). The pipelines are the
# families' (esd.families.registry.PIPELINE_CLASSES).

SCHEDULER = "<a diffusers scheduler, e.g. DDIMScheduler>"

_TEXT_ENCODERS = tuple(("transformers", c) for c in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"))

_TOKENIZERS = tuple(("transformers", c) for c in ("CLIPTokenizer", "CLIPTokenizerFast", "T5TokenizerFast",
                                                  "T5Tokenizer"))

COMPONENT_CLASSES = {
    "unet": (("diffusers", "UNet2DConditionModel"),),
    "transformer": (("diffusers", "SD3Transformer2DModel"), ("diffusers", "FluxTransformer2DModel")),
    "vae": (("diffusers", "AutoencoderKL"),),
    "scheduler": (("diffusers", SCHEDULER),),
    **{f"text_encoder{n}": _TEXT_ENCODERS for n in ("", "_2", "_3")},
    **{f"tokenizer{n}": _TOKENIZERS for n in ("", "_2", "_3")},
    "safety_checker": (("stable_diffusion", "StableDiffusionSafetyChecker"),),
    "feature_extractor": (("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")),
    "image_encoder": (("transformers", "CLIPVisionModelWithProjection"),),
}


class ModelLoadError(ValueError):
    """A model or weights file could not be loaded; the message says what to pass instead."""


def resolve_source(base_model: str) -> str:
    """``toy`` / ``toy-dit`` -> the shipped toy model's folder; a path that looks local must exist."""
    if base_model in TOY_MODELS:
        folder, command = TOY_MODELS[base_model]
        if not (folder / "model_index.json").exists():
            raise ModelLoadError(f"the {base_model} model is not built at {folder}; run `{command}`")
        return str(folder)
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") != 1 or os.path.exists(base_model)
    if looks_local:
        path = Path(base_model).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"base model folder {base_model!r} does not exist; pass a local diffusers folder, "
                                 "a hub id such as 'CompVis/stable-diffusion-v1-4', or 'toy'")
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ModelLoadError(f"{base_model!r} is not a diffusers folder (no model_index.json or unet/); "
                                 "for an original .ckpt/.safetensors file use --ckpt_path")
        check_model_folder(path, base_model)
        return str(path)
    return base_model


def check_model_folder(folder: Path, name: str) -> None:
    """Refuse, before diffusers reads it, a model folder (perhaps a stranger's) that would make diffusers
    import or run anything but the classes this tool loads: its model_index.json (:func:`check_model_index`),
    custom code (a ``.py`` file anywhere in it) and ``auto_map`` entries in its components' configs. Only
    JSON is read; one line names what is wrong and what is valid."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if index_path.exists():
        check_model_index(_read_config(index_path, name), name)
    code = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
    if code:
        raise ModelLoadError(f"model folder {name!r} holds custom code ({', '.join(code[:3])}"
                             f"{', ...' if len(code) > 3 else ''}); this tool loads diffusers and transformers "
                             "classes only, never a model folder's own code: remove it, or pass another folder")
    for config in sorted(folder.glob("*/*config.json")):
        if "auto_map" in _read_config(config, name):
            raise ModelLoadError(f"model folder {name!r}: {config.relative_to(folder).as_posix()} has an auto_map "
                                 "(custom code); this tool loads diffusers and transformers classes only: remove "
                                 "the entry, or pass another folder")


def _read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # one line, as esd.formats.records.read_json
        message = " ".join(str(e).split())
        raise ModelLoadError(f"model folder {name!r}: {str(path)!r} is unreadable "
                             f"({type(e).__name__}{': ' + message if message else ''})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"model folder {name!r}: {path.name} is not a JSON object "
                             f"(it holds a {type(config).__name__})")
    return config


def _allowed_pair(library, cls, allowed) -> bool:
    if not (isinstance(library, str) and isinstance(cls, str)):
        return False
    if (library, SCHEDULER) in allowed and re.fullmatch(r"[A-Za-z0-9]+Scheduler", cls):
        found = getattr(diffusers, cls, None)
        return isinstance(found, type) and issubclass(found, SchedulerMixin)
    return (library, cls) in allowed


def check_model_index(index: dict, name: str) -> None:
    """A model_index.json (a local folder's, or a hub id's from the cache) names a pipeline this tool loads
    (:data:`PIPELINE_CLASSES`), and each component a [library, class] pair of :data:`COMPONENT_CLASSES` (or
    [null, null]); other entries are plain settings (true, a number, a string, null). Else one line naming
    the entry and the valid choices."""
    where = f"model folder {name!r}: model_index.json"
    if not isinstance(index, dict):
        raise ModelLoadError(f"{where} is not a JSON object")
    pipeline = index.get("_class_name")
    if pipeline is None:
        raise ModelLoadError(f"{where} has no _class_name; valid: {', '.join(PIPELINE_CLASSES)}")
    if not (isinstance(pipeline, str) and pipeline in PIPELINE_CLASSES):
        raise ModelLoadError(f"{where}'s _class_name {pipeline!r} is not a pipeline this tool loads; valid: "
                             f"{', '.join(PIPELINE_CLASSES)}")
    for key, value in index.items():
        allowed = COMPONENT_CLASSES.get(key)
        if allowed is None and not isinstance(value, (list, tuple, dict)):
            continue  # a setting (requires_safety_checker, force_zeros_for_empty_prompt, _diffusers_version)
        if allowed is None:
            raise ModelLoadError(f"{where} entry {key!r} is {value!r}, not a component this tool loads; valid "
                                 f"components: {', '.join(COMPONENT_CLASSES)} (settings: true, a number, a string "
                                 "or null)")
        pair = list(value) if isinstance(value, (list, tuple)) else None
        if pair == [None, None] or (pair is not None and len(pair) == 2 and _allowed_pair(*pair, allowed)):
            continue
        choices = " or ".join(repr([lib, cls]) for lib, cls in allowed)
        raise ModelLoadError(f"{where} entry {key!r} is {value!r}, not a component this tool loads; valid: "
                             f"{choices} or [null, null]")


def source_family(base_model: str) -> Family | None:
    """The family of a diffusers folder or cached hub id from its configs alone (nothing is loaded): the
    pipeline class in model_index.json, and for the UNets the UNet's config.json. None when they cannot be read
    (a hub id not in the cache): the family is then checked once the model is loaded. A local folder that is
    missing or not one this tool loads (:func:`check_model_folder`) is refused here."""
    source = resolve_source(base_model)
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception:  # noqa: BLE001 - unreadable here; load_models says why
        return None
    check_model_index(index, base_model)
    candidates = families_of_pipeline(index["_class_name"])
    if len(candidates) == 1:
        return candidates[0]
    try:
        config = candidates[0].denoiser_class.load_config(source, subfolder=candidates[0].subfolder)
    except Exception:  # noqa: BLE001 - unreadable here; load_models says why
        return None
    return family_of_config(candidates, config)


def source_denoiser_config(base_model: str, family: Family) -> dict:
    """The denoiser's config.json of a model folder or cached hub id of ``family``."""
    return family.denoiser_class.load_config(resolve_source(base_model), subfolder=family.subfolder)


def native_resolution_of(base_model: str) -> int:
    """The model's native image size from its configs alone (no weights): the denoiser config's sample_size
    (FluxPipeline's default for FLUX), times the VAE factor."""
    family = source_family(base_model)
    if family is None:
        raise ModelLoadError(f"could not read the configs of {base_model!r}: not a local diffusers folder and not "
                             "in the hub cache; offline, pass a local folder or 'toy'")
    sample_size = family.sample_size(source_denoiser_config(base_model, family))
    return sample_size * vae_scale_factor_of(resolve_source(base_model))


def pipeline_load_kwargs(index: dict) -> dict:
    """from_pretrained's arguments for a folder of this model_index.json beyond its own (an SD3 folder saved
    without its optional T5)."""
    candidates = families_of_pipeline(index.get("_class_name"))
    return candidates[0].load_kwargs(index) if candidates else {}


def checkpoint_family(ckpt_path: str) -> Family:
    """The family of an original single-file checkpoint from its tensor names and shapes alone: the SD3/FLUX
    transformers by their blocks' names; SDXL by its UNet's ``label_emb`` (the original name of the text-time
    added conditioning that marks an SDXL UNet config); SD 2.x by its transformers' Linear ``proj_in`` (SD 1.x's
    is a 1x1 conv: the config's ``use_linear_projection``)."""
    flow = flow_checkpoint_family(ckpt_path)
    if flow is not None:
        return FAMILIES[flow]
    shapes = checkpoint_shapes(ckpt_path)
    xl = any(key.startswith(f"{LDM_UNET_PREFIX}label_emb.") for key in shapes)
    proj_in = [shape for key, shape in shapes.items() if key.endswith(".proj_in.weight")]
    config = {"addition_embed_type": "text_time" if xl else None,
              "use_linear_projection": bool(proj_in) and len(proj_in[0]) == 2}
    return family_of_config([f for f in FAMILIES.values() if not f.flow], config)


def single_file_family(ckpt_path: str, ckpt_config: str | None) -> Family:
    """The family of an original single file (:func:`checkpoint_family`); a transformer file must come with a
    ``ckpt_config`` pipeline of its own family (its text encoders, tokenizers, scheduler and VAE are not in the
    file)."""
    if not os.path.isfile(ckpt_path):
        raise ModelLoadError(f"checkpoint file {ckpt_path!r} does not exist")
    if ckpt_config is not None:
        resolve_source(ckpt_config)  # a local folder: checked (check_model_folder) before anything reads it
    try:
        family = checkpoint_family(ckpt_path)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ModelLoadError(f"could not read checkpoint {ckpt_path!r} ({type(e).__name__}: {e})") from e
    if not family.flow:
        return family
    pipeline = FLOW_CHECKPOINTS[family.name].pipeline
    if ckpt_config is None:
        raise ModelLoadError(f"--ckpt_path {ckpt_path!r} is an original {family} transformer checkpoint without "
                             f"text encoders or VAE; pass --ckpt_config with a {pipeline} folder or hub id")
    config_family = source_family(ckpt_config)  # None: a hub id not cached; loading says why
    if config_family is not None and config_family.denoiser != family.denoiser:
        raise ModelLoadError(f"--ckpt_path {ckpt_path!r} is an original {family} checkpoint but --ckpt_config "
                             f"{ckpt_config!r} is a {config_family.denoiser} pipeline; pass a {pipeline} folder or "
                             "hub id")
    return family


def vae_scale_factor_of(source: str) -> int:
    """Downsampling factor of the VAE, read from its config alone (no weights)."""
    try:
        cfg = AutoencoderKL.load_config(source, subfolder="vae")
    except Exception as e:  # noqa: BLE001 - re-raised with the flag to use
        raise ModelLoadError(f"could not read the VAE config of {source!r} ({type(e).__name__}: {e}); "
                             "offline, pass a local diffusers folder as --base_model or 'toy'") from e
    return 2 ** (len(cfg["block_out_channels"]) - 1)
