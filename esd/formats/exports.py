"""``esd export``: an erasure in the formats other tools load.

* ``lora``: the weight change as a kohya-named LoRA (see :mod:`esd.formats.lora`), for diffusers'
  ``load_lora_weights``, AUTOMATIC1111 and ComfyUI; for SD3/FLUX in diffusers' own transformer layout.
* ``single-file``: the whole erased model as one original-layout ``.safetensors``
  (see :mod:`esd.families.ldm_single_file`);
  SD 1.x/2.x/SDXL only: the original SD3/FLUX layout is not written.
* ``diffusers``: a pipeline folder (``save_pretrained``) with the erased UNet, or SD3/FLUX transformer.

Each output says how it was made: the safetensors header (or ``esd_export.json`` in a folder) holds the base
model, concept, method, the export's settings, the run's args.json and the environment.
"""

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from esd.core.precision import SAVE_PRECISIONS
from esd.families.family import Family
from esd.families.ldm_single_file import checkpoint_to_ldm
from esd.families.sources import pipeline_load_kwargs, resolve_source
from esd.formats.erasure_source import Erasure, LoadedErasure, find_erasure, load_erasure
from esd.formats.lora import RANK_CHOICES, LoraExport, lora_from_erasure, lora_metadata
from esd.formats.records import (
    TMPDIR_SUFFIX,
    OutputError,
    atomic_write,
    check_free_space,
    check_not_input,
    check_output_folder,
    describe_os_error,
    environment_record,
    remove_orphans,
)
from esd.formats.weights import deterministic_safetensors

FORMATS = ("lora", "single-file", "diffusers")
FILE_FORMATS = ("lora", "single-file")  # one .safetensors file; "diffusers" is a folder
DEFAULT_DTYPE = "fp16"  # what A1111/ComfyUI checkpoints and LoRAs ship in: half the size of fp32
DEFAULT_MAX_REL_ERROR = 0.01  # --rank auto: each layer's change kept to 1% (relative Frobenius error)
RECORD_NAME = "esd_export.json"  # a diffusers folder's record


@dataclass
class ExportSettings:
    format: str
    out: Path
    rank: int | str = "auto"  # lora only: a positive integer, 'full' or 'auto'
    max_rel_error: float = DEFAULT_MAX_REL_ERROR  # lora with rank 'auto'
    dtype: str = DEFAULT_DTYPE
    overwrite: bool = False

    def check(self) -> None:
        """Refuse, before anything is loaded, a bad setting or an output that would replace something."""
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not valid; choose from {', '.join(FORMATS)}")
        if self.rank not in RANK_CHOICES and not (type(self.rank) is int and self.rank > 0):
            raise ValueError(f"--rank {self.rank!r} is not valid; use a positive integer, 'full' or 'auto'")
        if self.dtype not in SAVE_PRECISIONS:
            raise ValueError(f"--dtype {self.dtype!r} is not valid; choose from {', '.join(SAVE_PRECISIONS)}")
        if not 0 < self.max_rel_error < 1:
            raise ValueError(f"--max_rel_error {self.max_rel_error} is not in (0, 1)")
        out = self.out
        if self.format in FILE_FORMATS and out.suffix != ".safetensors":
            raise ValueError(f"--out {str(out)!r}: a {self.format} export is one file; its name must end "
                             "in .safetensors")
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise ValueError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or "
                                 "choose another path")
            if self.format in FILE_FORMATS and not out.is_file():
                raise ValueError(f"--out {str(out)!r} is a folder, not a file; it is not replaced")
            if self.format == "diffusers" and not (out / "model_index.json").is_file():
                raise ValueError(f"--out {str(out)!r} is not a diffusers pipeline folder (no model_index.json); "
                                 "only such a folder is replaced by --overwrite")
        check_output_folder(out.parent, "--out")

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAVE_PRECISIONS[self.dtype]


# The ExportSettings fields `esd train --export` takes (as --export_<field>); format, out and overwrite come from
# the run: the files go to RUN/export/ (train_export_path) and are replaced only with the run's --overwrite.
TRAIN_EXPORT_OPTIONS = ("rank", "max_rel_error", "dtype")


def train_export_path(run_dir: str | os.PathLike, fmt: str) -> Path:
    """Where ``esd train --export FORMAT`` writes: RUN/export/lora.safetensors, single-file.safetensors, diffusers/."""
    return Path(run_dir) / "export" / (fmt if fmt not in FILE_FORMATS else f"{fmt}.safetensors")


def formats_of(family: Family) -> tuple[str, ...]:
    """The formats a model of ``family`` can be written in: single-file where the family has a writer of its
    original layout (esd.families.ldm_single_file is the UNets'; SD3/FLUX have none)."""
    return tuple(f for f in FORMATS if f != "single-file" or family.ldm_text_encoders is not None)


def check_formats(formats: list[str], family: Family | None, flag: str = "--format") -> None:
    """Refuse, before any weights load, a format that a model of this ``family`` (None: not known yet) cannot
    be written in."""
    valid = formats_of(family) if family is not None else FORMATS
    bad = [f for f in formats if f not in valid]
    if bad:
        raise ValueError(f"{flag} {bad[0]} is not available for {family} erasures (the original SD3/FLUX layout "
                         f"is not written); use {' or '.join(valid)}")


def train_exports(run_dir: str | os.PathLike, formats: list[str], options: dict,
                  overwrite: bool, family: Family | None = None) -> list[ExportSettings]:
    """The exports of ``esd train --export``, each checked now (before any training) as ``esd export`` checks."""
    unknown = sorted(set(options) - set(TRAIN_EXPORT_OPTIONS))
    if unknown:
        raise ValueError(f"export option(s) {', '.join(unknown)} not valid; choose from "
                         f"{', '.join(TRAIN_EXPORT_OPTIONS)}")
    if options and not formats:
        given = ", ".join(f"--export_{name}" for name in TRAIN_EXPORT_OPTIONS if name in options)
        raise ValueError(f"{given} set without --export, which {'they configure' if ',' in given else 'it configures'}"
                         f"; add --export FORMAT (one or more of: {', '.join(FORMATS)}) or drop {given}")
    bad = [f for f in formats if f not in FORMATS]
    if bad or len(set(formats)) != len(formats):
        raise ValueError(f"--export {','.join(formats)!r} is not valid: give each of {', '.join(FORMATS)} at most once")
    check_formats(formats, family, "--export")
    settings = [ExportSettings(f, train_export_path(run_dir, f), overwrite=overwrite, **options) for f in formats]
    for s in settings:
        s.check()
    return settings


def provenance(erasure: Erasure, settings: ExportSettings) -> dict:
    """How an export was made: what it came from and with which settings and versions."""
    return {"source": str(erasure.weights), "base_model": erasure.base, "concept": erasure.concept,
            "train_method": erasure.train_method,
            "export": {k: str(v) for k, v in vars(settings).items()},
            "erasure": erasure.record, "environment": environment_record()}


def header_metadata(record: dict) -> dict[str, str]:
    """The record as safetensors metadata (strings only); the main facts also as keys of their own."""
    return {"esd_base_model": record["base_model"], "esd_concept": record["concept"],
            "esd_train_method": record["train_method"], "esd_export": json.dumps(record, sort_keys=True)}


def write_safetensors(tensors: dict, metadata: dict, out: Path, replace: bool = True) -> None:
    """``replace=False``: fail if ``out`` appeared meanwhile (a concurrent export), replacing nothing."""
    data = deterministic_safetensors(tensors, metadata)
    check_free_space(out.parent, len(data), str(out))
    atomic_write(out, lambda p: Path(p).write_bytes(data), replace=replace)


def write_lora(loaded: LoadedErasure, record: dict, settings: ExportSettings) -> LoraExport:
    export = lora_from_erasure(loaded.models.unet, loaded.changed, loaded.models.family, settings.rank,
                               settings.max_rel_error, settings.torch_dtype)
    metadata = {**header_metadata(record), **lora_metadata(export, settings.rank, settings.max_rel_error,
                                                           loaded.models.family, settings.out.stem,
                                                           str(record.get("base_model", "")))}
    write_safetensors(export.tensors, metadata, settings.out, replace=settings.overwrite)
    return export


def write_single_file(loaded: LoadedErasure, record: dict, settings: ExportSettings) -> None:
    m = loaded.models
    ckpt = checkpoint_to_ldm(loaded.erased_unet.state_dict(), m.unet.config, m.family.ldm_text_encoders, m.vae,
                             m.text_encoders)
    dtype = settings.torch_dtype
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ckpt.items()}
    check_free_space(settings.out.parent, sum(v.nbytes for v in tensors.values()), str(settings.out))
    # Written straight to disk (save_file), not through bytes in memory: an SDXL file is 7 GB in fp16.
    atomic_write(settings.out, lambda p: save_file(tensors, p, metadata=header_metadata(record)),
                 replace=settings.overwrite)  # no --overwrite: a file that appeared meanwhile is kept


def write_diffusers(loaded: LoadedErasure, erasure: Erasure, record: dict, settings: ExportSettings) -> None:
    """The base pipeline, every part of it (safety checker, feature extractor...), with the erased UNet or
    transformer. An SD3/FLUX single-file base is a transformer file whose other parts are its --ckpt_config's."""

    m = loaded.models
    pipe = m.family.assemble_pipeline(m, loaded.erased_unet) if erasure.ckpt_path else None
    if pipe is None:  # the base's folder, or the --ckpt_config folder of a transformer file
        source = resolve_source(erasure.ckpt_config if erasure.ckpt_path else erasure.base_model)
        pipe = DiffusionPipeline.from_pretrained(source, **{m.family.subfolder: loaded.erased_unet},
                                                 local_files_only=os.path.isdir(source),
                                                 **pipeline_load_kwargs(DiffusionPipeline.load_config(source)))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # torch's own .to: diffusers' warns of "modules to keep in float32" even when there are none
            torch.nn.Module.to(component, settings.torch_dtype)
    width = settings.torch_dtype.itemsize
    need = sum(p.numel() * width for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())
    check_free_space(settings.out.parent, need, str(settings.out))

    def write(folder: Path):
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))

    write_folder(settings.out, write)


def write_folder(out: Path, write) -> None:
    """``write(tmp_folder)`` then rename it to ``out``: ``out`` is never a half-written folder. A replaced
    folder is renamed away just before (a directory cannot be renamed onto a full one) and removed after, or
    put back when the new one does not get into place (a failed rename, Ctrl-C); the temporary folder goes.
    Temporary folders of killed exports in the same folder are removed first (remove_orphans)."""
    remove_orphans(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(8)}{TMPDIR_SUFFIX}")
    old = tmp.with_name(tmp.name + "-old")
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as e:  # a failed write or rename, or Ctrl-C (KeyboardInterrupt) at any point
        if old.exists() and not os.path.lexists(out):  # renamed away, the new folder not in place: put it back
            os.replace(old, out)
        if isinstance(e, OSError):
            raise OutputError(describe_os_error(e, out)) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(out):  # the old folder is only removed once a folder is in its place
            shutil.rmtree(old, ignore_errors=True)


def run_export(source: str, settings: ExportSettings, base_model: str | None = None, ckpt_path: str | None = None,
               ckpt_config: str | None = None, log=print) -> LoraExport | None:
    """Check everything, load the base model and the erasure, write the export. Returns the LoRA's
    factors and errors for ``lora``."""
    settings.check()
    erasure = find_erasure(source, base_model, ckpt_path, ckpt_config)
    run = Path(source) if Path(source).is_dir() else None
    check_not_input(settings.out, {"the erasure": source, "its weights": erasure.weights,
                                   "its args.json": run / "args.json" if run else None, "--base_model":
                                   erasure.base_model, "--ckpt_path": ckpt_path, "--ckpt_config": ckpt_config},
                    may_hold=("the erasure",))  # a run's exports go into its export/ folder
    check_formats([settings.format], erasure.family)
    loaded = load_erasure(erasure, load_vae=settings.format != "lora")
    record = provenance(erasure, settings)
    settings.out.parent.mkdir(parents=True, exist_ok=True)  # checked to be makeable before loading
    log(f"{erasure.weights} ({erasure.train_method or 'unknown method'}, concept {erasure.concept!r}): "
        f"{len(loaded.changed)} changed tensors over {erasure.base}")
    if settings.format == "lora":
        export = write_lora(loaded, record, settings)
        ranks = sorted({f.rank for f in export.layers.values()})
        log(f"LoRA of {len(export.layers)} layers, rank {ranks[0]}..{ranks[-1]}, relative error "
            f"{export.total_rel_error:.3g} (max per layer {max(f.rel_error for f in export.layers.values()):.3g})")
        if export.dropped:
            log(f"warning: a LoRA cannot hold biases and norm parameters: the change of {len(export.dropped)} "
                f"tensors is left out (largest relative change {max(export.dropped.values()):.3g}, "
                f"{max(export.dropped, key=export.dropped.get)}); --format single-file or diffusers keeps it")
        log(f"wrote {settings.out}")
        return export
    if settings.format == "single-file":
        write_single_file(loaded, record, settings)
    else:
        write_diffusers(loaded, erasure, record, settings)
    log(f"wrote {settings.out}")
    return None
