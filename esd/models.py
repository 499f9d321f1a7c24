"""Loading Stable Diffusion models: hub ids, local diffusers folders, the toy
model, and original single-file checkpoints.

Everything downstream works on :class:`DiffusionModels`, whatever the source.
The family (SD 1.x, SD 2.x, SDXL), the prediction type and the native
resolution are read from the loaded configs, never assumed.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"
TOY_DIT_DIR = Path(__file__).parent / "toy" / "model-dit"
# The shipped toy models by name, and the command that rebuilds each.
TOY_MODELS = {"toy": (TOY_MODEL_DIR, "esd toy-train"), "toy-dit": (TOY_DIT_DIR, "esd toy-train-dit")}
FAMILIES = ("sd1", "sd2", "sdxl")


class ModelLoadError(ValueError):
    """A model or weights file could not be loaded; the message says what to pass instead."""


@dataclass
class DiffusionModels:
    """The parts of a Stable Diffusion pipeline that ESD needs."""

    unet: UNet2DConditionModel
    scheduler: SchedulerMixin  # the model's own class (PNDM for SD1.4); the trainer builds its sampler from it
    tokenizers: list  # one per text encoder (two for SDXL)
    text_encoders: list
    vae: AutoencoderKL | None
    vae_scale_factor: int
    source: str  # what the user passed, for records and error messages
    family: str = field(init=False)

    def __post_init__(self):
        self.family = detect_family(self.unet)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


def detect_family(unet: UNet2DConditionModel) -> str:
    """SDXL has the text-time added conditioning; SD 2.x uses linear projections in
    its transformers (and head-dim lists); SD 1.x is the rest."""
    if unet.config.addition_embed_type == "text_time":
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
        return str(path)
    return base_model


def load_pipeline(base_model: str, safety_checker: bool = False, pipeline_class=DiffusionPipeline):
    """The base model's diffusers pipeline (as ``pipeline_class``; default: the class its
    model_index.json names); without ``safety_checker`` a pipeline that has one is loaded without it
    (the erasure is what is measured, not the filter)."""
    source = resolve_source(base_model)
    extra = {"safety_checker": None, "requires_safety_checker": False} \
        if "safety_checker" in DiffusionPipeline.load_config(source) and not safety_checker else {}
    return pipeline_class.from_pretrained(source, **extra)


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
                ckpt_config: str | None = None, load_vae: bool = False) -> DiffusionModels:
    """Load UNet, scheduler (its own class), tokenizers, text encoders and optionally the VAE.

    ``ckpt_path`` is an original single-file checkpoint (``sd-v1-4-full-ema.ckpt``
    or ``.safetensors``), read through diffusers' single-file loading;
    ``ckpt_config`` names a local diffusers folder (or hub id) holding the matching
    configs, so that loading works offline.
    """
    if ckpt_path is not None:
        return _load_single_file(ckpt_path, ckpt_config, load_vae)
    source = resolve_source(base_model)
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load base model {base_model!r} ({type(e).__name__}): not a local diffusers "
                             "folder and not in the hub cache; offline, pass a local folder as --base_model, "
                             "'toy', or --ckpt_path with --ckpt_config") from e
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


def _load_single_file(ckpt_path: str, ckpt_config: str | None, load_vae: bool) -> DiffusionModels:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    if not os.path.isfile(ckpt_path):
        raise ModelLoadError(f"checkpoint file {ckpt_path!r} does not exist")
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
    """The parts of a loaded pipeline that training uses (SDXL's second tokenizer and text encoder too)."""
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return DiffusionModels(pipe.unet, pipe.scheduler, tokenizers, text_encoders, vae, factor, source)


def parse_devices(devices: str | None) -> list[torch.device]:
    """``"0,1"`` -> two CUDA devices; ``"cpu"``; ``None`` -> first GPU if any, else CPU."""
    if devices is None:
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    out = []
    for item in devices.split(","):
        item = item.strip()
        if item == "cpu":
            out.append(torch.device("cpu"))
        elif item.isdigit() or item.startswith("cuda"):
            index = int(item.removeprefix("cuda").lstrip(":") or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(f"device {item!r} requested but {torch.cuda.device_count()} CUDA devices are "
                                 "available; use 'cpu' or a valid GPU index")
            out.append(torch.device(f"cuda:{index}"))
        else:
            raise ValueError(f"bad device {item!r}; use GPU indices such as '0' or '0,1', or 'cpu'")
    if len(out) > 2:
        raise ValueError("--devices takes at most two devices: trained model, frozen model")
    return out
