"""The app's runs folder: the one place it reads from and writes to, and the base models it offers.

Runs are ``esd train``'s run folders (the app trains into it exactly as ``--save_path`` would, and lists the
runs the command line put there too); uploaded weights go to ``uploads/``; each run's app outputs (test
images, evaluations, attacks) to ``<run>/app/``, its exports where ``esd train --export`` puts them. Every name
that comes from the page (a run, an upload's file name) is a plain file name checked to resolve inside the
folder, with no symbolic link on the way, so nothing typed or uploaded reads or writes elsewhere.

The base models the page may name are the toy models, those the runs in the folder were trained from, and those
the operator offers (``esd app --models``; ``*``: any model esd train takes, the default on a loopback address):
a model a stranger types is checked against that list before any file or the hub is looked at, so the page can
neither read an arbitrary local folder as a model nor tell which paths exist.
"""

import hashlib
import json
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from esd.families.sources import TOY_MODELS
from esd.formats.erasure_source import Erasure, find_erasure
from esd.formats.records import atomic_write, check_inside, check_name, safe_name
from esd.formats.weights import check_weights_file, run_weight_files

UPLOADS = "uploads"
APP_OUTPUTS = "app"  # inside a run folder: what the app made of the run
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # this project's files and the official ESD code's
DEFAULT_MAX_UPLOAD_MB = 4096  # an SD 1.x UNet in fp32 is 3.4 GB; SDXL's or FLUX's own runs are trained here
DEFAULT_MAX_ITERATIONS = 20_000  # 20x the paper's 1000
ANY_MODEL = "*"  # esd app --models '*': any base model esd train takes
LISTING_SECONDS = 2.0  # the runs listing is read again at most this often (every open page polls it)


@dataclass(frozen=True)
class RunInfo:
    name: str
    status: str  # "done": weights and args.json; "resumable": checkpoints only (a cancelled or killed run)
    concept: str
    train_method: str
    base_model: str
    iterations: int | None


class RunsFolder:
    def __init__(self, root: str | Path, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
                 models: tuple[str, ...] = (ANY_MODEL,), max_iterations: int = DEFAULT_MAX_ITERATIONS):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_mb) * 2**20
        self.models = tuple(models)  # what the operator offers beside the toys and the runs' own bases
        self.max_iterations = int(max_iterations)  # the most a training from the page may run
        self._listing: tuple[float, list] | None = None
        self._generation = 0  # changed() counts up: a scan that started before a change is not kept
        self._lock = threading.Lock()

    # -- base models from the page ---------------------------------------------------------------
    def offered_models(self) -> list[str]:
        """The toy models, the operator's (--models) and the bases the finished runs here were trained from."""
        recorded = [r.base_model for r in self.runs() if r.base_model]
        return list(dict.fromkeys([*TOY_MODELS, *(m for m in self.models if m != ANY_MODEL), *recorded]))

    def check_model(self, base_model: str, what: str = "base model") -> str:
        """``base_model`` if the app offers it; else a one-line refusal that looks at no file (nothing about the
        name, whether it exists or what it holds, is told)."""
        base_model = (base_model or "").strip()
        if not base_model:
            raise ValueError(f"no {what} given; one of: {', '.join(self.offered_models())}")
        if ANY_MODEL in self.models or base_model in self.offered_models():
            return base_model
        raise ValueError(f"{what} {base_model!r} is not offered by this app; valid: "
                         f"{', '.join(self.offered_models())} (the operator adds models with esd app --models)")

    # -- names from the page ---------------------------------------------------------------------
    def path_of(self, name: str, what: str = "run") -> Path:
        """The folder or file ``name`` (a plain name, or ``uploads/<name>``) inside the runs folder."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"no {what} chosen; pick one from the list")
        parts = name.split("/")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != UPLOADS) or parts == [UPLOADS]:
            raise ValueError(f"{what} {name!r} is not a run or an upload of this app")
        for part in parts:
            check_name(part, what)
        path = self.root.joinpath(*parts)
        check_inside(path, self.root, what)
        return path

    def output_dir(self, run: str, kind: str) -> Path:
        """``<run>/app/<kind>`` (an upload's: ``uploads/app-<file>/<kind>``), inside the runs folder."""
        path = self.path_of(run)
        base = path.parent / f"{APP_OUTPUTS}-{path.name}" if path.is_file() else path / APP_OUTPUTS
        out = base / check_name(kind, "output")
        check_inside(out, self.root, run)
        return out

    # -- listing ---------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        """Every run folder in the runs folder, finished or resumable, newest first (read again at most every
        LISTING_SECONDS: every open page polls it)."""
        with self._lock:
            if self._listing is not None and time.monotonic() - self._listing[0] < LISTING_SECONDS:
                return list(self._listing[1])
            generation = self._generation
        found = []
        for child in self.root.iterdir():
            try:
                if child.is_symlink() or not child.is_dir() or child.name == UPLOADS or child.name.startswith("."):
                    continue
                info = self.info(child)
                if info is not None:
                    found.append((child.stat().st_mtime, info))
            except OSError:  # removed while it was being read
                continue
        listing = [info for _, info in sorted(found, key=lambda pair: pair[0], reverse=True)]
        with self._lock:
            if generation == self._generation:
                self._listing = (time.monotonic(), listing)
        return list(listing)

    def changed(self) -> None:
        """A run was written: the next listing reads the folder again."""
        with self._lock:
            self._listing = None
            self._generation += 1

    @staticmethod
    def info(folder: Path) -> RunInfo | None:
        weights = run_weight_files(folder)
        done = (folder / "args.json").is_file() and (weights["trained"].is_file() or weights["full"].is_file())
        record = {}
        if done:
            try:
                record = json.loads((folder / "args.json").read_text())
            except (OSError, ValueError):
                return None
        elif latest_checkpoint(folder) is None:
            return None
        if not isinstance(record, dict):
            return None
        base = record.get("ckpt_path") or record.get("base_model", "")
        return RunInfo(folder.name, "done" if done else "resumable", str(record.get("prompt", "")),
                       str(record.get("train_method", "")), str(base),
                       record.get("iterations") if isinstance(record.get("iterations"), int) else None)

    def uploads(self) -> list[str]:
        folder = self.root / UPLOADS
        if not folder.is_dir():
            return []
        return [f"{UPLOADS}/{p.name}" for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()
                and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")]  # "." : one being checked

    def erasures(self) -> list[str]:
        """What the Test, Evaluate, Attack and Export tabs may choose: finished runs, then uploads."""
        return [r.name for r in self.runs() if r.status == "done"] + self.uploads()

    def erasure(self, name: str, upload_base: str | None = None) -> Erasure:
        """The erasure ``name``: a run (its own record names its base model), or an upload, whose base is the one
        its file names, else ``upload_base``; either must be a model the app offers."""
        path = self.path_of(name, "erasure")
        if path.is_dir():
            info = self.info(path)
            if info is not None and info.status != "done":
                raise ValueError(f"run {name!r} has not finished; resume it in the Train tab first")
            return find_erasure(str(path))
        if not path.is_file():
            raise ValueError(f"erasure {name!r} is not a run or an upload of this app")
        named = _named_base(path)
        if not named and not (upload_base or "").strip():
            raise ValueError(f"upload {name!r} does not name its base model; type it under 'base model of an upload' "
                             f"(one of: {', '.join(self.offered_models())})")
        base = self.check_model(named or upload_base, "the upload's base model" if named else "base model")
        return find_erasure(str(path), base_model=base)

    # -- uploads ---------------------------------------------------------------------------------
    def store_upload(self, uploaded: str | Path, filename: str | None = None) -> str:
        """Copy an uploaded weights file into ``uploads/`` (named by its content's hash and its own name made
        plain) once it is checked: at most the size limit, a weights file's suffix, and readable by the same safe
        loaders as the command line (safetensors, or a weights-only torch file: no pickled code runs). Returns its
        name for the erasure lists."""
        uploaded = Path(uploaded)
        name = Path(filename or uploaded.name).name
        suffix = Path(name).suffix.lower()
        if suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"upload {name!r} is not a weights file; valid: {', '.join(WEIGHT_SUFFIXES)}")
        size = uploaded.stat().st_size
        if size > self.max_upload_bytes:
            raise ValueError(f"upload {name!r} is {size / 2**20:.0f} MB, over this app's limit of "
                             f"{self.max_upload_bytes // 2**20} MB (esd app --max_upload_mb)")
        digest = hashlib.sha256()
        with open(uploaded, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        stem = safe_name(Path(name).stem)[:80]
        dest = self.root / UPLOADS / f"{digest.hexdigest()[:12]}-{stem}{suffix}"
        check_inside(dest, self.root, "upload")
        if not dest.is_file():  # only a checked file is ever kept (and a same-content one was checked)
            staged = dest.parent / f".{dest.name}.{secrets.token_hex(8)}{suffix}"  # the loaders choose by suffix
            dest.parent.mkdir(exist_ok=True)
            check_inside(staged, self.root, "upload")
            try:
                atomic_write(staged, lambda p: shutil.copyfile(uploaded, p))
                check_weights_file(staged)
                staged.replace(dest)
            finally:
                staged.unlink(missing_ok=True)
        return f"{UPLOADS}/{dest.name}"


def _named_base(weights: Path) -> str | None:
    """The base model a safetensors file's own metadata names (this tool's trained-parameters files do), read from
    its header alone; None for other files."""
    if weights.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            named = (f.metadata() or {}).get("base_model")
    except Exception:  # noqa: BLE001 - an unreadable header: loading it later says so
        return None
    return named.strip() or None if isinstance(named, str) else None


def latest_checkpoint(folder: Path) -> Path | None:
    """The run's newest ``checkpoints/checkpoint-<iteration>.pt``."""
    found = []
    for p in (folder / "checkpoints").glob("checkpoint-*.pt"):
        number = p.stem.removeprefix("checkpoint-")
        if number.isdigit() and p.is_file() and not p.is_symlink():
            found.append((int(number), p))
    return max(found)[1] if found else None

