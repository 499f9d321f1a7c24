"""The ESD training recipe: setup -> loop (source -> forward -> loss -> step) -> save.

Settings live in :mod:`esd.config`, the objective in :mod:`esd.objective`, the two views of
the UNet in :mod:`esd.views` and the x_t sources in :mod:`esd.xt_sources`; this file wires them
together and writes the outputs. One iteration is :meth:`ESDTrainer.step`.
"""

import math
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import PRECISIONS, SAVE_PRECISIONS, ESDConfig
from .export import run_export, train_export_path, train_exports
from .flow import merge_zero_t5_tokens, unmerge_zero_t5_tokens
from .lora_train import LoraTraining, check_lora_method, plain_state_dict
from .methods import resolve_method, select_parameters
from .modelcard import write_model_card
from .models import DiffusionModels, load_denoiser, load_models, parse_devices, resolve_source, vae_scale_factor_of
from .objective import esd_loss
from .records import check_free_space, check_output_folder, environment_record, torch_save, write_run_record
from .robust import RobustESD, check_loaded_text_encoders, check_resume_robust, is_robust
from .sampling import Conditioning, encode_erasure_prompts, sampler_scheduler
from .text_encoder import TrainedTextEncoder
from .views import TrainedRows, UNetViews
from .weights import run_weight_files, save_full_state_dict, save_trained_parameters
from .xt_sources import make_source


@dataclass
class ESDResult:
    output_dir: Path
    trained_names: list[str]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    unet_evals: int = 0  # latent rows through the UNet (sampling, frozen targets, trained forward)


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """The paper's Adam (default betas), or bitsandbytes' 8-bit Adam: the same update with both moments
    stored block-wise quantised in uint8. bitsandbytes keeps tensors under 4,096 elements (biases, norms)
    in fp32, where quantising saves nothing worth the error. ``params``: tensors, or torch's parameter groups
    (dicts; a group's own "lr" overrides ``lr``)."""
    if name == "adam8bit":
        import bitsandbytes as bnb

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
        self.attention_before = None  # an SD3 transformer's attention processors before setup() merged its zero tokens
        self.resume_state = self._read_resume_state(config) if config.resume else None
        if config.seed is None:
            config.seed = secrets.randbelow(2**31)
        self.output_dir = Path(config.save_path) / config.run_name
        self._check_output_dir()
        if config.lora_rank:
            check_lora_method(config, models)

    # -- checks before any model loads ---------------------------------------------------------
    @staticmethod
    def _read_resume_state(cfg: ESDConfig) -> dict:
        """The checkpoint, read once; its settings must be the new ones (the seed is taken from it when
        none is given), so that args.json records what was really used."""
        try:
            state = torch.load(cfg.resume, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say so in one line
            raise ValueError(f"--resume {cfg.resume!r} is not a readable ESD checkpoint ({type(e).__name__})") from e
        if not isinstance(state, dict) or not {"iteration", "trained", "optimizer", "config"} <= set(state):
            raise ValueError(f"--resume {cfg.resume!r} is not an ESD checkpoint (written by --save_every)")
        recorded = state["config"]
        if cfg.seed is None:
            cfg.seed = recorded.get("seed")
        conflicts = cfg.resume_conflicts(recorded)
        if conflicts:  # includes an --iterations below the recorded one, which is >= the checkpoint's iteration
            raise ValueError(f"--resume {cfg.resume!r} was trained with other settings: {'; '.join(conflicts)} "
                             "(a resumed run keeps its settings; only --iterations may grow)")
        check_resume_robust(cfg, state)
        return state

    def _check_output_dir(self) -> None:
        """An existing run is never silently replaced, and a folder that cannot be written is refused now,
        not after training."""
        out, cfg = self.output_dir, self.config
        check_output_folder(out)
        existing = [p.name for p in self._run_files(out) if p.exists()]
        resuming_here = cfg.resume and Path(cfg.resume).resolve().is_relative_to(out.resolve())
        if existing and not cfg.overwrite and not resuming_here:
            raise ValueError(f"run folder {out} already holds a run ({', '.join(existing)}); pass --overwrite to "
                             "replace it, --name for another folder, or --resume to continue it")

    @staticmethod
    def _run_files(out: Path) -> list[Path]:
        """What a run writes in its folder (weights, records, exported files, checkpoints)."""
        files = [out / n for n in ("args.json", "loss.csv", "loss.png", "README.md")]
        files += list(run_weight_files(out).values())
        files += [train_export_path(out, f) for f in ("lora", "single-file")]
        return files + sorted((out / "checkpoints").glob("checkpoint-*.pt"))

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
                                      m.family == "flux")

        if m.family == "sd3" and len(m.text_encoders) == 2:
            # SD3 without T5 conditions every prompt on 256 identical zero tokens; one of them, weighted
            # by ln(256) in attention, is the same model (esd.flow.merge_zero_t5_tokens) at a fraction of
            # the tokens: the toy's 333 become 78. The transformer keeps this attention until release().
            self.attention_before = merge_zero_t5_tokens(m.unet)
        # Text conditioning is fixed for the whole run: encode once, then drop the text encoders.
        for enc in m.text_encoders:
            enc.to(self.device, self.dtype)
        self.prompts = encode_erasure_prompts(m, cfg.words, cfg.erase_from, self.image_size,
                                              cfg.sdxl_uncond, cfg.start_guidance).to(self.device)
        # theta*'s prompts stay the ones just encoded; with --train_text_encoder theta encodes its own at every step
        self.text_encoder = None
        if cfg.train_text_encoder:
            check_loaded_text_encoders(m, "--train_text_encoder")
            self.text_encoder = TrainedTextEncoder(m.text_encoders[0], m.tokenizers[0], cfg.words, cfg.erase_from)
        # Robust training (esd/robust.py) keeps what it needs: its retain prompts, encoded, and its own encoder.
        self.robust = (RobustESD(cfg, m, self.prompts, latent_shape, self.image_size, self.text_encoder)
                       if is_robust(cfg) else None)
        m.text_encoders.clear()

        self.unet = m.unet.to(self.device)
        self.unet.requires_grad_(False)
        frozen_device = devices[1] if len(devices) == 2 else (self.device if cfg.frozen_copy else None)
        self.lora, frozen = None, None
        if cfg.lora_rank:  # only the adapters' factors train; theta* is the UNet with them off (esd.lora_train)
            self.lora = LoraTraining.attach(self.unet, cfg.train_method, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
            self.trained_names = self.lora.factor_names(self.unet)
            frozen = self.lora.frozen(self.unet) if frozen_device is None else None
        else:
            self.trained_names = select_parameters(self.unet, cfg.train_method)
        self.views = UNetViews(self.unet, self.trained_names, self.dtype, self.device, frozen_device,
                               getattr(scheduler, "alphas_cumprod", None), m.prediction_type, frozen)
        trained = set(self.trained_names)
        self.params = [p for n, p in self.unet.named_parameters() if n in trained]
        if self.text_encoder is not None:
            self.params += self.text_encoder.params
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # diffusers' blocks checkpoint when grad is enabled
        if cfg.compile:
            # One compiled forward serves both views: the module's parameters are inputs of the traced
            # graph (or guarded on), so the frozen values functional_call swaps in are used, never baked in.
            self.unet.forward = torch.compile(self.unet.forward)
        groups = self.params
        if self.text_encoder is not None and cfg.text_encoder_lr is not None:  # the encoder's own rate
            groups = [{"params": self.params[:-len(self.text_encoder.params)]},
                      {"params": self.text_encoder.params, "lr": cfg.text_encoder_lr}]
        self.optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.source = make_source(cfg, self.views, scheduler, self.prompts, latent_shape, self.generator)
        self.start_iteration = 0
        self.history: list[dict] = []
        if self.resume_state is not None:
            self._load_checkpoint(self.resume_state)
        self._check_free_space()

    def _check_free_space(self) -> None:
        """Roughly what the outputs will take (weights in the save dtype, fp32 checkpoints with Adam's two
        moments), checked before training rather than discovered after it."""
        cfg = self.config
        width = SAVE_PRECISIONS[cfg.save_precision].itemsize
        trained = sum(p.numel() for p in self.params)
        saved = trained if self.lora is None else self.lora.merged_numel(self.unet)
        need = saved * width if cfg.save_format in ("both", "trained") else 0
        need += trained * width if self.lora else 0
        if cfg.save_format in ("both", "full"):
            need += sum(v.numel() for v in self.unet.state_dict().values()) * width
        if cfg.save_every:
            need += (cfg.iterations - 1) // cfg.save_every * trained * 4 * 3
        check_free_space(self.output_dir, int(need * 1.05) + 2**20, "the weights and checkpoints")

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
        encoder = self.prompts if self.text_encoder is None else self.text_encoder  # theta's conditioning
        groups = [TrainedRows("esd", batch.latents, batch.timesteps, encoder.source(batch.concept), batch.target)]
        if self.robust is not None:  # robust ESD's adversarial and retain rows, predicted in the same forward
            groups += self.robust.rows(self.views, batch, self.generator)
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
    def train(self) -> ESDResult:
        cfg = self.config
        n_params = sum(p.numel() for p in self.params)
        print("***** Running ESD training *****")
        print(f"  concept(s) = {cfg.words}  method = {resolve_method(cfg.train_method).name}  "
              f"trained parameters = {n_params:,} in {len(self.params)} tensors"
              + ("" if self.text_encoder is None else f" (the text encoder's: {len(self.text_encoder.names)})"))
        if self.lora:
            print(self.lora.describe())
        print(f"  preset = {cfg.preset}  model = {self.models.source} ({self.models.family}, "
              f"{self.models.prediction_type})  image size = {self.image_size}  device = {self.device}  "
              f"precision = {cfg.mixed_precision}  seed = {cfg.seed}")
        if cfg.overwrite:  # asked for: the old run's files go now, so that no stale file is mixed with the new ones
            for p in self._run_files(self.output_dir):
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
        seconds = time.perf_counter() - start
        return ESDResult(self.output_dir, self.trained_names, [h["loss"] for h in self.history], seconds,
                         self.unet_evals)

    def release(self) -> None:
        """Take off what setup() put on the model for training only: an SD3 transformer's merged zero-token
        attention, so that the erased transformer in memory samples right in diffusers' pipeline (which
        appends 256 zero tokens) for a caller who passed ``models``."""
        if self.attention_before is not None:
            unmerge_zero_t5_tokens(self.unet, self.attention_before)
            self.attention_before = None

    # -- checkpoints ---------------------------------------------------------------------------
    def trained_state(self) -> dict:
        """The trained tensors (fp32, CPU): the UNet's by name, the text encoder's under ``text_encoder.``."""
        params = dict(self.unet.named_parameters())
        state = {n: params[n].detach().float().cpu() for n in self.trained_names}
        return state if self.text_encoder is None else {**state, **self.text_encoder.state()}

    def save_checkpoint(self) -> Path:
        iteration = self.history[-1]["iteration"] if self.history else self.start_iteration
        path = self.output_dir / "checkpoints" / f"checkpoint-{iteration}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"iteration": iteration, "trained": self.trained_state(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "history": self.history, "config": self.config.record(), "pool": self.source.state_dict()}
        if self.robust is not None:
            state["robust"] = self.robust.state_dict()
        torch_save(state, path)
        return path

    def _load_checkpoint(self, state: dict) -> None:
        names = sorted(self.trained_names + ([] if self.text_encoder is None else self.text_encoder.keys))
        if sorted(state["trained"]) != names:
            raise ValueError(f"checkpoint {self.config.resume!r} was trained with another train method or model "
                             f"({len(state['trained'])} tensors vs {len(names)} selected now)")
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n in self.trained_names:
                params[n].copy_(state["trained"][n])
        if self.text_encoder is not None:
            self.text_encoder.load(state["trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.start_iteration = state["iteration"]
        self.history = list(state["history"])
        self.source.load_state_dict(state.get("pool"))
        if self.robust is not None:
            self.robust.load_state_dict(state.get("robust"))

    # -- outputs -------------------------------------------------------------------------------
    def save(self, result: ESDResult | None = None) -> Path:
        """Write weights, ``args.json``, ``loss.csv``, ``loss.png`` and the model card to the output folder."""
        cfg, out = self.config, self.output_dir
        trained = self.trained_state()
        bad = [n for n, v in trained.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"training diverged: {len(bad)} trained tensors hold NaN or Inf (first: {bad[0]}); "
                             "nothing was saved (lower --lr or --negative_guidance)")
        out.mkdir(parents=True, exist_ok=True)
        weights = run_weight_files(out)
        save_dtype = SAVE_PRECISIONS[cfg.save_precision]
        if cfg.save_format in ("both", "full") or self.lora:
            if self.dtype == torch.float32:
                full = plain_state_dict(self.unet)
            else:  # frozen weights were cast down; take them from the source again at full precision
                full = load_denoiser(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config).state_dict()
        if self.lora:  # the factors go to their own file; the run's usual files hold the merged weights
            self.lora.write(trained, weights["lora"], cfg, self.unet.config, self.models.family, save_dtype)
            erased = self.lora.merged(self.unet, full)
        else:
            erased = trained
        if cfg.save_format in ("both", "full"):
            full.update(erased)
            save_full_state_dict({k: v.to(save_dtype) if v.is_floating_point() else v for k, v in full.items()},
                                 weights["full"])
        erased = {k: v.to(save_dtype) for k, v in erased.items()}
        if cfg.save_format in ("both", "trained"):
            save_trained_parameters(erased, weights["trained"],
                                    {"base_model": cfg.ckpt_path or cfg.base_model,
                                     "train_method": resolve_method(cfg.train_method).name, "prompt": cfg.prompt})
        record = {**self.config.record(), "family": self.models.family,
                  "prediction_type": self.models.prediction_type, "resolved_image_size": self.image_size,
                  "trained_parameters": sum(v.numel() for v in trained.values()),
                  "trained_tensors": len(trained), **(self.lora.record() if self.lora else {}),
                  "text_encoder_tensors": 0 if self.text_encoder is None else len(self.text_encoder.names),
                  "environment": environment_record()}
        if result is not None:
            record.update(seconds=result.seconds, unet_evals=result.unet_evals)
        if self.robust is not None:
            record["robust"] = self.robust.record()
        write_run_record(out, record, self.history)
        write_model_card(out)
        return out


def remove_export_folder(folder: Path) -> None:
    """The old run's ``esd train --export diffusers`` folder, removed under --overwrite with the rest of the old run,
    so that no stale model sits beside the new weights. A link there is unlinked, never followed."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)


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

