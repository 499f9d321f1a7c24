"""What outputs promise under faults: atomic, exclusive temporary files; orphans of killed writes
removed; a full disk named in one line with no partial file; byte-identical safetensors; runs never
silently replaced; resumes that keep their settings; loaders that refuse non-finite weights."""

import collections
import errno
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import helpers
import pytest
import torch
from helpers import ROOT, cli, snapshot
from safetensors.torch import load_file, save_file

from esd import ModelLoadError, load_erased_unet
from esd.cli import main
from esd.formats import records
from esd.formats.records import OutputError, atomic_write

FAST = {"ddim_steps": 2, "seed": 0, "iterations": 2, "lr": 1e-3}


train = partial(helpers.train, devices="cpu", **FAST)


@pytest.fixture(autouse=True)
def fresh_sweep(monkeypatch):
    monkeypatch.setattr(records, "_swept", set())  # each test's folders are swept for orphans anew


def kill_while_flushing(n: int, argv: list, marker: Path) -> None:
    """Run ``esd argv`` in a child process that pauses inside its n-th fsync (a file whose bytes are
    written but not yet renamed into place), then kill it with SIGKILL there."""
    script = f"""
import os, sys, time
from pathlib import Path
import esd.formats.records as r
calls = []
real = os.fsync
def fsync(fd):
    calls.append(fd)
    if len(calls) == {n}:
        Path({str(marker)!r}).write_text("now")
        time.sleep(600)
    real(fd)
r.os.fsync = fsync
from esd.cli import main
sys.exit(main(sys.argv[1:]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], cwd=ROOT)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), f"the child never reached its fsync number {n}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# -- temporary files -------------------------------------------------------------------------------

def test_a_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """Even if an attacker guessed the temporary name, exclusive no-follow creation refuses the
    symlink: the victim keeps its bytes and the target is not written."""
    monkeypatch.setattr(records.secrets, "token_hex", lambda n: "0" * 16)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "args.json"
    target.parent.mkdir()
    (target.parent / f".args.json.{os.getpid()}.{'0' * 16}{records.TMP_SUFFIX}").symlink_to(victim)
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write(target, lambda p: Path(p).write_text("attacker-controlled"))
    assert victim.read_text() == "precious" and not target.exists()


def test_orphans_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".a.png.{dead.pid}.{'1' * 16}{records.TMP_SUFFIX}"
    live = tmp_path / f".b.png.{os.getppid()}.{'2' * 16}{records.TMP_SUFFIX}"  # a concurrent writer
    unrelated = tmp_path / ".c.png.tmp123"
    for p in (orphan, live, unrelated):
        p.write_bytes(b"half")
    atomic_write(tmp_path / "c.png", lambda p: Path(p).write_bytes(b"whole"))
    assert not orphan.exists() and live.exists() and unrelated.exists()
    assert (tmp_path / "c.png").read_bytes() == b"whole"
    assert [p.name for p in tmp_path.glob(f"*{records.TMP_SUFFIX}")] == [live.name]


def test_a_killed_diffusers_exports_folder_goes_with_the_next_export(tmp_path):
    """kill -9 during --format diffusers leaves .NAME.PID.HEX.esd-tmpdir (and, mid-replace, its -old): the
    next folder write there removes them; a live writer's folder and a planted link's target stay."""
    from esd.formats.exports import write_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".model.{dead.pid}.{'3' * 16}{records.TMPDIR_SUFFIX}"
    old = tmp_path / f".model.{dead.pid}.{'4' * 16}{records.TMPDIR_SUFFIX}-old"
    live = tmp_path / f".model.{os.getppid()}.{'5' * 16}{records.TMPDIR_SUFFIX}"
    for d in (orphan, old, live):
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "w.safetensors").write_bytes(b"half")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    link = tmp_path / f".x.{dead.pid}.{'6' * 16}{records.TMPDIR_SUFFIX}"
    link.symlink_to(precious)
    write_folder(tmp_path / "model", lambda f: (f / "model_index.json").write_text("{}"))
    assert not orphan.exists() and not old.exists() and not link.is_symlink() and live.is_dir()
    assert (precious / "keep.txt").read_text() == "mine"
    assert (tmp_path / "model" / "model_index.json").read_text() == "{}"


def test_a_write_that_fails_leaves_no_partial_file_and_names_the_path(tmp_path):
    def half_then_full(p):
        Path(p).write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "w.safetensors"
    with pytest.raises(OutputError, match=f"no space left on the device to write {target}"):
        atomic_write(target, half_then_full)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_training_save_is_one_line_and_leaves_no_partial_file(tiny_models, tmp_path, monkeypatch,
                                                                                capsys):
    """torch.save through a path reports a full disk as "unexpected pos ..."; the trainer writes through a
    file object, so the error is ENOSPC, named with the path. The fake disk fills after 1,000 bytes."""
    real_save = torch.save

    def filling_save(obj, f, *a, **kw):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        f.write(buf.getvalue()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", filling_save)
    rc, err = cli(["train", "--prompt", "cat", "--train_method", "xattn", "--base_model", tiny_models["sd1"],
                       "--iterations", 1, "--ddim_steps", 2, "--seed", 0, "--save_path", tmp_path, "--name", "run",
                       "--devices", "cpu", "--save_format", "full"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "no space left on the device to write" in err[0] and "diffusers-run.pt" in err[0]
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob(f"*{records.TMP_SUFFIX}"))


def test_not_enough_free_space_is_refused_before_training(tiny_models, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(records.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    trainer_calls = []
    monkeypatch.setattr("esd.train.recipe.ESDTrainer.train", lambda self: trainer_calls.append(1))
    with pytest.raises(OutputError, match="not enough free space"):
        train(tiny_models["sd1"], tmp_path, "run")
    assert not trainer_calls and not (tmp_path / "run").exists()


def test_a_save_path_under_a_file_is_refused_before_models_load(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, err = cli(["train", "--prompt", "cat", "--train_method", "xattn", "--base_model", "toy",
                       "--save_path", tmp_path / "file" / "runs"], capsys)
    assert rc == 2 and len(err) == 1 and "is a file" in err[0], err


def test_kill_during_a_checkpoint_write_leaves_no_partial_checkpoint_and_the_orphan_goes(tiny_models, tmp_path):
    """The run is killed (SIGKILL) while its second checkpoint is being flushed: the first checkpoint is
    whole, the second does not exist under its name, and the next write to the folder removes the
    orphaned temporary file. Resuming from the first checkpoint then finishes the run."""
    args = ["train", "--prompt", "cat", "--train_method", "xattn", "--base_model", tiny_models["sd1"],
            "--iterations", 3, "--ddim_steps", 2, "--seed", 0, "--lr", 1e-3, "--save_every", 1,
            "--save_path", str(tmp_path), "--name", "run", "--devices", "cpu"]
    kill_while_flushing(2, args, tmp_path / "writing")  # the second checkpoint
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*.pt")) == ["checkpoint-1.pt"]
    assert torch.load(ckpts / "checkpoint-1.pt", weights_only=True)["iteration"] == 1
    assert len(list(ckpts.glob(f"*{records.TMP_SUFFIX}"))) == 1  # the killed write's temporary file
    result = train(tiny_models["sd1"], tmp_path, "run", iterations=3, save_every=1,
                   resume=str(ckpts / "checkpoint-1.pt"))
    assert not list(ckpts.glob(f"*{records.TMP_SUFFIX}"))
    assert len(result.losses) == 3


# -- deterministic files ---------------------------------------------------------------------------

def test_saved_safetensors_are_byte_identical_across_processes(tmp_path):
    """safetensors orders metadata by a per-process hash; the saved header is sorted, so two processes
    saving the same erasure write the same bytes (and the file still loads with its metadata)."""
    code = ("import sys, torch; from esd.formats.weights import save_trained_parameters; "
            "save_trained_parameters({'b': torch.ones(3), 'a': torch.arange(4.0)}, sys.argv[1], "
            "{'base_model': 'toy', 'train_method': 'xattn', 'prompt': 'red', 'zeta': 1})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=ROOT)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    from safetensors import safe_open

    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {"format": "esd-trained-parameters", "base_model": "toy", "train_method": "xattn",
                                "prompt": "red", "zeta": "1"}
        assert torch.equal(f.get_tensor("a"), torch.arange(4.0))


# -- runs never silently replaced; resumes keep their settings ---------------------------------------

def test_a_second_run_under_the_same_name_is_refused_and_changes_nothing(tiny_models, tmp_path):
    train(tiny_models["sd1"], tmp_path, "run")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a run .*--overwrite"):
        train(tiny_models["sd1"], tmp_path, "run", seed=1)
    assert snapshot(tmp_path) == before
    # The default name too: a second default-named run of the same settings is refused.
    train(tiny_models["sd1"], tmp_path, None)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_models["sd1"], tmp_path, None, seed=1)


def test_overwrite_replaces_the_run_and_leaves_no_stale_file(tiny_models, tmp_path):
    train(tiny_models["sd1"], tmp_path, "run", iterations=3, save_every=1)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2.pt").exists()
    old = load_file(tmp_path / "run" / "run.safetensors")
    train(tiny_models["sd1"], tmp_path, "run", seed=1, overwrite=True, save_format="trained")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))  # the old run's checkpoints went
    assert not (tmp_path / "run" / "diffusers-run.pt").exists()  # and its full weights
    new = load_file(tmp_path / "run" / "run.safetensors")
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["seed"] == 1


def test_resume_refuses_changed_settings_and_records_the_checkpoints_seed(tiny_models, tmp_path):
    train(tiny_models["sd1"], tmp_path, "run", iterations=3, save_every=1, seed=123)
    ckpt = str(tmp_path / "run" / "checkpoints" / "checkpoint-2.pt")
    for change, message in [({"lr": 1e-2}, "--lr 0.01 vs 0.001"), ({"seed": 5}, "--seed 5 vs 123"),
                            ({"prompt": "dog"}, "--prompt 'dog' vs 'cat'"), ({"batch_size": 2}, "--batch_size 2 vs 1"),
                            ({"iterations": 2}, "--iterations 2 < 3")]:
        with pytest.raises(ValueError, match=message):
            train(tiny_models["sd1"], tmp_path, "run", **{"iterations": 3, "save_every": 1, "seed": None,
                                                          "resume": ckpt, **change})
    # No --seed: the checkpoint's seed is used and recorded, not a fresh one; a longer run is allowed.
    train(tiny_models["sd1"], tmp_path, "run", iterations=4, save_every=1, seed=None, resume=ckpt)
    record = json.loads((tmp_path / "run" / "args.json").read_text())
    assert record["seed"] == 123 and record["iterations"] == 4


# -- loaders ---------------------------------------------------------------------------------------

def test_loaders_refuse_nan_weights_empty_and_corrupt_files(tiny_models, tmp_path):
    r = train(tiny_models["sd1"], tmp_path, "run")
    good = load_file(r.output_dir / "run.safetensors")
    key = sorted(good)[0]
    poisoned = {**good, key: torch.full_like(good[key], float("nan"))}
    save_file(poisoned, tmp_path / "nan.safetensors", metadata={"format": "esd-trained-parameters"})
    with pytest.raises(ModelLoadError, match=f"holds NaN or Inf in 1 tensors \\({key}\\)"):
        load_erased_unet(tmp_path / "nan.safetensors", base_model=tiny_models["sd1"])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="could not read .*empty.pt.* as a weights-only torch file"):
        load_erased_unet(tmp_path / "empty.pt", base_model=tiny_models["sd1"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="could not read .*bad.safetensors.* as safetensors"):
        load_erased_unet(tmp_path / "bad.safetensors", base_model=tiny_models["sd1"])


def test_kill_during_generation_then_a_rerun_gives_the_uninterrupted_files(tiny_models, tmp_path):
    """A generator is killed (SIGKILL) while its third PNG is being flushed; a rerun into the folder
    removes the orphaned temporary file, keeps the two whole images and writes the rest: the folder then
    equals that of an uninterrupted run, byte for byte."""
    csv = tmp_path / "prompts.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,a cat,1\n1,a dog,2\n")

    def args(out):
        return ["generate", "--prompts_path", str(csv), "--save_path", str(out), "--base_model", tiny_models["sd1"],
                "--num_samples", "2", "--ddim_steps", "2", "--device", "cpu", "--scheduler", "ddim"]

    kill_while_flushing(4, args(tmp_path / "killed"), tmp_path / "writing")  # generation.json, then PNGs 1-3
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.glob("*.png")) == ["0_0.png", "0_1.png"]
    assert len(list(killed.glob(f"*{records.TMP_SUFFIX}"))) == 1
    assert main(args(killed)) == 0
    assert main(args(tmp_path / "whole")) == 0
    assert not list(killed.glob(f"*{records.TMP_SUFFIX}"))
    pngs = {p.name: p.read_bytes() for p in killed.glob("*.png")}
    assert len(pngs) == 4 and pngs == {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.png")}


def test_atomic_write_gives_the_umask_mode_and_refuses_to_clobber(tmp_path):
    """A writer that makes its file 0600 (safetensors' save_file) still leaves a file of the umask's
    mode; replace=False refuses a path that exists and leaves it unchanged."""
    import os
    import stat

    from esd.formats.records import OutputError, atomic_write

    def write_private(p):
        with open(p, "w") as f:
            f.write("new")
        os.chmod(p, 0o600)

    old = os.umask(0o022)
    try:
        target = tmp_path / "w.safetensors"
        atomic_write(target, write_private)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        target.write_text("mine")
        with pytest.raises(OutputError, match="already exists"):
            atomic_write(target, write_private, replace=False)
        assert target.read_text() == "mine"
        assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    finally:
        os.umask(old)


def test_check_inside_refuses_a_symlink_out_of_the_folder(tmp_path):
    from esd.formats.records import OutputError, check_inside, check_not_input

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "after").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="symbolic link"):
        check_inside(out / "images" / "after" / "0.png", out, "--out")
    assert check_inside(out / "images" / "before" / "0.png", out, "--out") == out / "images" / "before" / "0.png"
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(OutputError, match="replace an input"):
        check_not_input(base, {"--base_model": base})
    check_not_input(out / "x.safetensors", {"--base_model": base})
    with pytest.raises(OutputError, match="replace an input"):
        check_not_input(base / "unet" / "w.safetensors", {"--base_model": base})
    run = tmp_path / "run"
    (run / "args.json").parent.mkdir()
    (run / "args.json").write_text("{}")
    check_not_input(run / "export" / "lora.safetensors", {"the erasure": run}, may_hold=("the erasure",))
    for bad in (run, run / "args.json", tmp_path):
        with pytest.raises(OutputError, match="replace an input"):
            check_not_input(bad, {"the erasure": run, "its args.json": run / "args.json"}, may_hold=("the erasure",))


def test_attack_refuses_an_image_folder_that_links_elsewhere(tmp_path):
    """A planted images/after link: the attack would write through it and delete the other PNGs there."""
    from esd.attack.config import AttackConfig
    from esd.formats.records import OutputError

    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "holiday.png").write_bytes(b"png")
    out = tmp_path / "o"
    (out / "images").mkdir(parents=True)
    (out / "images" / "after").symlink_to(elsewhere)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    prompts = tmp_path / "p.csv"
    prompts.write_text("case_number,prompt,evaluation_seed\n0,a red circle,1\n")
    with pytest.raises(OutputError, match="symbolic link"):
        AttackConfig(weights=str(weights), prompts=str(prompts), attack="prefix", concept="red", out=str(out),
                     base_model="toy")
    assert (elsewhere / "holiday.png").read_bytes() == b"png"


def test_attack_clean_up_leaves_files_it_did_not_name(tmp_path):
    """The --overwrite clean-up removes only stale images under the names the attack gives (case_i.png)."""
    from esd.attack import run

    out = tmp_path / "o"
    for stage in run.STAGES:
        (out / "images" / stage).mkdir(parents=True)
        (out / "images" / stage / "holiday.png").write_bytes(b"mine")
        (out / "images" / stage / "7_3.png").write_bytes(b"stale")
    stage_files = [p for p in (out / "images").rglob("*.png")]
    assert len(stage_files) == 6
    run.remove_stale_images(out, set())
    assert sorted(p.name for p in (out / "images").rglob("*.png")) == ["holiday.png"] * 3


@pytest.mark.parametrize("planted", ["own_report", "link"])
def test_demo_keeps_a_report_it_did_not_write(tmp_path, planted):
    from esd.formats.records import OutputError
    from esd.toy.demo import DemoConfig, run_demo

    out = tmp_path / "d"
    out.mkdir()
    if planted == "own_report":
        (out / "report.md").write_text("my notes")
    else:
        (tmp_path / "elsewhere.md").write_text("my notes")
        (out / "report.md").symlink_to(tmp_path / "elsewhere.md")
    with pytest.raises(OutputError):
        run_demo(DemoConfig(out=str(out), iterations=1, samples=1))
    assert (tmp_path / ("elsewhere.md" if planted == "link" else "d/report.md")).read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_a_folder_write_killed_between_its_two_renames_gives_the_old_folder_back(tmp_path):
    """kill -9 after the old export was moved aside and before the new one was renamed in: the next sweep
    puts the user's old folder back under its name (and removes the unfinished new one), never deletes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".model.{dead.pid}.{'7' * 16}{records.TMPDIR_SUFFIX}-old"
    new = tmp_path / f".model.{dead.pid}.{'7' * 16}{records.TMPDIR_SUFFIX}"
    for d, text in ((old, "the user's export"), (new, "unfinished")):
        d.mkdir()
        (d / "model_index.json").write_text(text)
    records.remove_orphans(tmp_path)
    assert (tmp_path / "model" / "model_index.json").read_text() == "the user's export"
    assert not old.exists() and not new.exists()
