"""The run folder of ``esd train``: what it holds, the checks before a run writes there (an existing run is
never silently replaced; a resumed checkpoint must match the settings; there is room for the outputs), the
checkpoints of a :class:`esd.train.recipe.ESDTrainer` (written and restored), and its final save: weights,
args.json, loss.csv and loss.png, the model card."""

import shutil
from pathlib import Path

import torch

from esd.core.methods import resolve_method
from esd.core.precision import SAVE_PRECISIONS
from esd.families.models import load_denoiser
from esd.formats.exports import train_export_path
from esd.formats.records import check_free_space, check_output_folder, environment_record, torch_save, write_run_record
from esd.formats.weights import run_weight_files, save_full_state_dict, save_trained_parameters
from esd.train.lora import plain_state_dict
from esd.train.modelcard import write_model_card
from esd.train.robust_settings import check_resume_robust


def read_resume_state(cfg) -> dict:
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


def check_output_dir(out: Path, cfg) -> None:
    """An existing run is never silently replaced, and a folder that cannot be written is refused now,
    not after training."""
    check_output_folder(out)
    existing = [p.name for p in run_files(out) if p.exists()]
    resuming_here = cfg.resume and Path(cfg.resume).resolve().is_relative_to(out.resolve())
    if existing and not cfg.overwrite and not resuming_here:
        raise ValueError(f"run folder {out} already holds a run ({', '.join(existing)}); pass --overwrite to "
                         "replace it, --name for another folder, or --resume to continue it")


def run_files(out: Path) -> list[Path]:
    """What a run writes in its folder (weights, records, exported files, checkpoints)."""
    files = [out / n for n in ("args.json", "loss.csv", "loss.png", "README.md")]
    files += list(run_weight_files(out).values())
    files += [train_export_path(out, f) for f in ("lora", "single-file")]
    return files + sorted((out / "checkpoints").glob("checkpoint-*.pt"))


def save_run(trainer, result=None) -> Path:
    """Write ``trainer``'s weights, ``args.json``, ``loss.csv``, ``loss.png`` and the model card to its output
    folder."""
    cfg, out = trainer.config, trainer.output_dir
    trained = trainer.trained_state()
    bad = [n for n, v in trained.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"training diverged: {len(bad)} trained tensors hold NaN or Inf (first: {bad[0]}); "
                         "nothing was saved (lower --lr or --negative_guidance)")
    out.mkdir(parents=True, exist_ok=True)
    weights = run_weight_files(out)
    save_dtype = SAVE_PRECISIONS[cfg.save_precision]
    full = None
    if cfg.save_format in ("both", "full") or trainer.theta.needs_full_state:
        if trainer.dtype == torch.float32:
            full = plain_state_dict(trainer.unet)
        else:  # frozen weights were cast down; take them from the source again at full precision
            full = load_denoiser(cfg.base_model, cfg.ckpt_path, cfg.ckpt_config).state_dict()
    # LoRA: the factors go to their own file and the run's usual files hold the merged weights
    trainer.theta.write_own(trained, weights["lora"], cfg, trainer.unet.config, trainer.models.family, save_dtype)
    erased = trainer.theta.erasure(trainer.unet, trained, full)
    if cfg.save_format in ("both", "full"):
        full.update(erased)
        save_full_state_dict({k: v.to(save_dtype) if v.is_floating_point() else v for k, v in full.items()},
                             weights["full"])
    erased = {k: v.to(save_dtype) for k, v in erased.items()}
    if cfg.save_format in ("both", "trained"):
        save_trained_parameters(erased, weights["trained"],
                                {"base_model": cfg.ckpt_path or cfg.base_model,
                                 "train_method": resolve_method(cfg.train_method).name, "prompt": cfg.prompt})
    record = {**trainer.config.record(), "family": trainer.models.family.name,
              "prediction_type": trainer.models.prediction_type, "resolved_image_size": trainer.image_size,
              "trained_parameters": sum(v.numel() for v in trained.values()),
              "trained_tensors": len(trained), **trainer.theta.record(),
              "text_encoder_tensors": 0,  # unless an extension trains the text encoder (its entries follow)
              "environment": environment_record()}
    if result is not None:
        record.update(seconds=result.seconds, unet_evals=result.unet_evals)
    for e in trainer.extensions:  # the text encoder's tensor count, robust ESD's rounds
        record.update(e.record_entries())
    write_run_record(out, record, trainer.history)
    write_model_card(out)
    return out


def remove_export_folder(folder: Path) -> None:
    """The old run's ``esd train --export diffusers`` folder, removed under --overwrite with the rest of the old run,
    so that no stale model sits beside the new weights. A link there is unlinked, never followed."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)


def check_room(trainer) -> None:
    """The run folder has room for roughly what ``trainer``'s outputs will take (weights in the save dtype,
    fp32 checkpoints with Adam's two moments), checked before training rather than discovered after it."""
    cfg = trainer.config
    width = SAVE_PRECISIONS[cfg.save_precision].itemsize
    trained = sum(p.numel() for p in trainer.params)
    saved, own_file = trainer.theta.saved_numel(trainer.unet, trained)
    need = saved * width if cfg.save_format in ("both", "trained") else 0
    need += own_file * width
    if cfg.save_format in ("both", "full"):
        need += sum(v.numel() for v in trainer.unet.state_dict().values()) * width
    if cfg.save_every:
        need += (cfg.iterations - 1) // cfg.save_every * trained * 4 * 3
    check_free_space(trainer.output_dir, int(need * 1.05) + 2**20, "the weights and checkpoints")


def write_checkpoint(trainer) -> Path:
    """``trainer``'s state now (trained tensors, optimizer, RNG, loss history, settings, pool, robust ESD's
    rounds) as ``checkpoints/checkpoint-<iteration>.pt`` in its run folder."""
    iteration = trainer.history[-1]["iteration"] if trainer.history else trainer.start_iteration
    path = trainer.output_dir / "checkpoints" / f"checkpoint-{iteration}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"iteration": iteration, "trained": trainer.trained_state(),
             "optimizer": trainer.optimizer.state_dict(), "generator": trainer.generator.get_state(),
             "history": trainer.history, "config": trainer.config.record(), "pool": trainer.source.state_dict()}
    for e in trainer.extensions:  # e.g. robust ESD's rounds
        if (extra := e.state_dict()) is not None:
            state[e.name] = extra
    torch_save(state, path)
    return path


def restore_checkpoint(trainer, state: dict) -> None:
    """``trainer`` as the checkpoint ``state`` left it (which must hold the tensors it trains)."""
    names = sorted(trainer.trained_names + [k for e in trainer.extensions for k in e.trained_tensors()])
    if sorted(state["trained"]) != names:
        raise ValueError(f"checkpoint {trainer.config.resume!r} was trained with another train method or model "
                         f"({len(state['trained'])} tensors vs {len(names)} selected now)")
    params = dict(trainer.unet.named_parameters())
    with torch.no_grad():
        for n in trainer.trained_names:
            params[n].copy_(state["trained"][n])
    for e in trainer.extensions:
        e.load_trained(state["trained"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.generator.set_state(state["generator"])
    trainer.start_iteration = state["iteration"]
    trainer.history = list(state["history"])
    trainer.source.load_state_dict(state.get("pool"))
    for e in trainer.extensions:
        e.load_state_dict(state.get(e.name))
