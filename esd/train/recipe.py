"""The ESD training recipe: setup -> loop (source -> forward -> loss -> step) -> save.

Settings live in :mod:`esd.train.config`, the objective in :mod:`esd.core.objective`, the two views of
the UNet in :mod:`esd.core.views` and the x_t sources in :mod:`esd.core.xt_sources`; this file wires them
together and writes the outputs. One iteration is :meth:`ESDTrainer.step`.
"""

import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esd.core.devices import parse_devices
from esd.core.methods import resolve_method
from esd.core.objective import esd_loss
from esd.core.precision import PRECISIONS
from esd.core.sampler import Conditioning
from esd.core.views import TrainedRows, UNetViews
from esd.core.xt_sources import make_source
from esd.families.encode import encode_erasure_prompts
from esd.families.models import DiffusionModels, load_models, vae_scale_factor_of
from esd.families.schedulers import sampler_scheduler
from esd.families.sources import resolve_source
from esd.formats.exports import run_export, train_export_path, train_exports
from esd.train.config import ESDConfig
from esd.train.lora import check_lora_method, trained_tensors_of
from esd.train.robust import RobustESD
from esd.train.run_folder import (
    check_output_dir,
    check_room,
    read_resume_state,
    remove_export_folder,
    restore_checkpoint,
    run_files,
    save_run,
    write_checkpoint,
)
from esd.train.text_encoder import TrainedTextEncoder


@dataclass
class ESDResult:
    output_dir: Path
    trained_names: list[str]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unet_evals: int = 0  # latent rows through the UNet (sampling, frozen targets, trained forward)
    checkpoint: Path | None = None  # stopped early by train()'s callback: where it left a checkpoint to resume from


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """The paper's Adam (default betas), or bitsandbytes' 8-bit Adam: the same update with both moments
    stored block-wise quantised in uint8. bitsandbytes keeps tensors under 4,096 elements (biases, norms)
    in fp32, where quantising saves nothing worth the error. ``params``: tensors, or torch's parameter groups
    (dicts; a group's own "lr" overrides ``lr``)."""
    if name == "adam8bit":
        import bitsandbytes as bnb  # optional (esd[8bit]): --optimizer adam8bit

        return bnb.optim.Adam8bit(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


class ESDTrainer:
    """Fine-tunes a UNet with the ESD objective. ``setup()`` loads and prepares,
    ``train()`` runs the loop, ``save()`` writes the outputs."""

    def __init__(self, config: ESDConfig, models: DiffusionModels | None = None):
        config.validate()
        if models is not None:  # the preset as it is on these models' family (SDXL: esd_sdxl.py's official)
            config.resolve_for(models.family)
        self.config = config
        self.models = models
        self.before_training = None  # what setup()'s change of the denoiser for training was (Family.before_training)
        self.resume_state = read_resume_state(config) if config.resume else None
        if config.seed is None:
            config.seed = secrets.randbelow(2**31)
        self.output_dir = Path(config.save_path) / config.run_name
        self._check_output_dir()
        check_lora_method(config, models)

    # -- checks before any model loads ---------------------------------------------------------
    def _check_output_dir(self) -> None:
        """The run folder may take this run (:func:`esd.train.run_folder.check_output_dir`); a trainer that
        writes no folder (ESDPipeline without save_path) overrides it."""
        check_output_dir(self.output_dir, self.config)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        devices = parse_devices(cfg.devices)
        self.device = devices[0]
        self.dtype = PRECISIONS[cfg.mixed_precision]
        if self.models is None:
            if cfg.image_size and cfg.ckpt_path is None:  # fail before loading weights
                self._check_image_size(cfg.image_size, vae_scale_factor_of(resolve_source(cfg.base_model)))
            self.models = load_models(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config, torch_dtype=self.dtype)
        m = self.models
        if cfg.resolve_for(m.family):  # the family was unreadable before loading (a hub id not cached) or the
            # models were handed over after construction (ESDPipeline): the run's name follows its settings
            self.output_dir = Path(cfg.save_path) / cfg.run_name
            self._check_output_dir()
        self.image_size = cfg.image_size or m.native_resolution
        self._check_image_size(self.image_size, m.size_multiple, "the VAE factor" if m.size_multiple ==
                               m.vae_scale_factor else "the VAE factor times the 2x2 patch size,")
        latent_shape = (cfg.batch_size, m.latent_channels,
                        self.image_size // m.vae_scale_factor, self.image_size // m.vae_scale_factor)
        scheduler = sampler_scheduler(m.scheduler, cfg.sampler_scheduler, cfg.ddim_steps, latent_shape[2:],
                                      m.family.linspace_sigmas)
        # A cheaper denoiser at the same result, kept until release() (SD3 without T5: one zero token for 256).
        self.before_training = m.family.before_training(m.unet, m.text_encoders)
        # Text conditioning is fixed for the whole run: encode once, then drop the text encoders.
        for enc in m.text_encoders:
            enc.to(self.device, self.dtype)
        self.prompts = encode_erasure_prompts(m, cfg.words, cfg.erase_from, self.image_size,
                                              cfg.sdxl_uncond, cfg.start_guidance).to(self.device)
        # The extensions (esd.train.extension), each None when its settings are off, take what they need from the
        # models before the text encoders go: the trained text encoder; robust ESD its retain prompts, encoded,
        # and an encoder to attack (the trained one, when there is one).
        text_encoder = TrainedTextEncoder.from_settings(cfg, m)
        robust = RobustESD.from_settings(cfg, m, self.prompts, latent_shape, self.image_size, text_encoder)
        self.extensions = [e for e in (text_encoder, robust) if e is not None]
        m.text_encoders.clear()

        self.unet = m.unet.to(self.device)
        self.unet.requires_grad_(False)
        frozen_device = devices[1] if len(devices) == 2 else (self.device if cfg.frozen_copy else None)
        # What trains: the method's tensors, or LoRA factors (whose theta* is the UNet with them off; esd.train.lora)
        self.theta = trained_tensors_of(cfg, self.unet)
        self.trained_names = self.theta.names(self.unet)
        frozen = self.theta.frozen(self.unet) if frozen_device is None else None
        self.views = UNetViews(self.unet, self.trained_names, self.dtype, self.device, frozen_device,
                               getattr(scheduler, "alphas_cumprod", None), m.prediction_type, frozen,
                               call=m.family.call, true_cfg=m.family.true_cfg)
        trained = set(self.trained_names)
        own = [p for n, p in self.unet.named_parameters() if n in trained]
        extra = [e.param_group() for e in self.extensions]
        self.params = own + [p for params, _ in extra for p in params]
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # diffusers' blocks checkpoint when grad is enabled
        if cfg.compile:
            # One compiled forward serves both views: the module's parameters are inputs of the traced
            # graph (or guarded on), so the frozen values functional_call swaps in are used, never baked in.
            self.unet.forward = torch.compile(self.unet.forward)
        groups = self.params  # one group at --lr, unless an extension trains at its own rate
        if any(lr is not None for params, lr in extra if params):
            groups = [{"params": own}] + [{"params": params, **({} if lr is None else {"lr": lr})}
                                          for params, lr in extra if params]
        self.optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.source = make_source(cfg, self.views, scheduler, self.prompts, latent_shape, self.generator)
        self.start_iteration = 0
        self.history: list[dict] = []
        if self.resume_state is not None:
            self._load_checkpoint(self.resume_state)
        check_room(self)

    @staticmethod
    def _check_image_size(image_size: int, factor: int, what: str = "the VAE factor") -> None:
        if image_size % factor:
            raise ValueError(f"--image_size {image_size} is not a multiple of {what} {factor} of this model")

    @property
    def unet_evals(self) -> int:
        """Latent rows through the UNet so far, both views (for benchmarks)."""
        return self.views.evals

    # -- one iteration -------------------------------------------------------------------------
    def step(self) -> dict:
        """One ESD iteration: a batch from the x_t source, the trained view's prediction, the loss
        against the target, one optimizer step. Returns the iteration's loss.csv row. Robust ESD adds
        rows with their own targets; all rows go through the trained view in one forward."""
        batch = self.source.next_batch()
        # theta's conditioning: the encoded prompts, or an extension's (the trained text encoder's)
        encoder = next((c for e in self.extensions if (c := e.conditioning()) is not None), self.prompts)
        groups = [TrainedRows("esd", batch.latents, batch.timesteps, encoder.source(batch.concept), batch.target)]
        for e in self.extensions:  # e.g. robust ESD's adversarial and retain rows, predicted in the same forward
            groups += e.rows(self.views, batch, self.generator)
        latents = torch.cat([g.latents for g in groups])
        timesteps = torch.cat([g.timesteps for g in groups])
        with self.views.autocast():
            noise_pred = self.views.trained(latents, timesteps, Conditioning.cat([g.cond for g in groups]))
        noise_pred = self.views.to_eps(noise_pred.float(), latents, timesteps).split([len(g.latents) for g in groups])
        terms = {g.name: g.weight * esd_loss(pred, g.target) for g, pred in zip(groups, noise_pred)}
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        def column(values):  # ints; flow matching's timesteps are floats (s * 1000)
            return ";".join(f"{v.item():g}" for v in values)

        return {"loss": loss.item(), "word": ";".join(self.config.words[int(c)] for c in batch.concept.unique()),
                "ddim_index": column(batch.ddim_index), "xt_level": column(batch.xt_level),
                "timestep": column(batch.timesteps), **{k: v.item() for k, v in terms.items() if k != "esd"}}

    # -- loop ----------------------------------------------------------------------------------
    def train(self, callback=None) -> ESDResult:
        """The loop. ``callback(record)``, after each iteration (``esd app``'s progress), returns True to stop: the
        loop then writes a checkpoint (``checkpoints/checkpoint-<iteration>.pt``, which ``--resume`` continues) and
        returns with ``checkpoint`` set, having saved nothing else."""
        cfg = self.config
        n_params = sum(p.numel() for p in self.params)
        print("***** Running ESD training *****")
        print(f"  concept(s) = {cfg.words}  method = {resolve_method(cfg.train_method).name}  "
              f"trained parameters = {n_params:,} in {len(self.params)} tensors"
              + "".join(e.header() for e in self.extensions))
        if (line := self.theta.describe()) is not None:
            print(line)
        print(f"  preset = {cfg.preset}  model = {self.models.source} ({self.models.family.name}, "
              f"{self.models.prediction_type})  image size = {self.image_size}  device = {self.device}  "
              f"precision = {cfg.mixed_precision}  seed = {cfg.seed}")
        if cfg.overwrite:  # asked for: the old run's files go now, so that no stale file is mixed with the new ones
            for p in run_files(self.output_dir):
                if cfg.resume is None or p.resolve() != Path(cfg.resume).resolve():
                    p.unlink(missing_ok=True)
            remove_export_folder(train_export_path(self.output_dir, "diffusers"))
        start = time.perf_counter()
        bar = tqdm(range(self.start_iteration, cfg.iterations), initial=self.start_iteration,
                   total=cfg.iterations, desc="ESD", disable=None)
        for i in bar:
            record = self.step()
            if not math.isfinite(record["loss"]):  # diverged: nothing non-finite is saved as a result
                raise ValueError(f"training diverged: the loss is {record['loss']} at iteration {i + 1}; nothing "
                                 f"was saved for it (lower --lr or --negative_guidance; checkpoints written so far "
                                 f"stay in {self.output_dir / 'checkpoints'})")
            record["iteration"] = i + 1
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < cfg.iterations:
                self.save_checkpoint()
            if callback is not None and callback(record) and i + 1 < cfg.iterations:
                bar.close()
                return ESDResult(self.output_dir, self.trained_names, [h["loss"] for h in self.history],
                                 time.perf_counter() - start, self.unet_evals, checkpoint=self.save_checkpoint())
        seconds = time.perf_counter() - start
        return ESDResult(self.output_dir, self.trained_names, [h["loss"] for h in self.history], seconds,
                         self.unet_evals)

    def release(self) -> None:
        """Take off what setup() put on the model for training only (Family.before_training: an SD3
        transformer's merged zero-token attention), so that the erased model in memory samples right in diffusers'
        pipeline (which appends 256 zero tokens) for a caller who passed ``models``."""
        if self.before_training is not None:
            self.models.family.after_training(self.unet, self.before_training)
            self.before_training = None

    # -- checkpoints ---------------------------------------------------------------------------
    def trained_state(self) -> dict:
        """The trained tensors (fp32, CPU): the UNet's by name, the extensions' under their own names (the text
        encoder's under ``text_encoder.``)."""
        params = dict(self.unet.named_parameters())
        state = {n: params[n].detach().float().cpu() for n in self.trained_names}
        for e in self.extensions:
            state.update(e.trained_tensors())
        return state

    def save_checkpoint(self) -> Path:
        return write_checkpoint(self)

    def _load_checkpoint(self, state: dict) -> None:
        restore_checkpoint(self, state)

    # -- outputs -------------------------------------------------------------------------------
    def save(self, result: ESDResult | None = None) -> Path:
        """Write weights, ``args.json``, ``loss.csv``, ``loss.png`` and the model card to the output folder."""
        return save_run(self, result)


def train_esd(config: ESDConfig, models: DiffusionModels | None = None) -> ESDResult:
    """Run a whole erasure and write its outputs; returns where they are."""
    trainer = ESDTrainer(config, models)
    trainer.setup()
    try:
        result = trainer.train()
        trainer.save(result)
    finally:
        trainer.release()
    for settings in train_exports(result.output_dir, config.export, config.export_options, config.overwrite):
        run_export(str(result.output_dir), settings)
    return result
