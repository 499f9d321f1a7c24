"""The ESD training recipe: setup -> train -> save.

Two views of one UNet: the trained parameters theta and frozen copies theta*.
With one device, theta* is kept only for the trained parameters and swapped in
with ``torch.func.functional_call``, so the UNet lives in memory once. With
``devices="0,1"`` (the original code's layout), a whole frozen UNet sits on the
second device.

Precision policy (as diffusers' training examples): frozen weights and the text
encoders in the low-precision dtype; trained parameters, the optimizer state,
the target and the loss in fp32; forwards under autocast.
"""

import csv
import json
import math
import os
import platform
import secrets
import subprocess
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from . import __version__
from .methods import resolve_method, select_parameters
from .models import (
    DEFAULT_BASE_MODEL,
    DiffusionModels,
    load_models,
    parse_devices,
    resolve_source,
    vae_scale_factor_of,
)
from .objective import esd_loss, esd_target
from .sampling import Conditioning, call_unet, denoise_to, encode_prompts, to_epsilon
from .weights import atomic_write, save_full_state_dict, save_trained_parameters

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLER_MODELS = ("frozen", "trained")
TIMESTEP_MODES = ("matched", "original")
SAVE_FORMATS = ("both", "full", "trained")


@dataclass
class ESDConfig:
    """Every setting of an erasure, with its default. The CLI flags mirror these."""

    prompt: str  # concept(s) to erase
    train_method: str  # see esd.methods.TRAIN_METHODS
    base_model: str = DEFAULT_BASE_MODEL  # hub id, local diffusers folder, or "toy"
    ckpt_path: str | None = None  # original single-file checkpoint instead of base_model
    ckpt_config: str | None = None  # local diffusers folder with the configs for ckpt_path
    erase_from: str | None = None  # erase the concept from this prompt ("cowboy hat" from "cowboy")
    separator: str | None = None  # split prompt into several concepts, one drawn per iteration
    start_guidance: float = 3.0  # guidance of the sampler that makes x_t
    negative_guidance: float = 1.0  # eta in the paper's target e0 - eta (ep - e0)
    iterations: int = 1000
    lr: float = 1e-5
    ddim_steps: int = 50  # the sampler's schedule; t is drawn from its steps
    image_size: int | None = None  # None: the model's native resolution
    batch_size: int = 1  # latents per iteration (they share t and the concept)
    seed: int | None = None  # None: drawn at random and recorded
    devices: str | None = None  # "0", "0,1" (frozen model on the second), "cpu"; None: cuda:0 if any
    mixed_precision: str = "no"  # no | fp16 | bf16: dtype of the frozen parts
    sampler_model: str = "frozen"  # which weights sample x_t: frozen (official code) or trained (paper's code)
    timestep_mode: str = "matched"  # matched: x_t's own timestep; original: the paper code's DDPM draw
    save_path: str = "models/"
    save_every: int = 0  # checkpoint every N iterations (0: never)
    save_format: str = "both"  # both | full (.pt) | trained (.safetensors)
    resume: str | None = None  # checkpoint to continue from
    name: str | None = None  # output folder name; default encodes the hyperparameters

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on any bad setting before a model is loaded."""
        if not self.prompt or not all(self.words):
            raise ValueError("--prompt is empty (or has an empty concept between separators)")
        resolve_method(self.train_method)
        for name, value, low in [("iterations", self.iterations, 1), ("ddim_steps", self.ddim_steps, 1),
                                 ("batch_size", self.batch_size, 1), ("save_every", self.save_every, 0)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be positive, got {self.image_size}")
        for flag, value, choices in [("mixed_precision", self.mixed_precision, PRECISIONS),
                                     ("sampler_model", self.sampler_model, SAMPLER_MODELS),
                                     ("timestep_mode", self.timestep_mode, TIMESTEP_MODES),
                                     ("save_format", self.save_format, SAVE_FORMATS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.ckpt_path is None:
            resolve_source(self.base_model)
        elif not os.path.isfile(self.ckpt_path):
            raise ValueError(f"--ckpt_path {self.ckpt_path!r} does not exist")
        if self.resume is not None and not os.path.isfile(self.resume):
            raise ValueError(f"--resume {self.resume!r} does not exist")
        parse_devices(self.devices)

    @property
    def words(self) -> list[str]:
        if self.separator is None:
            return [self.prompt.strip()]
        return [w.strip() for w in self.prompt.split(self.separator)]

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        word = self.prompt.replace(" ", "").replace(self.separator or " ", "-")
        method = resolve_method(self.train_method).name
        return (f"esd-word_{word}-method_{method}-sg_{self.start_guidance}-ng_{self.negative_guidance}"
                f"-iter_{self.iterations}-lr_{self.lr}")


@dataclass
class ESDResult:
    output_dir: Path
    trained_names: list[str]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class FrozenUNet:
    """theta*: predictions of the UNet as it was before training."""

    def __init__(self, unet: torch.nn.Module, trained_names: list[str], dtype: torch.dtype,
                 device: torch.device | None = None):
        if device is not None:  # the original layout: a whole frozen copy on its own device
            self.module = deepcopy(unet).to(device=device, dtype=dtype).requires_grad_(False)
            self.params = None
        else:
            self.module = unet
            params = dict(unet.named_parameters())
            self.params = {n: params[n].detach().clone().to(dtype) for n in trained_names}

    @torch.no_grad()
    def __call__(self, latents, timesteps, cond: Conditioning):
        if self.params is None:
            device = next(self.module.parameters()).device
            out = call_unet(self.module, latents.to(device), timesteps.to(device), cond.to(device))
            return out.to(latents.device)
        return functional_call(self.module, self.params, (latents, timesteps),
                               {"encoder_hidden_states": cond.prompt_embeds,
                                "added_cond_kwargs": cond.added_cond_kwargs}).sample


def environment_record() -> dict:
    """Versions and git hash saved beside every output."""
    import diffusers
    import transformers

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except OSError:
        git = None
    return {"esd": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "git_hash": git,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ESDTrainer:
    """Fine-tunes a UNet with the ESD objective. ``setup()`` loads and prepares,
    ``train()`` runs the loop, ``save()`` writes the outputs."""

    def __init__(self, config: ESDConfig, models: DiffusionModels | None = None):
        config.validate()
        self.config = config
        self.models = models
        if config.seed is None:
            config.seed = secrets.randbelow(2**31)
        self.output_dir = Path(config.save_path) / config.run_name

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        devices = parse_devices(cfg.devices)
        self.device = devices[0]
        self.dtype = PRECISIONS[cfg.mixed_precision]
        if self.models is None:
            if cfg.image_size and cfg.ckpt_path is None:  # fail before loading weights
                self._check_image_size(cfg.image_size, vae_scale_factor_of(resolve_source(cfg.base_model)))
            self.models = load_models(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config)
        m = self.models
        self.image_size = cfg.image_size or m.native_resolution
        self._check_image_size(self.image_size, m.vae_scale_factor)
        self.latent_shape = (cfg.batch_size, m.unet.config.in_channels,
                             self.image_size // m.vae_scale_factor, self.image_size // m.vae_scale_factor)

        # Text conditioning is fixed for the whole run: encode once, then drop the text encoders.
        for enc in m.text_encoders:
            enc.to(self.device, self.dtype)
        prompts = ["", *cfg.words] + ([cfg.erase_from] if cfg.erase_from else [])
        embeds = encode_prompts(m, prompts, self.image_size)
        self.cond = [Conditioning(embeds.prompt_embeds[i:i + 1],
                                  {k: v[i:i + 1] for k, v in embeds.added_cond_kwargs.items()}
                                  if embeds.added_cond_kwargs else None).repeat(cfg.batch_size)
                     for i in range(len(prompts))]
        m.text_encoders.clear()

        self.unet = m.unet.to(self.device)
        self.unet.requires_grad_(False)
        self.trained_names = select_parameters(self.unet, cfg.train_method)
        frozen_device = devices[1] if len(devices) == 2 else None
        self.frozen = FrozenUNet(self.unet, self.trained_names, self.dtype, frozen_device)
        trained = set(self.trained_names)
        for name, p in self.unet.named_parameters():
            if name in trained:
                p.requires_grad_(True)
            else:
                p.data = p.data.to(self.dtype)
        self.params = [p for n, p in self.unet.named_parameters() if n in trained]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.scheduler = m.scheduler
        self.scheduler.set_timesteps(cfg.ddim_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.start_iteration = 0
        self.history: list[dict] = []
        if cfg.resume:
            self._load_checkpoint(cfg.resume)

    @staticmethod
    def _check_image_size(image_size: int, factor: int) -> None:
        if image_size % factor:
            raise ValueError(f"--image_size {image_size} is not a multiple of the VAE factor {factor} of this model")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _trained_unet(self, latents, timesteps, cond):
        return call_unet(self.unet, latents, timesteps, cond)

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> dict:
        """One ESD iteration: sample x_t, build the target, one optimizer step."""
        cfg, g = self.config, self.generator
        word_index = int(torch.randint(len(cfg.words), (1,), generator=g))
        stop_index = int(torch.randint(cfg.ddim_steps, (1,), generator=g))  # t_enc of the paper's code
        noise = torch.randn(self.latent_shape, generator=g).to(self.device)
        uncond, concept = self.cond[0], self.cond[1 + word_index]
        source = self.cond[-1] if cfg.erase_from else concept  # prompt that x_t and theta see

        sampler = self.frozen if cfg.sampler_model == "frozen" else self._trained_unet
        with self._autocast():
            latents = denoise_to(sampler, self.scheduler, noise, source, uncond, cfg.start_guidance, stop_index)
        if cfg.timestep_mode == "matched":
            t = int(self.scheduler.timesteps[stop_index])
        else:  # the paper's code: a DDPM step in [t_enc * 1000 / T, (t_enc + 1) * 1000 / T)
            n = self.scheduler.config.num_train_timesteps
            low, high = round(stop_index / cfg.ddim_steps * n), round((stop_index + 1) / cfg.ddim_steps * n)
            t = int(torch.randint(low, high, (1,), generator=g))
        timesteps = torch.full((cfg.batch_size,), t, device=self.device)

        b = cfg.batch_size
        conds = [uncond, concept] + ([source] if cfg.erase_from else [])
        with self._autocast():
            frozen = self.frozen(latents.repeat(len(conds), 1, 1, 1), timesteps.repeat(len(conds)),
                                 Conditioning.cat(conds))
        frozen = self._eps(frozen.float(), latents.repeat(len(conds), 1, 1, 1), timesteps.repeat(len(conds)))
        noise_pred_uncond, noise_pred_concept = frozen[:b], frozen[b:2 * b]
        noise_pred_base = frozen[2 * b:] if cfg.erase_from else noise_pred_uncond
        target = esd_target(noise_pred_base, noise_pred_uncond, noise_pred_concept, cfg.negative_guidance)

        with self._autocast():
            noise_pred = self._trained_unet(latents, timesteps, source)
        loss = esd_loss(self._eps(noise_pred.float(), latents, timesteps), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "word": cfg.words[word_index], "ddim_index": stop_index, "timestep": t}

    def _eps(self, prediction, latents, timesteps):
        return to_epsilon(prediction, latents, timesteps, self.scheduler.alphas_cumprod,
                          self.models.prediction_type)

    # -- loop ----------------------------------------------------------------------------------
    def train(self) -> ESDResult:
        cfg = self.config
        n_params = sum(p.numel() for p in self.params)
        print("***** Running ESD training *****")
        print(f"  concept(s) = {cfg.words}  method = {resolve_method(cfg.train_method).name}  "
              f"trained parameters = {n_params:,} in {len(self.params)} tensors")
        print(f"  model = {self.models.source} ({self.models.family}, {self.models.prediction_type})  "
              f"image size = {self.image_size}  device = {self.device}  precision = {cfg.mixed_precision}  "
              f"seed = {cfg.seed}")
        start = time.perf_counter()
        bar = tqdm(range(self.start_iteration, cfg.iterations), initial=self.start_iteration,
                   total=cfg.iterations, desc="ESD", disable=None)
        for i in bar:
            record = self.step()
            record["iteration"] = i + 1
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < cfg.iterations:
                self.save_checkpoint()
        seconds = time.perf_counter() - start
        return ESDResult(self.output_dir, self.trained_names, [h["loss"] for h in self.history], seconds)

    # -- checkpoints ---------------------------------------------------------------------------
    def trained_state(self) -> dict:
        params = dict(self.unet.named_parameters())
        return {n: params[n].detach().float().cpu() for n in self.trained_names}

    def save_checkpoint(self) -> Path:
        iteration = self.history[-1]["iteration"] if self.history else self.start_iteration
        path = self.output_dir / "checkpoints" / f"checkpoint-{iteration}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"iteration": iteration, "trained": self.trained_state(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "history": self.history, "config": asdict(self.config)}
        atomic_write(path, lambda p: torch.save(state, p))
        return path

    def _load_checkpoint(self, path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if sorted(state["trained"]) != sorted(self.trained_names):
            raise ValueError(f"checkpoint {path!r} was trained with another train method or model "
                             f"({len(state['trained'])} tensors vs {len(self.trained_names)} selected now)")
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, v in state["trained"].items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.start_iteration = state["iteration"]
        self.history = list(state["history"])

    # -- outputs -------------------------------------------------------------------------------
    def save(self, result: ESDResult | None = None) -> Path:
        """Write weights, ``args.json``, ``loss.csv`` and ``loss.png`` to the output folder."""
        cfg, out = self.config, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        name = out.name
        trained = self.trained_state()
        if cfg.save_format in ("both", "full"):
            if self.dtype == torch.float32:
                full = {k: v.detach().cpu() for k, v in self.unet.state_dict().items()}
            else:  # frozen weights were cast down; take them from the source again at full precision
                full = load_models(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config).unet.state_dict()
            full.update(trained)
            save_full_state_dict(full, out / f"diffusers-{name}.pt")
        if cfg.save_format in ("both", "trained"):
            save_trained_parameters(trained, out / f"{name}.safetensors",
                                    {"base_model": cfg.ckpt_path or cfg.base_model,
                                     "train_method": resolve_method(cfg.train_method).name, "prompt": cfg.prompt})
        record = {**asdict(self.config), "family": self.models.family,
                  "prediction_type": self.models.prediction_type, "resolved_image_size": self.image_size,
                  "trained_parameters": sum(v.numel() for v in trained.values()),
                  "trained_tensors": len(trained), "environment": environment_record()}
        if result is not None:
            record["seconds"] = result.seconds
        atomic_write(out / "args.json", lambda p: Path(p).write_text(json.dumps(record, indent=2)))
        self._write_losses(out)
        return out

    def _write_losses(self, out: Path) -> None:
        cols = ["iteration", "loss", "word", "ddim_index", "timestep"]

        def write_csv(p):
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(self.history)

        atomic_write(out / "loss.csv", write_csv)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["iteration"] for h in self.history], [h["loss"] for h in self.history], lw=0.8)
        ax.set(xlabel="iteration", ylabel="ESD loss (MSE)", yscale="log", title=out.name[:60])
        fig.tight_layout()
        atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)


def train_esd(config: ESDConfig, models: DiffusionModels | None = None) -> ESDResult:
    """Run a whole erasure and write its outputs; returns where they are."""
    trainer = ESDTrainer(config, models)
    trainer.setup()
    result = trainer.train()
    trainer.save(result)
    return result


CONFIG_FIELDS = [f.name for f in fields(ESDConfig)]
