"""What every run writes beside itself: files written atomically, the environment record,
and a training run's args.json, loss.csv and loss.png."""

import csv
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

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


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_record() -> dict:
    """Versions (from the installed packages' metadata; torch's own string, which names its build, e.g.
    2.14.1+cu130) and the git hash, saved beside every output."""
    import torch

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except OSError:
        git = None
    return {"esd": _version("esd"), "torch": torch.__version__, "diffusers": _version("diffusers"),
            "transformers": _version("transformers"), "python": platform.python_version(), "git_hash": git,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_run_record(out: Path, record: dict, history: list[dict]) -> None:
    """args.json (settings, model facts, environment), loss.csv (one row per iteration) and loss.png."""
    atomic_write(out / "args.json", lambda p: Path(p).write_text(json.dumps(record, indent=2)))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
            w.writeheader()
            w.writerows(history)

    atomic_write(out / "loss.csv", write_csv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["iteration"] for h in history], [h["loss"] for h in history], lw=0.8)
    ax.set(xlabel="iteration", ylabel="ESD loss (MSE)", yscale="log", title=out.name[:60])
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
