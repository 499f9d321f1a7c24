"""What every layer above asks of a model family, in one interface: :class:`Family`.

A family is sd1, sd2, sdxl, sd3 or flux. Each lives in a file of its own (:mod:`esd.families.sd`,
:mod:`~esd.families.sdxl`, :mod:`~esd.families.sd3`, :mod:`~esd.families.flux`) as one instance of a
subclass of :class:`Family`; :mod:`esd.families.registry` lists them, tells which one a loaded denoiser or a
source (a model folder's configs, a checkpoint's tensor names) holds, and checks the train methods against
it. Nothing outside this folder tests a family by name: it asks the family.
"""

from dataclasses import dataclass

import torch

from esd.core.sampler import Conditioning


def config_value(config, key):
    """A denoiser config's entry, whether the config is config.json as a dict or a model's ``config``."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


@dataclass(frozen=True)
class KohyaLabels:
    """How kohya-ss (and AUTOMATIC1111, which reads its labels) names a family's LoRA: ``ss_base_model_version``,
    ``ss_v2``, and whether module names are the original ``sgm`` ones (SDXL) rather than diffusers'."""

    base_version: str
    v2: bool = False
    sgm_names: bool = False


@dataclass(frozen=True, eq=False)
class Family:
    """One model family. The fields are facts of the family; the methods are the model calls whose
    code differs between families (prompt encoding, the denoiser's call, what is read from its config)."""

    name: str  # sd1, sd2, sdxl, sd3, flux: records, messages
    phrase: str  # how a message names a model of it: "SDXL", "a flux transformer"
    # The denoiser: its architecture (the key its train methods and messages share), what a message calls it,
    # its diffusers class, and its folder in a pipeline (also the pipeline's keyword for it).
    denoiser: str  # unet, sd3, flux
    denoiser_title: str
    denoiser_word: str  # the denoiser in a sentence: UNet, transformer
    denoiser_class: type
    subfolder: str  # unet or transformer
    pipeline_classes: tuple[str, ...]  # the model_index.json _class_name of its diffusers folders
    # The method table's parameter layouts this denoiser has (esd.core.methods.TrainMethod.layouts).
    layouts: tuple[str, ...]
    esd_x: str  # its ESD-x: the method that erases a style
    generation_scheduler: str = "lms"  # esd generate's default --scheduler: the paper's evaluation's LMS
    flow: bool = False  # flow matching: x_t = (1 - s) x0 + s eps, the denoiser predicts v = eps - x0
    patch: int = 1  # the denoiser's patch size: image sizes are multiples of the VAE factor times this
    packed_channels: int = 1  # the denoiser's in_channels over the VAE latents' (FLUX packs 2x2 patches)
    true_cfg: bool = True  # samples with classifier-free guidance (two passes); False: guidance embedded/distilled
    linspace_sigmas: bool = False  # its pipeline samples on sigmas linspace(1, 1/N, N) (FluxPipeline)
    one_text_encoder: bool = False  # the attacks and --train_text_encoder work through one CLIP text encoder
    blocks_only_official: bool = False  # esd-u/esd-all select the official SDXL script's layers
    kohya: KohyaLabels | None = None  # None: LoRAs in diffusers' transformer layout (lora_A/lora_B, no alphas)
    # The single-file writer's text encoders, each (HF CLIP or OpenCLIP, its prefix); None: no single-file writer.
    ldm_text_encoders: tuple[tuple[str, str], ...] | None = None
    official_script: str = "esd_sd.py"  # the official code's script whose settings --preset official takes
    # Settings that default otherwise on this family (an explicit flag still wins): FLUX's memory path.
    training_defaults: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        if isinstance(other, str):  # a family is one object: `family == "sdxl"` would be False, silently
            raise TypeError(f"a Family is compared with the string {other!r}; ask the family (or its .name)")
        return self is other

    __hash__ = object.__hash__

    # -- recognising the family ------------------------------------------------------------------
    def holds(self, denoiser: torch.nn.Module) -> bool:
        """Whether a loaded denoiser is of this family."""
        return isinstance(denoiser, self.denoiser_class) and self.has_config(denoiser.config)

    def has_config(self, config) -> bool:
        """Whether a denoiser config (config.json as a dict, or a model's ``config``) of this family's class is
        this family's (the UNet families tell each other apart by it)."""
        return True

    def sample_size(self, config) -> int:
        """The native latent size from the denoiser's config."""
        return config["sample_size"] if isinstance(config, dict) else config.sample_size

    def load_kwargs(self, index: dict) -> dict:
        """from_pretrained's arguments for a folder of this family beyond those its model_index.json gives."""
        return {}

    # -- calling the model -----------------------------------------------------------------------
    def encode(self, tokenizers: list, text_encoders: list, denoiser: torch.nn.Module, prompts: list[str],
               image_size: int, zero_empty: bool = False, guidance: float | None = None) -> Conditioning:
        """The prompts' conditioning, as the family's diffusers pipeline encodes them (see
        :func:`esd.families.encode.encode_prompts` for ``zero_empty`` and ``guidance``)."""
        raise NotImplementedError

    def sampler_uncond_zeros(self, sdxl_uncond: str) -> bool:
        """Whether the sampler's unconditional branch is zeros where e0's is the encoded "" (the official SDXL
        script's --sdxl_uncond official)."""
        return False

    def call(self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
             params: dict | None = None) -> torch.Tensor:
        """The denoiser's raw prediction (epsilon, v or x0 per its prediction type; the velocity for flow
        models). With ``params``, those tensors replace the module's own (theta* through ``functional_call``)."""
        raise NotImplementedError

    def before_training(self, denoiser: torch.nn.Module, text_encoders: list):
        """A change of the denoiser that makes training cheaper at the same result (SD3 without T5: its 256
        zero tokens as one); returns what :meth:`after_training` needs to undo it, or None."""
        return None

    def after_training(self, denoiser: torch.nn.Module, state) -> None:
        """Undo :meth:`before_training` (``state`` is what it returned; None: nothing was changed)."""

    # -- writing ---------------------------------------------------------------------------------
    def assemble_pipeline(self, models, denoiser: torch.nn.Module):
        """The family's diffusers pipeline from loaded parts (a single-file base, which has no folder to load
        the pipeline from). None: the family is saved from its folder only."""
        return None
