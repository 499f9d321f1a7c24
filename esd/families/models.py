"""Loading Stable Diffusion models: hub ids, local diffusers folders, the toy
model, and original single-file checkpoints.

Everything downstream works on :class:`DiffusionModels`, whatever the source.
The family (SD 1.x, SD 2.x, SDXL UNets; SD3/SD3.5 and FLUX.1 transformers), the
prediction type and the native resolution are read from the loaded configs, never assumed.
"""

import inspect
import os
from dataclasses import dataclass, field

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

from esd.families.family import Family
from esd.families.flow_single_file import load_flow_transformer
from esd.families.registry import denoiser_of, detect_family, families_of_pipeline
from esd.families.sources import (
    DEFAULT_BASE_MODEL,
    ModelLoadError,
    check_model_index,
    pipeline_load_kwargs,
    resolve_source,
    single_file_family,
    source_family,
    vae_scale_factor_of,
)

# from_pretrained's dtype argument: diffusers 0.42 renamed torch_dtype to dtype (the old name warns).
DTYPE_ARGUMENT = "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42) else "torch_dtype"


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
    family: Family = field(init=False)  # read from the denoiser (esd.families.registry.detect_family)

    def __post_init__(self):
        self.family = detect_family(self.unet)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample (the scheduler's config); ``flow`` for the flow-matching
        transformers, which predict the velocity v = eps - x0."""
        return "flow" if self.family.flow else self.scheduler.config.prediction_type

    @property
    def native_resolution(self) -> int:
        return self.family.sample_size(self.unet.config) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents x_t lives in: FLUX's transformer reads them packed 2x2 (4x the channels)."""
        return self.unet.config.in_channels // self.family.packed_channels

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor, times the transformers' 2x2 patches."""
        return self.vae_scale_factor * self.family.patch


def load_pipeline(base_model: str, safety_checker: bool = False, pipeline_class=DiffusionPipeline):
    """The base model's diffusers pipeline (as ``pipeline_class``; default: the class its
    model_index.json names); without ``safety_checker`` a pipeline that has one is loaded without it
    (the erasure is what is measured, not the filter)."""
    source = resolve_source(base_model)
    index = DiffusionPipeline.load_config(source)
    check_model_index(index, base_model)  # a hub id's (a local folder's is checked by resolve_source)
    extra = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in index and not safety_checker else {}
    return pipeline_class.from_pretrained(source, **extra, **pipeline_load_kwargs(index))


def load_scheduler(source: str) -> SchedulerMixin:
    """The model's own scheduler, of the class its config names (diffusers' scheduler classes only)."""
    config = DDIMScheduler.load_config(source, subfolder="scheduler")
    name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(f"{source!r}: scheduler class {name!r} is not one of diffusers' schedulers")
    return cls.from_config(config)


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
    if families_of_pipeline(index["_class_name"])[0].flow:
        return _load_flow_pipeline(source, base_model, index, load_vae, torch_dtype)
    # A UNet pipeline: its CLIP text encoder, and SDXL's second (with projection) where the folder has one.
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    scheduler = load_scheduler(source)
    tokenizers, text_encoders = [], []
    for n, encoder_class in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        if f"text_encoder{n}" in index:
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{n}"))
            text_encoders.append(encoder_class.from_pretrained(source, subfolder=f"text_encoder{n}"))
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae") if load_vae else None
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else vae_scale_factor_of(source)
    return DiffusionModels(unet, scheduler, tokenizers, text_encoders, vae, factor, base_model)


def denoiser_class(base_model: str) -> tuple[type, str]:
    """The class of the base model's denoiser and its subfolder: the UNet, or SD3's or FLUX's transformer."""
    family = source_family(base_model)  # None: unreadable before loading; a UNet's, as the loader then reads it
    return (family.denoiser_class, family.subfolder) if family is not None else (UNet2DConditionModel, "unet")


def load_denoiser(base_model: str, ckpt_path: str | None = None, ckpt_config: str | None = None) -> torch.nn.Module:
    """The base model's UNet, or its transformer for SD3/FLUX, alone (fp32); from ``ckpt_path`` when given."""
    if ckpt_path is not None:
        family = single_file_family(ckpt_path, ckpt_config)
        if family.flow:
            source = resolve_source(ckpt_config)
            return load_flow_transformer(ckpt_path, family.name, source, os.path.isdir(source))
        return load_models(base_model, ckpt_path, ckpt_config).unet
    cls, subfolder = denoiser_class(base_model)
    return cls.from_pretrained(resolve_source(base_model), subfolder=subfolder)


def _load_flow_pipeline(source: str, base_model: str, index: dict, load_vae: bool, torch_dtype) -> DiffusionModels:
    """An SD3 or FLUX pipeline's parts, loaded through its own pipeline class (which knows its tokenizer and
    encoder classes). SD3's T5 is optional: a folder whose model_index.json has no ``text_encoder_3`` loads
    without it, and the prompts get zeros in its place, as the pipeline does."""
    kwargs = {DTYPE_ARGUMENT: torch_dtype} if torch_dtype is not None else {}
    kwargs.update(pipeline_load_kwargs(index))
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the transformer pipeline {base_model!r} ({type(e).__name__}: "
                             f"{e})") from e
    return models_from_pipeline(pipe, base_model, pipe.vae if load_vae else None)


def _load_flow_single_file(ckpt_path: str, family: Family, ckpt_config: str, load_vae: bool,
                           torch_dtype) -> DiffusionModels:
    """The transformer from the original file; text encoders, tokenizers, scheduler and VAE from the
    ``ckpt_config`` pipeline. FLUX.1's original files hold the transformer alone, as do most SD3.5
    fine-tunes. An all-in-one SD3 file also holds CLIP/T5 and VAE tensors; they are not read, the config
    folder's are used (one loading path for both families; a fine-tune that changed its text encoders needs a
    folder holding those)."""
    source = resolve_source(ckpt_config)
    local = os.path.isdir(source)  # a folder: nothing is fetched; a hub id: its cache, else the hub
    try:
        transformer = load_flow_transformer(ckpt_path, family.name, source, local, torch_dtype)
        index = DiffusionPipeline.load_config(source, local_files_only=local)
        kwargs = {DTYPE_ARGUMENT: torch_dtype} if torch_dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(source, transformer=transformer, local_files_only=local,
                                                 **kwargs, **pipeline_load_kwargs(index))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the {family} checkpoint {ckpt_path!r} with --ckpt_config "
                             f"{ckpt_config!r} ({type(e).__name__}: {e})") from e
    return models_from_pipeline(pipe, ckpt_path, pipe.vae if load_vae else None)


def _load_single_file(ckpt_path: str, ckpt_config: str | None, load_vae: bool, torch_dtype=None) -> DiffusionModels:
    """An original checkpoint: SD3/SD3.5 and FLUX.1 transformers (``torch_dtype`` as for folders), or an SD
    1.x/2.x/SDXL file through diffusers' pipeline single-file loading (fp32)."""
    family = single_file_family(ckpt_path, ckpt_config)
    if family.flow:
        return _load_flow_single_file(ckpt_path, family, ckpt_config, load_vae, torch_dtype)
    pipeline_cls = getattr(diffusers, family.pipeline_classes[0])
    kwargs = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in inspect.signature(pipeline_cls.__init__).parameters else {}
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
    return DiffusionModels(denoiser_of(pipe), pipe.scheduler, tokenizers, text_encoders, vae, factor, source)
