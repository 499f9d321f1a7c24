"""``ESDPipeline``: erase (or load an erasure) and generate, in one object.

This is the contract under which benchmarks such as eval-unlearn (its ``ESDTechnique``) call an
``esd`` package; it runs on the same engine as ``esd train``."""

import math
import numbers
import os
from pathlib import Path

import torch

from esd.core.devices import check_device
from esd.families.models import load_pipeline, models_from_pipeline
from esd.families.sources import DEFAULT_BASE_MODEL
from esd.formats.prompt_csv import MAX_SEED
from esd.formats.records import check_name, check_output_folder
from esd.formats.weights import apply_erased_weights, run_weight_files
from esd.train.config import ESDConfig
from esd.train.modelcard import write_model_card
from esd.train.presets import DEFAULT_PRESET, PRESETS
from esd.train.recipe import ESDTrainer

# save_path's suffix -> the trainer's save_format: the whole UNet state dict (the published ESD weights,
# what the official code writes) or only the trained parameters.
SAVE_SUFFIXES = {".pt": "full", ".safetensors": "trained"}


def _check_integer(name: str, value, low: int, optional: bool = False) -> None:
    """An integer (numpy's too, as a seed read from a CSV is; a bool is not one) >= ``low``; None too when
    ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")


def _check_number(name: str, value, rule: str, ok, optional: bool = False) -> None:
    """A finite real number (numpy's too; a bool is not one) for which ``ok`` holds; None too when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}{' or None' if optional else ''}, got {value!r}")


def _check_text(name: str, value, what: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} {value!r} is not a string; {what}")


class _UnsavedTrainer(ESDTrainer):
    """A trainer whose outputs are never written (no save_path): no run folder to check."""

    def _check_output_dir(self) -> None:
        pass


class ESDPipeline:
    """A diffusers text-to-image pipeline whose UNet has a concept erased.

    With ``load_path``, erased weights (any format :func:`esd.load_erased_unet` reads) are loaded
    strictly and nothing trains; otherwise ESD erases ``erase_concept`` (from ``erase_from``, default
    the concept itself) for ``train_steps`` iterations; with neither, it is the base model.

    The arguments are eval-unlearn's (``ESDTechnique``), which follow the current official code:

    * ``negative_guidance`` is the official code's eta (esd_sd.py, default 2.0), which is the paper's
      and ``esd train``'s eta + 1: 2.0 erases with our eta = 1. None: the preset's (2.0 for each; 1.0,
      esd_sdxl.py's, for ``official`` on SDXL).
    * ``use_fp16`` (default True) casts the frozen weights and the generating pipeline to fp16 on CUDA
      only; on the CPU everything stays fp32.
    * ``save_path`` is the weights file to write: ``.pt`` (the whole UNet state dict, the published ESD
      weights' format) or ``.safetensors`` (the trained parameters only). An existing file is never
      replaced. Its records (args.json, loss.csv, loss.png, README.md) go to the folder beside it named
      after its stem (``out/esd.pt`` -> ``out/esd/``). The same path as ``load_path`` reloads it.

    ``preset`` is one of :data:`esd.train.presets.PRESETS`; ``train_steps`` and ``learning_rate`` default to
    its values. ``output_dir`` is the run's records folder (None when nothing was saved)."""

    def __init__(self, model_id: str = DEFAULT_BASE_MODEL, device: str | None = None,
                 erase_concept: str | None = None, erase_from: str | None = None, train_method: str = "xattn",
                 negative_guidance: float | None = None, train_steps: int | None = None,
                 learning_rate: float | None = None, use_fp16: bool = True, save_path: str | None = None,
                 load_path: str | None = None, preset: str = DEFAULT_PRESET):
        # Every argument checked, one line each, before any model loads.
        if not (isinstance(model_id, str) and model_id.strip()):
            raise ValueError(f"model_id {model_id!r} is not a model; pass a hub id such as "
                             f"{DEFAULT_BASE_MODEL!r}, a local diffusers folder, or 'toy'")
        _check_text("erase_concept", erase_concept, "name the concept to erase (e.g. 'Van Gogh'), or pass None "
                    "(with load_path to load an erasure, or neither for the base model)")
        _check_text("erase_from", erase_from, "name the prompt to erase the concept from, or pass None (the "
                    "concept itself)")
        _check_text("train_method", train_method, "pass a train method such as 'xattn' or 'noxattn'")
        _check_number("negative_guidance", negative_guidance, "a finite number", lambda v: True, optional=True)
        _check_integer("train_steps", train_steps, 1, optional=True)
        _check_number("learning_rate", learning_rate, "a finite number > 0", lambda v: v > 0, optional=True)
        if not isinstance(use_fp16, bool):
            raise ValueError(f"use_fp16 must be True or False, got {use_fp16!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is not one of: {', '.join(PRESETS)}")
        if save_path is not None and erase_concept is None and load_path is None:
            raise ValueError(f"save_path {save_path!r} is given without erase_concept: nothing is erased, so "
                             "nothing would be saved; pass erase_concept to erase and save, or drop save_path")
        if load_path is not None and not Path(load_path).is_file():
            raise ValueError(f"load_path {load_path!r} does not exist; pass erased weights (.pt, .safetensors, "
                             "CompVis .ckpt), or erase_concept to erase")
        self.device = check_device(device, "device")
        self.dtype = torch.float16 if use_fp16 and self.device.type == "cuda" else torch.float32
        self.output_dir = None
        trainer = None
        if load_path is None and erase_concept is not None:
            if not erase_concept.strip():
                raise ValueError(f"erase_concept {erase_concept!r} is empty; name the concept to erase, or pass "
                                 "load_path to load an erasure (or neither, for the base model)")
            # Every check before the model loads: the settings, then where the weights and records go.
            save = {} if save_path is None else self._save_settings(save_path)
            eta = None if negative_guidance is None else float(negative_guidance) - 1
            train_steps = None if train_steps is None else int(train_steps)  # numpy's integers too
            learning_rate = None if learning_rate is None else float(learning_rate)
            config = ESDConfig(prompt=erase_concept, erase_from=erase_from, train_method=train_method,
                               base_model=model_id, preset=preset, negative_guidance=eta, iterations=train_steps,
                               lr=learning_rate, mixed_precision="fp16" if self.dtype == torch.float16 else "no",
                               devices="cpu" if self.device.type == "cpu" else str(self.device.index or 0), **save)
            trainer = ESDTrainer(config) if save else _UnsavedTrainer(config)
        self.pipe = load_pipeline(model_id)
        self.pipe.set_progress_bar_config(disable=True)
        if load_path is not None:
            apply_erased_weights(self.pipe.unet, load_path, base_model=model_id,
                                 text_encoder=getattr(self.pipe, "text_encoder", None))
        elif trainer is not None:
            self._erase(trainer, None if save_path is None else Path(save_path))
        self.pipe.to(self.device, self.dtype)

    @staticmethod
    def _save_settings(save_path: str) -> dict:
        """The ESDConfig settings that write the weights file ``save_path`` (a new .pt or .safetensors file
        in a writable folder) and its records folder beside it."""
        path = Path(save_path)
        if path.suffix not in SAVE_SUFFIXES:
            raise ValueError(f"save_path {save_path!r} must name a weights file ending in "
                             f"{' or '.join(SAVE_SUFFIXES)}")
        if path.exists():
            raise ValueError(f"save_path {save_path!r} already exists; pass it as load_path to use it, or "
                             "name a new file")
        check_name(path.stem, "save_path's file name")
        check_output_folder(path.parent, "save_path")
        return {"save_path": str(path.parent), "name": path.stem, "save_format": SAVE_SUFFIXES[path.suffix]}

    def _erase(self, trainer: ESDTrainer, save_path: Path | None) -> None:
        trainer.models = models_from_pipeline(self.pipe, trainer.config.base_model)
        trainer.setup()
        result = trainer.train()
        if save_path is not None:
            out = trainer.save(result)
            written = run_weight_files(out)[SAVE_SUFFIXES[save_path.suffix]]
            os.replace(written, save_path)  # the same file system: the file appears whole or not at all
            write_model_card(out, weights=[save_path])
            self.output_dir = out

    @torch.no_grad()
    def generate(self, prompts, seed: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, **kwargs) -> list:
        """Images (PIL) for ``prompts`` (a string or a list); ``seed`` makes them reproducible."""
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string or a list of strings, got {prompts!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts [] is empty; pass a prompt string or a non-empty list of prompt strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] {prompt!r} is not a string; pass prompt strings")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < MAX_SEED):
            raise ValueError(f"seed must be an integer 0 <= seed < 2**53 or None, got {seed!r}")
        _check_integer("num_inference_steps", num_inference_steps, 1)
        _check_number("guidance_scale", guidance_scale, "a finite number >= 0", lambda v: v >= 0)
        generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
        return self.pipe(prompts, num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
                         generator=generator, **kwargs).images
