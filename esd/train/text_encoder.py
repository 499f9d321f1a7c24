"""Training the text encoder beside the UNet (``--train_text_encoder``).

AdvUnlearn (Zhang et al. 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models") finds the text encoder, not the UNet, to be the module that adversarial erasure should
robustify. Here it is trained together with the train method's UNet parameters: theta is (the trained text
encoder, the trained UNet), theta* the model as it was. What changes in the ESD iteration:

* the trained model's conditioning is the trained text encoder's output, computed with gradient at every step
  (for the concept, and in robust ESD for the adversarial and retain prompts); theta*'s predictions keep the
  prompts encoded once by the frozen text encoder, before training;
* trained: the encoder's transformer layers and final layer norm (:func:`trainable_names`). The token and
  position embeddings stay the base model's, so the attacks' vocabulary (the embedding table the prefix attack
  projects onto) and textual-inversion files mean what they meant;
* the weights file holds the text encoder's tensors beside the UNet's, under ``text_encoder.``
  (:data:`PREFIX`); :func:`esd.formats.weights.apply_erased_weights` loads them into a pipeline's text encoder and
  refuses the file, in one line, where no text encoder is given.

One CLIP text encoder only (SD 1.x, 2.x), as the attacks.
"""

import math
from dataclasses import dataclass

import torch

from esd.core.sampler import Conditioning
from esd.core.settings import setting
from esd.families.flow import tokenize
from esd.formats.weights import TEXT_ENCODER_PREFIX
from esd.train.extension import Extension

PREFIX = TEXT_ENCODER_PREFIX  # of the text encoder's tensors in a weights file


@dataclass
class TextEncoderSettings:
    """Training the text encoder too (``--train_text_encoder``): off by default."""

    train_text_encoder: bool = setting(False, "also train the text encoder's transformer layers (AdvUnlearn's robust "
                                       "module; SD 1.x/2.x, --save_format trained: its tensors are saved beside the "
                                       "UNet's under 'text_encoder.')")
    text_encoder_lr: float | None = setting(None, "with --train_text_encoder: the text encoder's learning rate "
                                            "(default: --lr)")


def trainable_names(encoder: torch.nn.Module) -> list[str]:
    """The parameters that train: every transformer layer and the final layer norm, not the embeddings."""
    return [n for n, _ in encoder.named_parameters() if ".layers." in n or "final_layer_norm" in n]


def check_text_encoder_settings(cfg) -> None:
    """One line per setting --train_text_encoder cannot work with, before any model loads."""
    if not cfg.train_text_encoder:
        if cfg.text_encoder_lr is not None:
            raise ValueError("--text_encoder_lr is the rate of --train_text_encoder, which is not set")
        return
    lr = cfg.text_encoder_lr
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"--text_encoder_lr must be a positive number, not {lr} (a finite rate > 0, as --lr)")
    if cfg.lora_rank is not None:
        raise ValueError("--train_text_encoder trains the text encoder's own weights; it cannot be combined with "
                         "--lora_rank")
    if cfg.sampler_model == "trained":
        raise ValueError("--train_text_encoder needs x_t sampled by the frozen model (--sampler_model frozen, as "
                         "--preset fast and official do): the trained sampler would see the frozen encoder's prompts")
    if cfg.save_format != "trained":
        raise ValueError(f"--train_text_encoder saves the UNet's and the text encoder's trained tensors in one file: "
                         f"it needs --save_format trained, not {cfg.save_format!r} (a full-UNet .pt has no place "
                         f"for the text encoder)")
    if cfg.export:
        raise ValueError("--train_text_encoder: --export writes the UNet alone and would lose the text encoder's "
                         "erasure; load the weights file with esd generate or ESDPipeline instead")

    check_one_text_encoder(cfg, "--train_text_encoder")


class TrainedTextEncoder(Extension):
    """The trained text encoder of one run (--train_text_encoder): its trained parameters (fp32) and the
    conditioning it gives theta."""

    name = "text_encoder"

    @classmethod
    def from_settings(cls, cfg, models) -> "TrainedTextEncoder | None":
        """The run's, on the loaded ``models`` (before their text encoders are released); None when off."""
        if not cfg.train_text_encoder:
            return None
        check_loaded_text_encoders(models, "--train_text_encoder")
        return cls(models.text_encoders[0], models.tokenizers[0], cfg.words, cfg.erase_from, cfg.text_encoder_lr)

    def __init__(self, encoder: torch.nn.Module, tokenizer, words: list[str], erase_from: str | None,
                 lr: float | None = None):
        """``encoder`` is trained in place; ``words`` and ``erase_from`` are the erasure's prompts; ``lr`` its
        learning rate (None: --lr)."""
        self.encoder, self.tokenizer, self.lr = encoder, tokenizer, lr
        self.names = trainable_names(encoder)
        encoder.requires_grad_(False)
        params = dict(encoder.named_parameters())
        for n in self.names:  # fp32 even when the model was loaded in the low-precision dtype
            params[n].data = params[n].data.float()
            params[n].requires_grad_(True)
        self.params = [params[n] for n in self.names]
        self.erase_from = erase_from is not None
        self.source_ids = self.ids([erase_from] if self.erase_from else words)

    def ids(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) token ids, as the pipelines and :func:`esd.families.encode.encode_prompts` tokenize."""
        return tokenize(self.tokenizer, prompts, self.encoder.device)

    def __call__(self, ids: torch.Tensor) -> Conditioning:
        """The trained encoder's last hidden state for ``ids`` (what SD 1.x/2.x condition on), with gradient."""
        return Conditioning(self.encoder(ids)[0])

    def source(self, concept: torch.Tensor) -> Conditioning:
        """What the trained model sees for a batch of concept indices (B,): the concept word's (or
        --erase_from's) conditioning from the trained encoder; :meth:`PromptConditioning.source`'s counterpart."""
        rows = torch.zeros_like(concept) if self.erase_from else concept
        return self(self.source_ids[rows.to(self.source_ids.device)])

    @property
    def keys(self) -> list[str]:
        """The names its tensors have in a weights file or checkpoint."""
        return [PREFIX + n for n in self.names]

    def state(self) -> dict:
        """Its trained tensors under :data:`PREFIX` (fp32, on the CPU)."""
        return {k: p.detach().float().cpu() for k, p in zip(self.keys, self.params)}

    def load(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in zip(self.keys, self.params):
                p.copy_(state[k])

    # -- the recipe's hooks (see esd.train.extension.Extension) --
    def param_group(self):
        return self.params, self.lr

    def conditioning(self):
        return self  # theta encodes its own prompts at every step; theta*'s stay the ones encoded at setup

    def header(self) -> str:
        return f" (the text encoder's: {len(self.names)})"

    def trained_tensors(self) -> dict:
        return self.state()

    def load_trained(self, tensors: dict) -> None:
        self.load(tensors)

    def record_entries(self) -> dict:
        return {"text_encoder_tensors": len(self.names)}


def check_one_text_encoder(cfg, flag_name: str) -> None:
    """The attacks and --train_text_encoder work through one text encoder (Family.one_text_encoder): SDXL (two,
    plus pooled embeddings) and SD3/FLUX (CLIP and T5) are refused, naming ``flag_name``. A local folder or a
    single file is checked now (configs, tensor names); other sources once loaded (see RobustESD and
    ESDTrainer.setup)."""
    flag, model = ("--base_model", cfg.base_model) if cfg.ckpt_path is None else ("--ckpt_path", cfg.ckpt_path)
    family = cfg.family
    if family is not None and not family.one_text_encoder:
        raise ValueError(f"{flag_name} supports SD 1.x and 2.x models (one text encoder); {flag} {model!r} is "
                         f"{family.phrase}")


def check_loaded_text_encoders(models, flag_name: str) -> None:
    """Once loaded, what :func:`check_one_text_encoder` could not read before (a hub id's SDXL): one text
    encoder, or ``flag_name`` is refused in one line."""
    if len(models.text_encoders) != 1:
        raise ValueError(f"{flag_name} supports SD 1.x and 2.x models (one text encoder); {models.source} is "
                         f"{models.family.name} with {len(models.text_encoders)}")
