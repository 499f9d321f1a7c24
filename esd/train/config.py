"""Every setting of an erasure, declared once: the choice tables and ``ESDConfig`` (the presets are
:mod:`esd.train.presets`; the extensions check their own settings, :mod:`esd.train.robust_settings` and
:mod:`esd.train.text_encoder`).

The CLI flags, ``ESDPipeline``, the demo and the benchmarks are all built from what is here.
Validation only checks (it reads file and folder names, nothing is loaded or written).
"""

import importlib.util
import math
import os
from dataclasses import dataclass, field, fields

from esd.core.devices import parse_devices
from esd.core.methods import resolve_method
from esd.core.precision import PRECISIONS, SAVE_PRECISIONS
from esd.families.family import Family
from esd.families.registry import check_method
from esd.families.schedulers import check_model_scheduler
from esd.families.sources import checkpoint_family, resolve_source, single_file_family, source_family
from esd.formats.exports import train_exports
from esd.formats.records import check_name, safe_name
from esd.train.lora import LoraSettings
from esd.train.presets import PRESET_FIELDS, PRESETS, preset_values
from esd.train.robust_settings import RobustSettings, check_robust_settings
from esd.train.settings import (
    OPTIMIZERS,
    SAMPLER_MODELS,
    SAMPLER_SCHEDULERS,
    SAVE_FORMATS,
    SDXL_UNCONDS,
    TIMESTEP_MODES,
    TrainSettings,
)
from esd.train.text_encoder import TextEncoderSettings, check_text_encoder_settings

# Settings a resumed run may change: where outputs go and how fast, never what is computed.
RESUME_MAY_CHANGE = {"resume", "overwrite", "name", "save_path", "save_every", "save_format", "save_precision",
                     "devices", "gradient_checkpointing", "compile", "preset_overrides", "export", "export_options"}


@dataclass
class ESDConfig(TextEncoderSettings, RobustSettings, LoraSettings, TrainSettings):
    """Every setting of an erasure. ``None`` in a preset field means "from ``preset``"; after
    construction every field holds its resolved value and ``preset_overrides`` names the fields
    that were given explicitly."""

    preset_overrides: list[str] = field(init=False, default_factory=list)  # preset fields given explicitly

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of: {', '.join(PRESETS)}")
        self.preset_overrides = [f for f in PRESET_FIELDS if getattr(self, f) is not None]
        family = self.family
        self._apply_preset(family)
        for name, value in {"mixed_precision": "no", "gradient_checkpointing": False,
                            **dict(family.training_defaults if family is not None else ())}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lora_rank and self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        self.validate()

    @property
    def family(self) -> Family | None:
        """The model's family (esd.families.registry.FAMILIES) from its configs or the checkpoint's tensor names,
        no weights load. None when unreadable yet (a hub id not cached, a missing file): :meth:`resolve_for`
        settles it once the model is loaded, or validate refuses the file."""
        if self.ckpt_path is None:
            return source_family(self.base_model)
        try:
            return checkpoint_family(self.ckpt_path)
        except Exception:  # noqa: BLE001 - validate names the file; loading says what is wrong with it
            return None

    def _apply_preset(self, family: Family | None) -> bool:
        """Give every preset field not set explicitly its preset value on this ``family``'s models; True when a
        value changed."""
        changed = False
        for name, value in preset_values(self.preset, family, self.train_method).items():
            if name not in self.preset_overrides and getattr(self, name) != value:
                setattr(self, name, value)
                changed = True
        return changed

    def resolve_for(self, family: Family) -> bool:
        """Settle the preset for the loaded model's ``family``, which the settings may not have been able to read
        (a hub id not cached, a caller's own models); True when a value changed."""
        return self._apply_preset(family)

    def validate(self) -> None:
        """Raise ValueError on any bad setting before a model is loaded."""
        if not self.prompt or not all(self.words):
            raise ValueError("--prompt is empty (or has an empty concept between separators)")
        family = self.family
        check_method(self.train_method, family)  # None (not readable yet): checked once loaded
        if family is not None and family.flow and (self.preset == "paper" or self.timestep_mode == "original"):
            raise ValueError("--preset paper and --timestep_mode original reproduce the original code's DDIM/DDPM "
                             "loop, which has no flow-matching counterpart; for SD3/FLUX use --preset fast or "
                             "official (--timestep_mode matched)")
        for name, value, low in [("iterations", self.iterations, 1), ("ddim_steps", self.ddim_steps, 1),
                                 ("batch_size", self.batch_size, 1), ("save_every", self.save_every, 0),
                                 ("pool_size", self.pool_size, 0)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        for name, value in [("start_guidance", self.start_guidance), ("negative_guidance", self.negative_guidance)]:
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"--{name} must be a finite number, got {value!r}")
        for flag, value, choices in [("mixed_precision", self.mixed_precision, PRECISIONS),
                                     ("sampler_model", self.sampler_model, SAMPLER_MODELS),
                                     ("sampler_scheduler", self.sampler_scheduler, SAMPLER_SCHEDULERS),
                                     ("timestep_mode", self.timestep_mode, TIMESTEP_MODES),
                                     ("sdxl_uncond", self.sdxl_uncond, SDXL_UNCONDS),
                                     ("save_format", self.save_format, SAVE_FORMATS),
                                     ("save_precision", self.save_precision, SAVE_PRECISIONS),
                                     ("optimizer", self.optimizer, OPTIMIZERS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.pool_size and self.sampler_model == "trained":
            raise ValueError("--sampler_model trained samples x_t on-policy every iteration; it needs --pool_size 0")
        if self.pool_size and self.timestep_mode == "original":
            raise ValueError("--timestep_mode original pairs a partial trajectory with the paper code's query draw; "
                             "it needs --pool_size 0 (the pool stores whole trajectories at matched timesteps)")
        if self.timestep_mode == "original" and self.sampler_scheduler != "ddim":
            raise ValueError("--timestep_mode original reproduces the paper's DDIM loop; it needs "
                             "--sampler_scheduler ddim")
        if self.sampler_scheduler == "model" and self.ckpt_path is None and family is not None and not family.flow:
            check_model_scheduler(resolve_source(self.base_model))  # Euler (SDXL base): refused before loading
        if self.pool_size and self.pool_size * self.ddim_steps < self.batch_size:
            raise ValueError(f"--pool_size {self.pool_size} x --ddim_steps {self.ddim_steps} entries cannot fill "
                             f"--batch_size {self.batch_size}")
        if self.name is not None:
            check_name(self.name, "--name")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be positive, got {self.image_size}")
        if self.optimizer == "adam8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optimizer adam8bit needs bitsandbytes: pip install bitsandbytes (or esd[8bit])")
        if self.ckpt_path is None:
            resolve_source(self.base_model)
        elif not os.path.isfile(self.ckpt_path):
            raise ValueError(f"--ckpt_path {self.ckpt_path!r} does not exist")
        else:
            single_file_family(self.ckpt_path, self.ckpt_config)
        if self.resume is not None and not os.path.isfile(self.resume):
            raise ValueError(f"--resume {self.resume!r} does not exist")
        parse_devices(self.devices)
        self._validate_lora_and_exports(family)
        check_robust_settings(self)  # each extension checks its own settings
        check_text_encoder_settings(self)

    def _validate_lora_and_exports(self, family: Family | None) -> None:
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise ValueError(f"--lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None:
            if self.lora_rank is None:
                raise ValueError("--lora_alpha is the scale of a LoRA: it needs --lora_rank")
            if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha)
                    and self.lora_alpha > 0):
                raise ValueError(f"--lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.export or self.export_options:
            train_exports(os.path.join(self.save_path, self.run_name), self.export, self.export_options,
                          self.overwrite, family)

    @property
    def words(self) -> list[str]:
        """The concept words: the prompt, or its parts between separators."""
        if self.separator is None:
            return [self.prompt.strip()]
        return [w.strip() for w in self.prompt.split(self.separator)]

    @property
    def run_name(self) -> str:
        """The output folder's name: --name, or one that encodes the settings, made a plain file name
        (a prompt such as "a/../b" cannot lead outside --save_path; a long one is cut and hashed)."""
        if self.name:
            return self.name
        word = self.prompt.replace(" ", "").replace(self.separator or " ", "-")
        method = resolve_method(self.train_method).name
        lora = f"-lora_{self.lora_rank}" if self.lora_rank else ""
        return safe_name(f"esd-word_{word}-method_{method}-sg_{self.start_guidance}-ng_{self.negative_guidance}"
                         f"-iter_{self.iterations}-lr_{self.lr}{lora}")

    def resume_conflicts(self, recorded: dict) -> list[str]:
        """The settings that differ from a checkpoint's ``recorded`` ones, as "--flag new vs old". Only
        what cannot change the erasure may differ (RESUME_MAY_CHANGE), and --iterations may only grow."""
        out = []
        for name, old in recorded.items():
            if name in RESUME_MAY_CHANGE or name not in self.__dataclass_fields__:  # settings only, not properties
                continue
            new = getattr(self, name)
            if name == "iterations":
                if new < old:
                    out.append(f"--iterations {new} < {old} (it may only grow)")
            elif new != old:
                out.append(f"--{name} {new!r} vs {old!r}")
        return out

    def record(self) -> dict:
        """The resolved settings (what args.json and checkpoints store)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
