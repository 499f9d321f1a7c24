"""Reading and writing erased weights.

Formats written by :mod:`esd.train`:

* ``diffusers-<name>.pt``: the full diffusers UNet state dict, the format of the
  published ESD weights; ``unet.load_state_dict(torch.load(path))`` loads it.
* ``<name>.safetensors``: only the trained parameters (small), with metadata
  naming the base model and train method.

It also loads the official ESD code's ``esd-<concept>-from-<concept>-<method>.safetensors`` (the
trained tensors alone, diffusers names, bf16, no metadata) over the base model.

:func:`load_erased_unet` also reads CompVis-format ``.pt`` / ``.ckpt`` files
(keys ``model.diffusion_model.*``, as the paper's original code saved them).
Loading is strict and never unpickles arbitrary objects.
"""

import json
import struct
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from esd.families.models import load_denoiser, load_models
from esd.families.sources import DEFAULT_BASE_MODEL, ModelLoadError
from esd.formats.records import atomic_write, read_json, torch_save

COMPVIS_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "text_encoder."  # of the text encoder's tensors (--train_text_encoder)
TRAINED_FORMAT = "esd-trained-parameters"


def run_weight_files(run_dir) -> dict[str, Path]:
    """Where ``esd train`` writes a run's weights: ``full``, the whole diffusers UNet state dict (the
    published ESD weights' format), ``trained``, the trained tensors alone (with --lora_rank: the merged
    weights of the adapted layers), and ``lora``, the trained LoRA's factors (with --lora_rank only)."""
    run_dir = Path(run_dir)
    return {"full": run_dir / f"diffusers-{run_dir.name}.pt", "trained": run_dir / f"{run_dir.name}.safetensors",
            "lora": run_dir / f"lora-{run_dir.name}.safetensors"}


def save_full_state_dict(state_dict: dict, path) -> None:
    torch_save(state_dict, path)


def deterministic_safetensors(tensors: dict, metadata: dict) -> bytes:
    """The safetensors file of ``tensors`` with its JSON header's keys sorted. safetensors writes the
    metadata in the order of a Rust HashMap, which changes from process to process, so two identical
    erasures would otherwise differ in their bytes and hashes. Only the header is rewritten: the data
    offsets are unchanged, and the header is padded with spaces to 8 bytes as safetensors does."""
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + n:]


def save_trained_parameters(params: dict, path, metadata: dict) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    meta = {"format": TRAINED_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    data = deterministic_safetensors(tensors, meta)
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def _safetensors(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; ``tensors=False`` reads the header alone ({} for them)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"could not read {str(path)!r} as safetensors ({_first_line(e)})") from e


def _torch_state_dict(path: Path, mmap: bool = False) -> dict:
    """The tensors of a weights-only torch file (a ``{"state_dict": ...}`` wrapper unwrapped); pickles with
    arbitrary objects are refused. ``mmap``: the tensors are mapped, not read (zip files only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - pickles with arbitrary objects are refused on purpose
        raise ModelLoadError(f"could not read {str(path)!r} as a weights-only torch file ({_first_line(e)}); "
                             "only tensor state dicts are loaded") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{str(path)!r} does not hold a state dict of tensors")
    return obj


def read_weights(path) -> tuple[dict, dict]:
    """Return (state_dict, metadata) of a weights file; tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _safetensors(path)
    obj = _torch_state_dict(path)
    meta = {}
    args = path.parent / "args.json"
    if args.exists():  # a run's record, which names the base model (for error messages)
        try:
            record = read_json(args)
        except ValueError as e:
            raise ModelLoadError(f"{e}: the args.json beside weights file {str(path)!r} must be a run record "
                                 "(a JSON object) or absent") from e
        if not isinstance(record, dict):
            raise ModelLoadError(f"{str(args)!r} beside the weights is not a run record (a JSON object; it holds "
                                 f"a {type(record).__name__}); fix or remove it, or move {path.name} elsewhere")
        base = record.get("base_model", "")
        meta = {"base_model": base if isinstance(base, str) else ""}
    return obj, meta


def _first_line(e: Exception) -> str:
    """'Type: first line of the message' (an empty file gives an exception with no message)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _describe(names, limit=3) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights_file(path) -> None:
    """Refuse, before any model loads, a weights file that is missing or unreadable: a safetensors file
    whose header does not parse, or a torch file that is not a weights-only state dict of tensors. Cheap:
    a safetensors header is read alone, a torch zip file is memory-mapped (its tensors are not read).
    Whether it fits the model is :func:`check_erased_weights`'s question, once the model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        _safetensors(path, tensors=False)
        return
    try:
        _torch_state_dict(path, mmap=True)
    except ModelLoadError:  # a legacy (non-zip) file cannot be mapped: read it whole, which names any error
        _torch_state_dict(path)


def check_erased_weights(unet: torch.nn.Module, path, base_model: str = "the base model",
                         text_encoder: torch.nn.Module | None = None) -> None:
    """Every check of :func:`apply_erased_weights` (keys, shapes, finite values), loading nothing: for a
    command that uses the base weights first (``esd attack`` draws its references with them) and must
    refuse a file that does not fit before that work."""
    _erased_loads(unet, path, base_model, text_encoder)


def apply_erased_weights(unet: torch.nn.Module, path, base_model: str = "the base model",
                         text_encoder: torch.nn.Module | None = None) -> list[str]:
    """Load an erased-weights file into ``unet`` in place, strictly.

    Full state dicts (diffusers or CompVis keys) must match every key and shape;
    trained-parameter files must name only existing keys with matching shapes. A file trained with
    ``--train_text_encoder`` also holds text-encoder tensors (``text_encoder.*``): they go into
    ``text_encoder`` (a pipeline's), under the same checks, and without one the file is refused.
    Nothing is loaded unless everything fits. Returns the names of the tensors loaded."""
    loads, names = _erased_loads(unet, path, base_model, text_encoder)
    with torch.no_grad():
        for module, tensors, _, _ in loads:
            own = module.state_dict()
            for k, v in tensors.items():
                own[k].copy_(v)
    return names


def _erased_loads(unet: torch.nn.Module, path, base_model: str, text_encoder: torch.nn.Module | None):
    """([(module, tensors, partial, prefix)], names of the tensors) of an erased-weights file, every load
    checked to fit (see :func:`apply_erased_weights`)."""
    state_dict, meta = read_weights(path)
    prefix = TEXT_ENCODER_PREFIX
    encoder_part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    trained_from = meta.get("base_model") or "unknown"
    if encoder_part and text_encoder is None:
        raise ModelLoadError(f"weights file {str(path)!r} also erases the text encoder ({len(encoder_part)} tensors "
                             f"'{prefix}*', trained with --train_text_encoder); load it into a pipeline (esd "
                             f"generate, esd attack, ESDPipeline, or apply_erased_weights(pipe.unet, path, "
                             f"text_encoder=pipe.text_encoder)), not into a UNet alone")
    if any(k.startswith(COMPVIS_PREFIX) for k in state_dict):
        state_dict = convert_ldm_unet_checkpoint(state_dict, dict(unet.config))
        partial = False
    else:
        # This project's trained-parameters file, or the official ESD code's output (esd_sd.py and its
        # siblings save_file() only the trained tensors, with diffusers names and no metadata): both are
        # loaded over the base, strictly (every key in the base, with its shape).
        partial = meta.get("format") == TRAINED_FORMAT or (Path(path).suffix == ".safetensors" and not meta)
    if not state_dict:
        raise ModelLoadError(f"weights file {str(path)!r} does not fit {base_model}: no tensors; the file was "
                             f"trained from {trained_from}")
    loads = [(unet, state_dict, partial, "")]
    if encoder_part:
        loads.append((text_encoder, encoder_part, True, TEXT_ENCODER_PREFIX))
    for module, tensors, part, prefix in loads:
        _check_fits(module, tensors, part, prefix, path, base_model, trained_from)
    return loads, list(state_dict) + [TEXT_ENCODER_PREFIX + k for k in encoder_part]


def _check_fits(module: torch.nn.Module, tensors: dict, partial: bool, prefix: str, path, base_model: str,
                trained_from: str) -> None:
    """Every key of ``tensors`` in ``module`` with its shape (and, unless ``partial``, every key of the module
    in ``tensors``), and every value finite; else one line naming what does not fit (keys shown with ``prefix``)."""
    own = module.state_dict()
    missing = set() if partial else {prefix + k for k in set(own) - set(tensors)}
    unexpected = {prefix + k for k in set(tensors) - set(own)}
    mismatched = [f"{prefix}{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing keys ({_describe(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_describe(unexpected)})" if unexpected else "",
                 f"{len(mismatched)} shape mismatches ({_describe(mismatched, 2)})" if mismatched else ""]
        raise ModelLoadError(f"weights file {str(path)!r} does not fit {base_model}: "
                             f"{'; '.join(p for p in parts if p)}; the file was trained from {trained_from}")
    bad = [prefix + k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged erasure: its images would be noise, not evidence
        raise ModelLoadError(f"weights file {str(path)!r} holds NaN or Inf in {len(bad)} tensors "
                             f"({_describe(bad)}); refusing to load it")


def load_erased_unet(weights_path, base_model: str = DEFAULT_BASE_MODEL, ckpt_path: str | None = None,
                     ckpt_config: str | None = None, unet: torch.nn.Module | None = None):
    """A diffusers ``UNet2DConditionModel`` (for SD3/FLUX the transformer) of ``base_model`` (or
    ``ckpt_path``) with erased weights from ``weights_path`` loaded strictly.

    Accepts a full diffusers UNet ``.pt`` (the published ESD weights), a
    trained-parameters ``.safetensors`` and a CompVis-format ``.pt``/``.ckpt``."""
    if unet is None:
        if ckpt_path is None:
            unet = load_denoiser(base_model)
        else:
            unet = load_models(base_model, ckpt_path, ckpt_config).unet
    apply_erased_weights(unet, weights_path, base_model=ckpt_path or base_model)
    return unet
