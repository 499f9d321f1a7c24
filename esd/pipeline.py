"""``ESDPipeline``: erase (or load an erasure) and generate, in one object.

This is the contract under which benchmarks such as eval-unlearn call an ``esd``
package; it runs on the same engine as ``esd train``."""

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .config import DEFAULT_PRESET, ESDConfig
from .models import DEFAULT_BASE_MODEL, DiffusionModels, resolve_source
from .train import ESDTrainer
from .weights import apply_erased_weights


class ESDPipeline:
    """A diffusers text-to-image pipeline whose UNet has a concept erased.

    With ``load_path``, erased weights (any format :func:`esd.load_erased_unet` reads)
    are loaded strictly; otherwise, with ``erase_concept``, ESD trains for
    ``train_steps`` iterations (and saves to ``save_path`` when given). ``preset`` is one of
    :data:`esd.config.PRESETS`; ``train_steps``, ``learning_rate`` and ``negative_guidance``
    default to the preset's values."""

    def __init__(self, model_id: str = DEFAULT_BASE_MODEL, device: str | None = None,
                 erase_concept: str | None = None, erase_from: str | None = None, train_method: str = "xattn",
                 negative_guidance: float | None = None, train_steps: int | None = None,
                 learning_rate: float | None = None, use_fp16: bool = False, save_path: str | None = None,
                 load_path: str | None = None, preset: str = DEFAULT_PRESET):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if use_fp16 else torch.float32
        source = resolve_source(model_id)
        index = DiffusionPipeline.load_config(source)
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        self.pipe = DiffusionPipeline.from_pretrained(source, **extra)
        self.pipe.set_progress_bar_config(disable=True)
        if load_path is not None:
            apply_erased_weights(self.pipe.unet, load_path, base_model=model_id)
        elif erase_concept:
            self._erase(model_id, erase_concept, erase_from, train_method, negative_guidance, train_steps,
                        learning_rate, use_fp16, save_path, preset)
        elif erase_concept is not None:
            raise ValueError("erase_concept is empty")
        self.pipe.to(self.device, self.dtype)

    def _erase(self, model_id, concept, erase_from, method, eta, steps, lr, use_fp16, save_path, preset):
        p = self.pipe
        encoders = [p.text_encoder] + ([p.text_encoder_2] if getattr(p, "text_encoder_2", None) else [])
        tokenizers = [p.tokenizer] + ([p.tokenizer_2] if getattr(p, "tokenizer_2", None) else [])
        models = DiffusionModels(p.unet, p.scheduler, tokenizers, encoders, None, p.vae_scale_factor, model_id)
        config = ESDConfig(prompt=concept, erase_from=erase_from, train_method=method, base_model=model_id,
                           preset=preset, negative_guidance=eta, iterations=steps, lr=lr,
                           mixed_precision="fp16" if use_fp16 else "no",
                           devices="cpu" if self.device.type == "cpu" else str(self.device.index or 0),
                           save_path=save_path or "models/")
        trainer = ESDTrainer(config, models)
        trainer.setup()
        result = trainer.train()
        if save_path is not None:
            trainer.save(result)
        self.output_dir = Path(result.output_dir)

    @torch.no_grad()
    def generate(self, prompts, seed: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, **kwargs) -> list:
        """Images (PIL) for ``prompts`` (a string or a list); ``seed`` makes them reproducible."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        return self.pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         generator=generator, **kwargs).images
