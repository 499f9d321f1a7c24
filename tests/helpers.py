"""The helpers the tests share, one copy each: training a tiny run, reading its weights, comparing tensors,
snapshots of folders, running the command line in-process or a script in a subprocess, and a stricter
``all``. Model builders are in :mod:`tiny`."""

import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esd import ESDConfig, train_esd
from esd.cli import main
from esd.eval import EvalConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = Path(__file__).resolve().parent / "data"  # the tests' own small prompt CSVs


def every(items) -> bool:
    """``all(items)``, and an error when there are none: an assertion over an empty collection passes
    vacuously, which is never what a test means."""
    items = list(items)
    assert items, "the collection checked is empty"
    return all(items)


def eval_config(**settings):
    """An EvalConfig built as a library caller would (no argparse); ``images``/``out`` are not read by the
    summarise-only tests. Each test module passes its own defaults with ``functools.partial``."""
    return EvalConfig(**{"images": "unused", "out": "unused", **settings})


def train(base, save_path, name, **settings):
    """A run of ``esd train`` through the library on ``base`` (a tiny model folder, or 'toy'), in
    ``save_path``/``name``; ``settings`` are ESDConfig fields beside prompt "cat" and ESD-x. Each test module
    passes its own defaults with ``functools.partial``."""
    settings = {"prompt": "cat", "train_method": "xattn", **settings}
    return train_esd(ESDConfig(base_model=str(base), save_path=str(save_path), name=name, **settings))


def run_weights(result) -> dict:
    """The trained tensors a run saved (``save_format`` trained or both): name -> tensor."""
    return load_file(result.output_dir / f"{result.output_dir.name}.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    """The same names and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder, mtimes: bool = False, folders: bool = False) -> dict:
    """Every file under ``folder`` (hidden ones included) -> its bytes, with its modification time when
    ``mtimes``; with ``folders``, sub-folders too (-> None), so that a new empty folder shows."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder)] = (p.read_bytes(), p.stat().st_mtime_ns) if mtimes else p.read_bytes()
        elif folders:
            out[p.relative_to(folder)] = None
    return out


def cli(argv, capsys) -> tuple[int, list[str]]:
    """``esd ARGV`` in-process: (exit code, the non-blank lines of stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def run_script(*args, script="train-scripts/train-esd.py") -> subprocess.CompletedProcess:
    """One of the paper's scripts in a subprocess, offline, from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def script_in_process(*args, capsys, script="train-scripts/train-esd.py") -> tuple[int, list[str]]:
    """One of the paper's scripts run as ``__main__`` in this process (its own file, its own ``sys.argv``),
    for the many bad-input cases: (exit code, the non-blank lines of stderr). A subprocess costs seconds of
    imports each; :func:`run_script` still launches the scripts as processes where that is what is tested."""
    argv = sys.argv
    sys.argv = [str(ROOT / script), *map(str, args)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code
    finally:
        sys.argv = argv
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_line_error(run) -> str:
    """The message of the ValueError that ``run()`` raises, which must be one line."""
    with pytest.raises(ValueError) as e:
        run()
    message = str(e.value)
    assert "\n" not in message, message
    return message


def flow_train(model, out, *flags, size: int = 64, steps: int = 3):
    """``esd train`` in-process on a tiny SD3/FLUX folder at ``size`` pixels and ``steps`` sampler steps
    (plumbing, not erasure); ``flags`` must hold ``--name``. Returns the run folder."""
    rc = main(["train", "--prompt", "cat", "--base_model", model, "--image_size", str(size), "--ddim_steps",
               str(steps), "--devices", "cpu", "--save_path", str(out), "--lr", "1e-2", "--seed", "0", *flags])
    assert rc == 0
    return out / flags[flags.index("--name") + 1]


def free_port() -> int:
    """A TCP port free on this machine now (the kernel's pick), for a launcher that needs one (torchrun):
    a fixed port collides with another run on the same machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
