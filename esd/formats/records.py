"""What every run writes beside itself: files written atomically, the environment record,
and a training run's args.json, loss.csv and loss.png."""

import csv
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import torch

LOSS_COLUMNS = ["iteration", "loss", "word", "ddim_index", "xt_level", "timestep"]
# A plain file name: letters and digits (any script), '_', '.', '+', '=', '-', starting with a letter,
# digit or '_'. So never a path, '.', '..' or a hidden file: whatever the input, outputs stay in the
# folder the user named.
PLAIN_NAME = re.compile(r"\w[\w.+=-]*")
MAX_NAME_LENGTH = 120  # file systems allow 255 bytes; room for suffixes such as "diffusers-" and ".safetensors"


def check_name(value, what: str) -> str:
    """``value`` if it is a plain file name (see PLAIN_NAME) of at most MAX_NAME_LENGTH characters;
    else a ValueError that starts with ``what``."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {value!r} is not a plain file name (letters, digits, '_', '.', '+', '=', '-', "
                         f"starting with a letter, digit or '_', at most {MAX_NAME_LENGTH} characters)")
    return value


def safe_name(text: str) -> str:
    """``text`` made a plain file name: other characters become '-'; a name longer than MAX_NAME_LENGTH
    is cut and ends with a hash of the whole text, so distinct texts keep distinct names."""
    name = re.sub(r"[^\w.+=-]", "-", text)
    if not name or not PLAIN_NAME.fullmatch(name):
        name = "_" + name
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        name = f"{name[:MAX_NAME_LENGTH - len(digest) - 1]}-{digest}"
    return name


class OutputError(ValueError):
    """An output could not be written (no space left, no permission, not a folder); the message names the path."""


TMP_SUFFIX = ".esd-tmp"  # atomic_write's temporary file
TMPDIR_SUFFIX = ".esd-tmpdir"  # a folder written whole, then renamed into place (a diffusers export)
_TMP_NAME = re.compile(r"\.(?P<pid>\d+)\.[0-9a-f]{16}(" + re.escape(TMP_SUFFIX) + "|" + re.escape(TMPDIR_SUFFIX)
                       + "(-old)?)$")
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the temporary files and folders of writes whose process is gone (killed mid-write). Once per
    folder per process: a generation folder can hold 30,000 images. A live process's temporary file (a
    concurrent writer) is left alone; only names this tool makes are touched, and a link is unlinked, never
    followed."""
    key = os.path.abspath(folder)
    if key in _swept or not folder.is_dir():
        return []
    _swept.add(key)
    removed = []
    # "-old" first: a folder write killed between moving the old folder aside and renaming the new one in
    # left the user's old folder there; it goes back under its name (the half-done new one is removed).
    for p in sorted(folder.glob(f".*{TMP_SUFFIX}*"), key=lambda p: not p.name.endswith("-old")):
        m = _TMP_NAME.search(p.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            original = folder / p.name[1:m.start()]
            if m.group(2) == TMPDIR_SUFFIX + "-old" and p.is_dir() and not p.is_symlink() \
                    and not os.path.lexists(original):
                os.replace(p, original)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def describe_os_error(e: OSError, path) -> str:
    """One line naming the path and what is wrong with it."""
    if e.errno == errno.ENOSPC:
        try:
            free = f" ({shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return f"no space left on the device to write {path}{free}; nothing was left half-written"
    if e.errno == errno.ENAMETOOLONG:
        return f"file name too long: {path}"
    return f"cannot write {path}: {e.strerror or e}"


def atomic_write(path: str | os.PathLike, write, replace: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill never leaves half a file.

    The temporary file is created exclusively (O_EXCL, no symlink followed) under an unpredictable
    name in the target folder, flushed to disk, given the umask's mode (a writer such as safetensors'
    ``save_file`` makes its file 0600, which another user's ComfyUI could not read), then renamed; a
    planted symlink cannot redirect the write. With ``replace=False`` the file is linked into place
    instead, which fails if ``path`` exists by then: the exists-check and the write are one step, so of
    two concurrent writers one gets an OutputError and nothing is replaced. Temporary files of killed
    writes in the folder are removed first (:func:`remove_orphans`). A failed write (full disk, no
    permission) raises :class:`OutputError` naming ``path`` and leaves no partial file."""
    path = Path(path)
    remove_orphans(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
        mode = os.stat(tmp).st_mode  # 0o666 less the umask, as os.open made it
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the writer may have replaced the file with a 0600 one
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise OutputError(f"{path} already exists (written by another process meanwhile?); nothing was "
                                  "replaced; pass --overwrite to replace it") from e
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def check_inside(path: str | os.PathLike, folder: str | os.PathLike, flag: str) -> Path:
    """``path`` (an output under the named ``folder``) if writing it stays inside ``folder``: no part of
    it below ``folder`` is a symlink, and it resolves inside ``folder``'s own resolved path. Otherwise an
    OutputError naming the link: a planted link would make the write land, or a clean-up delete, elsewhere."""
    path, folder = Path(path), Path(folder)
    try:
        rel = path.relative_to(folder)
    except ValueError:
        rel = None
    if rel is not None:
        part = folder
        for name in rel.parts:
            part = part / name
            if part.is_symlink():
                raise OutputError(f"{flag}: {part} is a symbolic link; this tool writes only inside "
                                  f"{folder}, so it refuses to write through it (remove the link or choose "
                                  "another folder)")
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise OutputError(f"{flag}: {path} resolves to {path.resolve()}, outside {root}; refused")
    return path


def check_not_input(out: str | os.PathLike, inputs: dict, flag: str = "--out", may_hold: tuple = ()) -> None:
    """Refuse an output that is one of the command's inputs, lies inside an input folder, or holds an
    input (``inputs``: flag -> path; None entries skipped): replacing it would destroy what the command
    reads, ``--overwrite`` or not. The folders named in ``may_hold`` (a run folder, whose ``export/`` is
    where its exports go) may hold the output; its files the command reads are to be named as inputs."""
    out_r = Path(out).resolve()
    for name, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        src = Path(value).resolve()
        inside = src.is_dir() and out_r.is_relative_to(src) and name not in may_hold
        if out_r == src or inside or src.is_relative_to(out_r):
            raise OutputError(f"{flag} {str(out)!r} is {name} {str(value)!r} or overlaps it; writing there would "
                              "replace an input of this command; choose another path")


def torch_save(obj, path) -> None:
    """``torch.save`` through a Python file object, so that a full disk raises ENOSPC (torch's own
    path writer reports it as "unexpected pos ..."), atomically."""
    def write(p):
        with open(p, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def error_summary(e: Exception) -> str:
    """'Type: message' on one line, for errors quoted inside a one-line message."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def read_json(path) -> object:
    """The JSON in ``path``; an unreadable or malformed file is a one-line ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is unreadable ({error_summary(e)})") from e


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists: where a folder still to be made would go."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_folder(folder: Path, flag: str = "--save_path") -> None:
    """Refuse, before any work, an output folder that cannot be made or written: one under a file, or
    in a read-only place. Nothing is created."""
    folder = Path(folder)
    probe = nearest_existing(folder)
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{flag}: {probe} is a file, so {folder} cannot be a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{flag}: {probe} is not writable, so {folder} cannot be written")


def check_writable(folder: Path, flag: str = "--out") -> None:
    """:func:`check_output_folder`, then a file actually created and removed in ``folder`` or its nearest
    existing parent: ``os.access`` answers for the permission bits alone (it says yes to root in a folder
    where nothing can be created, such as /proc, a read-only bind mount, a squashed NFS share). The probe
    has a temporary file's name, so a kill in between leaves nothing the next write's sweep keeps."""
    folder = Path(folder)
    check_output_folder(folder, flag)
    where = nearest_existing(folder)
    probe = where / f".esd-probe.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{flag}: a file cannot be created in {where} ({e.strerror or e}), so {folder} cannot "
                          "be written") from e


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse when the device of ``folder`` (or its nearest existing parent) has less than ``need``
    bytes free: better now than after hours of training."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < need:
        raise OutputError(f"not enough free space for {what} in {folder}: about {need / 2**30:.2f} GiB needed, "
                          f"{free / 2**30:.2f} GiB free")


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (from its metadata), or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it) of the checkout this package is imported from; (None, None)
    outside a git checkout or without git."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
        if head is None:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        return head, bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


# Read when the package is imported: the code this process runs. A checkout that moves on during a long run (a
# commit made while a benchmark draws) does not change what the run ran, so a record written at its end says the
# commit it started from.
_GIT_AT_IMPORT = _git_state()


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; else what platform says): timings depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record() -> dict:
    """Versions (from the installed packages' metadata; torch's own string, which names its build, e.g.
    2.14.1+cu130), the git hash of the code this process imported and whether its tracked files had uncommitted
    changes then (``git_dirty``), and the machine (CPU model, its core count, torch's threads, the GPU if one is
    in use), saved beside every output: a time means little without the machine it was measured on."""
    git, dirty = _GIT_AT_IMPORT
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"esd": package_version("esd"), "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"), "python": platform.python_version(), "git_hash": git,
            "git_dirty": dirty, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "gpu": gpu}}


def write_run_record(out: Path, record: dict, history: list[dict]) -> None:
    """args.json (settings, model facts, environment), loss.csv (one row per iteration) and loss.png."""
    atomic_write(out / "args.json", lambda p: Path(p).write_text(json.dumps(record, indent=2, allow_nan=False)))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            extra = [k for k in (history[0] if history else {}) if k not in LOSS_COLUMNS]  # e.g. robust terms
            w = csv.DictWriter(f, fieldnames=LOSS_COLUMNS + extra)
            w.writeheader()
            w.writerows(history)

    atomic_write(out / "loss.csv", write_csv)
    import matplotlib  # here, not at import: choosing its Agg backend must not change a notebook's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["iteration"] for h in history], [h["loss"] for h in history], lw=0.8)
    ax.set(xlabel="iteration", ylabel="ESD loss (MSE)", yscale="log", title=out.name[:60])
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
