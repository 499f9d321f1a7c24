"""What is exported: an erasure's weights file, the base model it was trained from, its concept and method,
found from a run folder (args.json beside the weights) or a weights file (its safetensors metadata)."""

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from esd.families.family import Family
from esd.families.models import DiffusionModels, load_models
from esd.families.sources import ModelLoadError, resolve_source, single_file_family, source_family
from esd.formats.records import error_summary, read_json
from esd.formats.weights import apply_erased_weights, run_weight_files


@dataclass
class Erasure:
    weights: Path
    base_model: str | None
    ckpt_path: str | None
    ckpt_config: str | None
    concept: str
    train_method: str
    record: dict  # the run's args.json, or {} for a bare weights file

    @property
    def family(self) -> Family | None:
        """The base model's family, from its configs or the checkpoint's tensor names (no weights load); None
        when unreadable yet (a hub id not cached)."""
        if self.ckpt_path is None:
            return source_family(self.base_model)
        return single_file_family(self.ckpt_path, self.ckpt_config)

    @property
    def base(self) -> str:
        """The base model as the user would name it."""
        return self.ckpt_path or self.base_model


def _weights_in(folder: Path) -> Path:
    """A run folder's weights: the trained-parameters file (small, the trained values themselves), else the
    full diffusers UNet."""
    files = run_weight_files(folder)
    for candidate in (files["trained"], files["full"]):
        if candidate.is_file():
            return candidate
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("diffusers-*.pt"))
    if not found:
        raise ValueError(f"run folder {str(folder)!r} holds no weights ({folder.name}.safetensors or "
                         f"diffusers-{folder.name}.pt); pass the weights file itself")
    return found[0]


def _metadata(weights: Path) -> dict:
    """The strings in a safetensors header (the trained-parameters file names its base model, method and
    prompt); {} for other files."""
    if weights.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"could not read {str(weights)!r} as safetensors ({error_summary(e)})") from e


def find_erasure(source: str, base_model: str | None = None, ckpt_path: str | None = None,
                 ckpt_config: str | None = None) -> Erasure:
    """Read what ``source`` (a run folder or a weights file) says about itself; the flags override it.
    Only small files are read: nothing is loaded."""
    path = Path(source)
    if path.is_dir():
        weights = _weights_in(path)
    elif path.is_file():
        weights = path
    else:
        raise ValueError(f"{source!r} does not exist; pass a run folder of `esd train` or a weights file")
    args_file = weights.parent / "args.json"
    record = read_json(args_file) if args_file.is_file() else {}
    if not isinstance(record, dict):
        raise ValueError(f"{str(args_file)!r} is not a run record (a JSON object)")
    meta = _metadata(weights)
    if base_model is None and ckpt_path is None:
        base_model, ckpt_path, ckpt_config = record.get("base_model"), record.get("ckpt_path"), \
            ckpt_config or record.get("ckpt_config")
        if not record and meta.get("base_model"):  # trained-parameters metadata: ckpt_path or base_model
            recorded = meta["base_model"]
            base_model, ckpt_path = (None, recorded) if os.path.isfile(recorded) else (recorded, None)
    if ckpt_path is None and base_model is None:
        raise ValueError(f"{str(weights)!r} does not say which base model it was trained from (no args.json beside "
                         "it, no metadata); pass --base_model (hub id, diffusers folder or 'toy') or --ckpt_path")
    if ckpt_path is not None:
        if not os.path.isfile(ckpt_path):
            raise ModelLoadError(f"checkpoint file {ckpt_path!r} does not exist; pass --ckpt_path or --base_model")
    else:
        resolve_source(base_model)  # a missing local folder fails now, not after loading
    return Erasure(weights, base_model, ckpt_path, ckpt_config, record.get("prompt") or meta.get("prompt", ""),
                   record.get("train_method") or meta.get("train_method", ""), record)


@dataclass
class LoadedErasure:
    models: DiffusionModels  # the base model, untouched
    erased_unet: torch.nn.Module  # a copy of the base UNet with the erased weights loaded
    changed: dict  # diffusers name -> erased tensor, for every tensor the weights file changed


def _unchanged(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Equal, or equal once the base is rounded to the half precision the file was saved in (a full fp16
    UNet file differs from an fp32 base in every tensor, trained or not)."""
    if torch.equal(new, old):
        return True
    return old.is_floating_point() and any(torch.equal(new, old.to(d).to(old.dtype))
                                           for d in (torch.float16, torch.bfloat16))


def load_erasure(erasure: Erasure, load_vae: bool = False) -> LoadedErasure:
    """The base model and a copy of its UNet with the erasure loaded (strictly: see apply_erased_weights)."""
    models = load_models(erasure.base_model or "", erasure.ckpt_path, erasure.ckpt_config, load_vae=load_vae)
    erased_unet = copy.deepcopy(models.unet)
    names = apply_erased_weights(erased_unet, erasure.weights, base_model=erasure.base)
    base, new = models.unet.state_dict(), erased_unet.state_dict()
    changed = {n: new[n] for n in names if not _unchanged(new[n], base[n])}
    if not changed:
        raise ValueError(f"{str(erasure.weights)!r} equals the base model {erasure.base}: nothing was erased")
    return LoadedErasure(models, erased_unet, changed)
