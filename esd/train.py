"""The ESD training recipe: setup -> train -> save.

Two views of one UNet: the trained parameters theta and frozen copies theta*.
With one device, theta* is kept only for the trained parameters and swapped in
with ``torch.func.functional_call``, so the UNet lives in memory once. With
``devices="0,1"`` (the original code's layout), a whole frozen UNet sits on the
second device.

Precision policy (as diffusers' training examples): frozen weights and the text
encoders in the low-precision dtype; trained parameters, the optimizer state,
the target and the loss in fp32 (the optimizer state in uint8 with --optimizer
adam8bit); forwards under autocast.
"""

import csv
import importlib.util
import json
import math
import os
import platform
import secrets
import subprocess
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
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
from .sampling import Conditioning, call_unet, classifier_free_guidance, denoise_to, encode_prompts, to_epsilon
from .weights import atomic_write, save_full_state_dict, save_trained_parameters

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLER_MODELS = ("frozen", "trained")
TIMESTEP_MODES = ("matched", "original")
SAVE_FORMATS = ("both", "full", "trained")
SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adam", "adam8bit")


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
    pool_size: int = 8  # trajectories per reused pool (the fast path); 0: sample anew every iteration (paper)
    timestep_mode: str = "matched"  # matched: x_t's own timestep; original: the paper code's DDPM draw
    save_path: str = "models/"
    save_every: int = 0  # checkpoint every N iterations (0: never)
    save_format: str = "both"  # both | full (.pt) | trained (.safetensors)
    save_precision: str = "fp32"  # fp32 | fp16 | bf16: dtype of the saved weights (checkpoints stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time per step
    compile: bool = False  # torch.compile the UNet (worth it on GPUs for long runs; first steps compile)
    optimizer: str = "adam"  # adam (the paper's) | adam8bit (bitsandbytes: 2 bytes of state per parameter, not 8)
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
                                 ("batch_size", self.batch_size, 1), ("save_every", self.save_every, 0),
                                 ("pool_size", self.pool_size, 0)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if self.pool_size and self.sampler_model == "trained":
            raise ValueError("--sampler_model trained samples x_t on-policy every iteration; it needs --pool_size 0")
        if self.pool_size and self.pool_size * self.ddim_steps < self.batch_size:
            raise ValueError(f"--pool_size {self.pool_size} x --ddim_steps {self.ddim_steps} entries cannot fill "
                             f"--batch_size {self.batch_size}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be positive, got {self.image_size}")
        for flag, value, choices in [("mixed_precision", self.mixed_precision, PRECISIONS),
                                     ("sampler_model", self.sampler_model, SAMPLER_MODELS),
                                     ("timestep_mode", self.timestep_mode, TIMESTEP_MODES),
                                     ("save_format", self.save_format, SAVE_FORMATS),
                                     ("save_precision", self.save_precision, SAVE_PRECISIONS),
                                     ("optimizer", self.optimizer, OPTIMIZERS)]:
            if value not in choices:
                raise ValueError(f"--{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.optimizer == "adam8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optimizer adam8bit needs bitsandbytes: pip install bitsandbytes (or esd[8bit])")
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
    unet_evals: int = 0  # latent rows through the UNet (sampling, frozen targets, trained forward)


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


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The paper's Adam (default betas), or bitsandbytes' 8-bit Adam: the same update with both moments
    stored block-wise quantised in uint8. bitsandbytes keeps tensors under 4,096 elements (biases, norms)
    in fp32, where quantising saves nothing worth the error."""
    if name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


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
        self.prompt_cond = embeds.to(self.device)  # rows: "", each concept word, [erase_from]
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
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # diffusers' blocks checkpoint when grad is enabled
        if cfg.compile:
            # One compiled forward serves both views: the module's parameters are inputs of the traced
            # graph (or guarded on), so the frozen values functional_call swaps in are used, never baked in.
            self.unet.forward = torch.compile(self.unet.forward)
        self.optimizer = make_optimizer(cfg.optimizer, self.params, cfg.lr)
        self.scheduler = m.scheduler
        self.scheduler.set_timesteps(cfg.ddim_steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.start_iteration = 0
        self.history: list[dict] = []
        self.pool: dict | None = None
        self.unet_evals = 0  # latent rows through the UNet, all views (for benchmarks)
        if cfg.resume:
            self._load_checkpoint(cfg.resume)

    @staticmethod
    def _check_image_size(image_size: int, factor: int) -> None:
        if image_size % factor:
            raise ValueError(f"--image_size {image_size} is not a multiple of the VAE factor {factor} of this model")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _trained_unet(self, latents, timesteps, cond):
        self.unet_evals += latents.shape[0]
        return call_unet(self.unet, latents, timesteps, cond)

    def _frozen_unet(self, latents, timesteps, cond):
        self.unet_evals += latents.shape[0]
        return self.frozen(latents, timesteps, cond)

    def _cond(self, rows: torch.Tensor) -> Conditioning:
        """Conditioning for prompt rows (0: "", 1..W: concept words, W+1: erase_from)."""
        c = self.prompt_cond
        extra = {k: v[rows] for k, v in c.added_cond_kwargs.items()} if c.added_cond_kwargs else None
        return Conditioning(c.prompt_embeds[rows], extra)

    def _source_rows(self, word_rows: torch.Tensor) -> torch.Tensor:
        """Prompt rows that x_t and theta see: the erase-from prompt, else the concept."""
        if self.config.erase_from:
            return torch.full_like(word_rows, len(self.config.words) + 1)
        return word_rows

    def _prompt_rows(self, word_rows: torch.Tensor) -> torch.Tensor:
        """Prompt rows of one frozen call: "" (e0), the concept (ep) and, with --erase_from, the
        erase-from prompt; the last block is always the prompt x_t is sampled with."""
        rows = [torch.zeros_like(word_rows), word_rows]
        if self.config.erase_from:
            rows.append(self._source_rows(word_rows))
        return torch.cat(rows)

    def _targets(self, eps: torch.Tensor, b: int) -> torch.Tensor:
        """ESD targets from epsilon predictions laid out as :meth:`_prompt_rows`, ``b`` rows per prompt."""
        noise_pred_uncond, noise_pred_concept = eps[:b], eps[b:2 * b]
        base = eps[2 * b:] if self.config.erase_from else noise_pred_uncond
        return esd_target(base, noise_pred_uncond, noise_pred_concept, self.config.negative_guidance)

    def _frozen_targets(self, latents, timesteps, word_rows) -> torch.Tensor:
        """ESD targets from frozen predictions at (x_t, t): one batched call over the prompts."""
        rows = self._prompt_rows(word_rows)
        n = len(rows) // len(word_rows)
        x, t = latents.repeat(n, 1, 1, 1), timesteps.repeat(n)
        with self._autocast():
            pred = self._frozen_unet(x, t, self._cond(rows))
        return self._targets(self._eps(pred.float(), x, t), latents.shape[0])

    def _original_timesteps(self, ddim_index: torch.Tensor) -> torch.Tensor:
        """The paper's code: a DDPM step in [t_enc * 1000 / T, (t_enc + 1) * 1000 / T) per row."""
        n, T = self.scheduler.config.num_train_timesteps, self.config.ddim_steps
        low = torch.round(ddim_index / T * n)
        high = torch.round((ddim_index + 1) / T * n)
        u = torch.rand(ddim_index.shape, generator=self.generator)
        return (low + (u * (high - low)).floor()).long()

    def _fresh_batch(self):
        """The paper's loop: for this iteration, sample x_t from noise to a random step t_enc."""
        cfg, g = self.config, self.generator
        word_rows = torch.randint(len(cfg.words), (1,), generator=g).add(1).repeat(cfg.batch_size)
        stop_index = int(torch.randint(cfg.ddim_steps, (1,), generator=g))  # t_enc of the paper's code
        noise = torch.randn(self.latent_shape, generator=g).to(self.device)
        sampler = self._frozen_unet if cfg.sampler_model == "frozen" else self._trained_unet
        source = self._cond(self._source_rows(word_rows))
        with self._autocast():
            latents = denoise_to(sampler, self.scheduler, noise, source, self._cond(torch.zeros_like(word_rows)),
                                 cfg.start_guidance, stop_index)
        ddim_index = torch.full((cfg.batch_size,), stop_index)
        if cfg.timestep_mode == "matched":
            timesteps = self.scheduler.timesteps[ddim_index]
        else:
            timesteps = self._original_timesteps(ddim_index)
        timesteps = timesteps.to(self.device)
        return latents, timesteps, word_rows, ddim_index, self._frozen_targets(latents, timesteps, word_rows)

    @torch.no_grad()
    def _refresh_pool(self) -> None:
        """Sample ``pool_size`` whole trajectories with the frozen model and keep, at every
        step, (x_t, t) and the frozen predictions the guided sampler computed there anyway:
        for "" (e0) and the concept (ep); with --erase_from one extra prediction per step."""
        cfg, g, k = self.config, self.generator, self.config.pool_size
        word_rows = torch.randint(len(cfg.words), (k,), generator=g).add(1)
        noise = torch.randn((k, *self.latent_shape[1:]), generator=g).to(self.device)
        rows = self._prompt_rows(word_rows)
        cond, n = self._cond(rows), len(rows) // k
        x = noise * self.scheduler.init_noise_sigma
        xs, ts, targets = [], [], []
        for t in self.scheduler.timesteps:
            x_rows = x.repeat(n, 1, 1, 1)
            timesteps = torch.full((k * n,), int(t), device=self.device)
            with self._autocast():
                pred = self._frozen_unet(x_rows, timesteps, cond).float()
            targets.append(self._targets(self._eps(pred, x_rows, timesteps), k))
            xs.append(x)
            ts.append(torch.full((k,), int(t)))
            # The sampler's own guided step: "" and the prompt x_t is sampled with (the last block).
            guided = classifier_free_guidance(pred[:k], pred[-k:], cfg.start_guidance)
            x = self.scheduler.step(guided, t, x).prev_sample
        steps = len(xs)
        self.pool = {"latents": torch.cat(xs), "timesteps": torch.cat(ts), "targets": torch.cat(targets),
                     "word_rows": word_rows.repeat(steps),
                     "ddim_index": torch.arange(steps).repeat_interleave(k),
                     "order": torch.randperm(steps * k, generator=g), "cursor": torch.tensor(0)}

    def _pool_batch(self):
        """Trajectory reuse: draw ``batch_size`` unused entries of the pool; refresh it when
        fewer remain. Each entry trains once, so every x_t is a fresh draw from the same
        distribution as the paper's loop (x_t from the frozen guided sampler, t uniform)."""
        cfg = self.config
        if self.pool is None or int(self.pool["cursor"]) + cfg.batch_size > len(self.pool["order"]):
            self._refresh_pool()
        p = self.pool
        start = int(p["cursor"])
        idx = p["order"][start:start + cfg.batch_size]
        p["cursor"] = torch.tensor(start + cfg.batch_size)
        latents, word_rows, ddim_index = p["latents"][idx], p["word_rows"][idx], p["ddim_index"][idx]
        if cfg.timestep_mode == "matched":
            return latents, p["timesteps"][idx].to(self.device), word_rows, ddim_index, p["targets"][idx]
        timesteps = self._original_timesteps(ddim_index).to(self.device)
        return latents, timesteps, word_rows, ddim_index, self._frozen_targets(latents, timesteps, word_rows)

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> dict:
        """One ESD iteration: get (x_t, t, target), one optimizer step on the trained view."""
        cfg = self.config
        batch = self._pool_batch() if cfg.pool_size else self._fresh_batch()
        latents, timesteps, word_rows, ddim_index, target = batch
        with self._autocast():
            noise_pred = self._trained_unet(latents, timesteps, self._cond(self._source_rows(word_rows)))
        loss = esd_loss(self._eps(noise_pred.float(), latents, timesteps), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "word": ";".join(cfg.words[int(r) - 1] for r in word_rows.unique()),
                "ddim_index": ";".join(str(int(i)) for i in ddim_index),
                "timestep": ";".join(str(int(t)) for t in timesteps)}

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
        return ESDResult(self.output_dir, self.trained_names, [h["loss"] for h in self.history], seconds,
                         self.unet_evals)

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
                 "history": self.history, "config": asdict(self.config), "pool": self.pool}
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
        self.pool = state.get("pool")

    # -- outputs -------------------------------------------------------------------------------
    def save(self, result: ESDResult | None = None) -> Path:
        """Write weights, ``args.json``, ``loss.csv`` and ``loss.png`` to the output folder."""
        cfg, out = self.config, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        name = out.name
        trained = self.trained_state()
        save_dtype = SAVE_PRECISIONS[cfg.save_precision]
        if cfg.save_format in ("both", "full"):
            if self.dtype == torch.float32:
                full = {k: v.detach().cpu() for k, v in self.unet.state_dict().items()}
            else:  # frozen weights were cast down; take them from the source again at full precision
                full = load_models(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config).unet.state_dict()
            full.update(trained)
            save_full_state_dict({k: v.to(save_dtype) if v.is_floating_point() else v for k, v in full.items()},
                                 out / f"diffusers-{name}.pt")
        trained = {k: v.to(save_dtype) for k, v in trained.items()}
        if cfg.save_format in ("both", "trained"):
            save_trained_parameters(trained, out / f"{name}.safetensors",
                                    {"base_model": cfg.ckpt_path or cfg.base_model,
                                     "train_method": resolve_method(cfg.train_method).name, "prompt": cfg.prompt})
        record = {**asdict(self.config), "family": self.models.family,
                  "prediction_type": self.models.prediction_type, "resolved_image_size": self.image_size,
                  "trained_parameters": sum(v.numel() for v in trained.values()),
                  "trained_tensors": len(trained), "environment": environment_record()}
        if result is not None:
            record.update(seconds=result.seconds, unet_evals=result.unet_evals)
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

