"""Loading Stable Diffusion models: hub ids, local diffusers folders, the toy
model, and original single-file checkpoints.

Everything downstream works on :class:`DiffusionModels`, whatever the source.
The family (SD 1.x, SD 2.x, SDXL UNets; SD3/SD3.5 and FLUX.1 transformers), the
prediction type and the native resolution are read from the loaded configs, never assumed.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FluxTransformer2DModel,
    SchedulerMixin,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .flow_checkpoint import FLOW_CHECKPOINTS, checkpoint_family, load_flow_transformer
from .methods import is_sdxl_config
from .records import read_json

DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"
TOY_DIT_DIR = Path(__file__).parent / "toy" / "model-dit"
# The shipped toy models by name, and the command that rebuilds each.
TOY_MODELS = {"toy": (TOY_MODEL_DIR, "esd toy-train"), "toy-dit": (TOY_DIT_DIR, "esd toy-train-dit")}
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
# Pipelines whose denoiser is a flow-matching transformer (model_index.json's class) -> family.
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLOW_FAMILIES = tuple(FLOW_PIPELINES.values())
# from_pretrained's dtype argument: diffusers 0.42 renamed torch_dtype to dtype (the old name warns).
DTYPE_ARGUMENT = "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42) else "torch_dtype"
FLUX_DEFAULT_SAMPLE_SIZE = 128  # latent pixels; FluxPipeline's default_sample_size (its transformer config has none)
# What a model folder's model_index.json may name (folders may come from strangers, and diffusers imports
# whatever module an entry names): the pipelines this tool loads, and per component the [library, class]
# pairs it loads; ("diffusers", SCHEDULER) stands for any of diffusers' scheduler classes. Every entry may
# also be [null, null] (a component saved without, as the toy models' safety checker).
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
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


@dataclass
class DiffusionModels:
    """The parts of a Stable Diffusion pipeline that ESD needs. ``unet`` is the denoiser: a UNet, or for SD3
    and FLUX the transformer (the field keeps its name so that every UNet path reads unchanged)."""

    unet: UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel
    scheduler: SchedulerMixin  # the model's own class (PNDM for SD1.4, flow-matching Euler for SD3/FLUX)
    tokenizers: list  # one per text encoder (two for SDXL and FLUX, two or three for SD3: CLIP-L, CLIP-G, T5)
    text_encoders: list
    vae: AutoencoderKL | None
    vae_scale_factor: int
    source: str  # what the user passed, for records and error messages
    family: str = field(init=False)

    def __post_init__(self):
        self.family = detect_family(self.unet)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample (the scheduler's config); ``flow`` for the flow-matching
        transformers, which predict the velocity v = eps - x0."""
        return "flow" if self.family in FLOW_FAMILIES else self.scheduler.config.prediction_type

    @property
    def native_resolution(self) -> int:
        sample_size = FLUX_DEFAULT_SAMPLE_SIZE if self.family == "flux" else self.unet.config.sample_size
        return sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents x_t lives in: FLUX's transformer reads them packed 2x2 (4x the channels)."""
        return self.unet.config.in_channels // (4 if self.family == "flux" else 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor, times the transformers' 2x2 patches."""
        return self.vae_scale_factor * (2 if self.family in FLOW_FAMILIES else 1)


def detect_family(unet: torch.nn.Module) -> str:
    """SD3 and FLUX by their transformer class. SDXL has the text-time added conditioning; SD 2.x uses
    linear projections in its transformers (and head-dim lists); SD 1.x is the rest."""
    if isinstance(unet, SD3Transformer2DModel):
        return "sd3"
    if isinstance(unet, FluxTransformer2DModel):
        return "flux"
    if is_sdxl_config(unet.config):
        return "sdxl"
    if unet.config.use_linear_projection:
        return "sd2"
    return "sd1"


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
        config = read_json(path)
    except ValueError as e:
        raise ModelLoadError(f"model folder {name!r}: {e}") from e
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


def load_pipeline(base_model: str, safety_checker: bool = False, pipeline_class=DiffusionPipeline):
    """The base model's diffusers pipeline (as ``pipeline_class``; default: the class its
    model_index.json names); without ``safety_checker`` a pipeline that has one is loaded without it
    (the erasure is what is measured, not the filter)."""
    source = resolve_source(base_model)
    index = DiffusionPipeline.load_config(source)
    check_model_index(index, base_model)  # a hub id's (a local folder's is checked by resolve_source)
    extra = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in index and not safety_checker else {}
    return pipeline_class.from_pretrained(source, **extra, **without_t5(index))


def load_scheduler(source: str) -> SchedulerMixin:
    """The model's own scheduler, of the class its config names (diffusers' scheduler classes only)."""
    config = DDIMScheduler.load_config(source, subfolder="scheduler")
    name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(f"{source!r}: scheduler class {name!r} is not one of diffusers' schedulers")
    return cls.from_config(config)


def vae_scale_factor_of(source: str) -> int:
    """Downsampling factor of the VAE, read from its config alone (no weights)."""
    try:
        cfg = AutoencoderKL.load_config(source, subfolder="vae")
    except Exception as e:  # noqa: BLE001 - re-raised with the flag to use
        raise ModelLoadError(f"could not read the VAE config of {source!r} ({type(e).__name__}: {e}); "
                             "offline, pass a local diffusers folder as --base_model or 'toy'") from e
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def load_models(base_model: str = DEFAULT_BASE_MODEL, ckpt_path: str | None = None,
                ckpt_config: str | None = None, load_vae: bool = False,
                torch_dtype: torch.dtype | None = None) -> DiffusionModels:
    """Load UNet, scheduler (its own class), tokenizers, text encoders and optionally the VAE.

    An SD3/SD3.5 or FLUX.1 folder (model_index.json naming ``StableDiffusion3Pipeline`` or
    ``FluxPipeline``) gives its transformer in the UNet's place; ``torch_dtype`` (transformers only)
    loads it and its text encoders in that dtype, so that FLUX.1's 12 B parameters are never held
    in fp32 (the trainer upcasts the parameters it trains).

    ``ckpt_path`` is an original single-file checkpoint (``sd-v1-4-full-ema.ckpt``
    or ``.safetensors``), read through diffusers' single-file loading;
    ``ckpt_config`` names a local diffusers folder (or hub id) holding the matching
    configs, so that loading works offline. An original SD3/SD3.5 or FLUX.1 transformer file
    needs it: see :func:`_load_flow_single_file`.
    """
    if ckpt_path is not None:
        return _load_single_file(ckpt_path, ckpt_config, load_vae, torch_dtype)
    source = resolve_source(base_model)
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load base model {base_model!r} ({type(e).__name__}): not a local diffusers "
                             "folder and not in the hub cache; offline, pass a local folder as --base_model, "
                             "'toy', or --ckpt_path with --ckpt_config") from e
    check_model_index(index, base_model)  # a hub id's (a local folder's is checked by resolve_source)
    if index["_class_name"] in FLOW_PIPELINES:
        return _load_flow_pipeline(source, base_model, index, load_vae, torch_dtype)
    is_xl = "text_encoder_2" in index
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    scheduler = load_scheduler(source)
    tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder")]
    if is_xl:
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"))
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae") if load_vae else None
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else vae_scale_factor_of(source)
    return DiffusionModels(unet, scheduler, tokenizers, text_encoders, vae, factor, base_model)


def pipeline_family(base_model: str) -> str | None:
    """``sd3`` or ``flux`` for a flow-matching transformer pipeline, ``unet`` for another diffusers
    pipeline, from model_index.json alone (nothing is loaded); None when it cannot be read (a hub id
    not in the cache): the family is then checked once the model is loaded. A local folder that is missing
    or not one this tool loads (:func:`check_model_folder`) is refused here."""
    source = resolve_source(base_model)
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception:  # noqa: BLE001 - unreadable here; load_models says why
        return None
    check_model_index(index, base_model)
    return FLOW_PIPELINES.get(index["_class_name"], "unet")


def native_resolution_of(base_model: str) -> int:
    """The model's native image size from its configs alone (no weights): the UNet's or SD3
    transformer's sample_size, FluxPipeline's default for FLUX, times the VAE factor."""
    source = resolve_source(base_model)
    family = pipeline_family(base_model)
    if family == "flux":
        sample_size = FLUX_DEFAULT_SAMPLE_SIZE
    elif family == "sd3":
        sample_size = SD3Transformer2DModel.load_config(source, subfolder="transformer")["sample_size"]
    else:
        sample_size = UNet2DConditionModel.load_config(source, subfolder="unet")["sample_size"]
    return sample_size * vae_scale_factor_of(source)


def denoiser_class(base_model: str) -> tuple[type, str]:
    """The class of the base model's denoiser and its subfolder: the UNet, or SD3's or FLUX's transformer."""
    family = pipeline_family(base_model)
    if family in FLOW_FAMILIES:
        return (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel), "transformer"
    return UNet2DConditionModel, "unet"


def load_denoiser(base_model: str, ckpt_path: str | None = None, ckpt_config: str | None = None) -> torch.nn.Module:
    """The base model's UNet, or its transformer for SD3/FLUX, alone (fp32); from ``ckpt_path`` when given."""
    if ckpt_path is not None:
        family = single_file_family(ckpt_path, ckpt_config)
        if family in FLOW_FAMILIES:
            source = resolve_source(ckpt_config)
            return load_flow_transformer(ckpt_path, family, source, os.path.isdir(source))
        return load_models(base_model, ckpt_path, ckpt_config).unet
    cls, subfolder = denoiser_class(base_model)
    return cls.from_pretrained(resolve_source(base_model), subfolder=subfolder)


def without_t5(index: dict) -> dict:
    """from_pretrained's arguments for an SD3 folder saved without its optional T5 (no ``text_encoder_3``)."""
    name = index.get("_class_name")
    t5 = index.get("text_encoder_3") or [None]
    if isinstance(name, str) and FLOW_PIPELINES.get(name) == "sd3" and isinstance(t5, list) and t5[0] is None:
        return {"text_encoder_3": None, "tokenizer_3": None}
    return {}


def _load_flow_pipeline(source: str, base_model: str, index: dict, load_vae: bool, torch_dtype) -> DiffusionModels:
    """An SD3 or FLUX pipeline's parts, loaded through its own pipeline class (which knows its tokenizer and
    encoder classes). SD3's T5 is optional: a folder whose model_index.json has no ``text_encoder_3`` loads
    without it, and the prompts get zeros in its place, as the pipeline does."""
    kwargs = {DTYPE_ARGUMENT: torch_dtype} if torch_dtype is not None else {}
    kwargs.update(without_t5(index))
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the transformer pipeline {base_model!r} ({type(e).__name__}: "
                             f"{e})") from e
    return models_from_pipeline(pipe, base_model, pipe.vae if load_vae else None)


def single_file_family(ckpt_path: str, ckpt_config: str | None) -> str:
    """``sd3`` or ``flux`` for an original SD3/SD3.5 or FLUX.1 transformer file, ``unet`` for another
    checkpoint, from its tensor names alone; a transformer file must come with a ``ckpt_config`` pipeline
    of its own family (its text encoders, tokenizers, scheduler and VAE are not in the file)."""
    if not os.path.isfile(ckpt_path):
        raise ModelLoadError(f"checkpoint file {ckpt_path!r} does not exist")
    if ckpt_config is not None:
        resolve_source(ckpt_config)  # a local folder: checked (check_model_folder) before anything reads it
    try:
        family = checkpoint_family(ckpt_path)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ModelLoadError(f"could not read checkpoint {ckpt_path!r} ({type(e).__name__}: {e})") from e
    if family not in FLOW_FAMILIES:
        return family
    pipeline = FLOW_CHECKPOINTS[family][2]
    if ckpt_config is None:
        raise ModelLoadError(f"--ckpt_path {ckpt_path!r} is an original {family} transformer checkpoint without "
                             f"text encoders or VAE; pass --ckpt_config with a {pipeline} folder or hub id")
    config_family = pipeline_family(ckpt_config)  # None: a hub id not cached; loading says why
    if config_family is not None and config_family != family:
        raise ModelLoadError(f"--ckpt_path {ckpt_path!r} is an original {family} checkpoint but --ckpt_config "
                             f"{ckpt_config!r} is a {config_family} pipeline; pass a {pipeline} folder or hub id")
    return family


def _load_flow_single_file(ckpt_path: str, family: str, ckpt_config: str, load_vae: bool,
                           torch_dtype) -> DiffusionModels:
    """The transformer from the original file; text encoders, tokenizers, scheduler and VAE from the
    ``ckpt_config`` pipeline. FLUX.1's original files hold the transformer alone, as do most SD3.5
    fine-tunes. An all-in-one SD3 file also holds CLIP/T5 and VAE tensors; they are not read, the config
    folder's are used (one loading path for both families; a fine-tune that changed its text encoders needs a
    folder holding those)."""
    source = resolve_source(ckpt_config)
    local = os.path.isdir(source)  # a folder: nothing is fetched; a hub id: its cache, else the hub
    try:
        transformer = load_flow_transformer(ckpt_path, family, source, local, torch_dtype)
        index = DiffusionPipeline.load_config(source, local_files_only=local)
        kwargs = {DTYPE_ARGUMENT: torch_dtype} if torch_dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(source, transformer=transformer, local_files_only=local,
                                                 **kwargs, **without_t5(index))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the {family} checkpoint {ckpt_path!r} with --ckpt_config "
                             f"{ckpt_config!r} ({type(e).__name__}: {e})") from e
    return models_from_pipeline(pipe, ckpt_path, pipe.vae if load_vae else None)


def _load_single_file(ckpt_path: str, ckpt_config: str | None, load_vae: bool, torch_dtype=None) -> DiffusionModels:
    """An original checkpoint: SD3/SD3.5 and FLUX.1 transformers (``torch_dtype`` as for folders), or an SD
    1.x/2.x/SDXL file through diffusers' pipeline single-file loading (fp32)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    family = single_file_family(ckpt_path, ckpt_config)
    if family in FLOW_FAMILIES:
        return _load_flow_single_file(ckpt_path, family, ckpt_config, load_vae, torch_dtype)
    checkpoint = load_single_file_checkpoint(ckpt_path)
    pipeline_cls = StableDiffusionXLPipeline if infer_diffusers_model_type(checkpoint).startswith("xl") \
        else StableDiffusionPipeline
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if pipeline_cls is StableDiffusionPipeline \
        else {}
    try:
        pipe = pipeline_cls.from_single_file(ckpt_path, config=ckpt_config,
                                             local_files_only=ckpt_config is not None, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load checkpoint {ckpt_path!r} ({type(e).__name__}: {e}); offline, pass "
                             "--ckpt_config pointing at a local diffusers folder of the same model family") from e
    return models_from_pipeline(pipe, ckpt_path, pipe.vae if load_vae else None)


def models_from_pipeline(pipe, source: str, vae=None) -> DiffusionModels:
    """The parts of a loaded pipeline that training uses: its UNet or transformer, and every tokenizer and
    text encoder it has, in order (SDXL's second; SD3's CLIP-G and optional T5; FLUX's T5)."""
    names = [n for n in ("", "_2", "_3") if getattr(pipe, f"text_encoder{n}", None) is not None]
    tokenizers = [getattr(pipe, f"tokenizer{n}") for n in names]
    text_encoders = [getattr(pipe, f"text_encoder{n}") for n in names]
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return DiffusionModels(denoiser, pipe.scheduler, tokenizers, text_encoders, vae, factor, source)


DEVICE_CHOICES = "cpu, cuda, cuda:N (N a GPU index, or N alone), mps"


def check_device(device, flag: str = "--device") -> torch.device:
    """The one device a pipeline runs on: ``cpu``, ``cuda``, ``cuda:N`` (or ``N``), ``mps``, or a
    ``torch.device`` of those; None -> the first GPU if any, else the CPU. Anything else, or a device this
    machine lacks, is a one-line ValueError naming ``flag`` and the valid choices (before any model loads)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip() if isinstance(device, (str, torch.device)) else None
    match = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]+))?|([0-9]+)", text or "")
    if match is None:
        raise ValueError(f"{flag} {device!r} is not a device; valid: {DEVICE_CHOICES}")
    kind, index = (match[1], match[2]) if match[3] is None else ("cuda", match[3])
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise ValueError(f"{flag} {device!r} asks for a GPU but {count} CUDA devices are available; valid: "
                             f"cpu{', cuda:0' if count else ''}{f' to cuda:{count - 1}' if count > 1 else ''}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device!r}: MPS is not available on this machine; valid: cpu"
                         f"{', cuda' if torch.cuda.is_available() else ''}")
    return torch.device(kind if index is None else f"{kind}:{index}")


def parse_devices(devices: str | None) -> list[torch.device]:
    """``"0,1"`` -> two CUDA devices; ``"cpu"``; ``None`` -> first GPU if any, else CPU."""
    if devices is None:
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    out = []
    for item in devices.split(","):
        item = item.strip()
        if item == "cpu":
            out.append(torch.device("cpu"))
        elif re.fullmatch(r"[0-9]+|cuda(:[0-9]+)?", item):
            index = int(item.removeprefix("cuda").lstrip(":") or 0)
            if not torch.cuda.is_available():
                build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
                raise ValueError(f"device {item!r} requested but CUDA is not available ({build}); valid: 'cpu'")
            if index >= torch.cuda.device_count():
                count = torch.cuda.device_count()
                raise ValueError(f"device {item!r} requested but {count} CUDA devices are available; valid: 'cpu', "
                                 + ", ".join(f"'{i}'" for i in range(count)))
            out.append(torch.device(f"cuda:{index}"))
        else:
            raise ValueError(f"bad device {item!r}; use GPU indices such as '0' or '0,1', or 'cpu'")
    if len(out) > 2:
        raise ValueError("--devices takes at most two devices: trained model, frozen model")
    return out
