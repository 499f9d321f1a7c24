"""The app's callbacks without a browser: the runs folder (names and uploads from strangers), the training queue
(its order, cancel, resume), and what each tab computes. The browser itself: test_app_browser.py."""

import json
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, every, one_line_error, snapshot
from safetensors.torch import load_file, save_file

from esd.app import actions
from esd.app.jobs import CANCELLED, DONE, QUEUED, RUNNING, TrainingQueue
from esd.app.runs import RunsFolder
from esd.app.ui import error_line, guarded
from esd.families.sources import resolve_source
from esd.formats.weights import run_weight_files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return RunsFolder(tmp_path_factory.mktemp("app") / "runs", max_upload_mb=8)  # the toy UNet in fp32 is 6 MB


@pytest.fixture(scope="module")
def queue(runs):
    return TrainingQueue(("cpu",), on_finish=lambda job: runs.changed())


@pytest.fixture(scope="module")
def pipelines():
    return actions.Pipelines("cpu")


@pytest.fixture(scope="module")
def run(runs, queue):
    """A finished toy erasure of "green" (100 iterations at the demo's settings)."""
    job = queue.submit(actions.train_config(runs, concept="green", iterations=100, seed=0, name="green"))
    assert queue.wait(job, 600) and job.state == DONE, job.message
    return job.run_dir.name


# -- the runs folder --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/b", "uploads/../x", "uploads/a/b", "", ".", "..",
                                  "run\nname", "~root", "uploads"])
def test_names_from_the_page_stay_in_the_runs_folder(runs, name):
    message = one_line_error(lambda: runs.path_of(name))
    assert any(reason in message for reason in ("not a run or an upload", "not a plain file name", "no run chosen"))


def test_a_link_in_the_runs_folder_is_not_followed(runs, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    link = runs.root / "linked"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    try:
        assert "symbolic link" in one_line_error(lambda: runs.path_of("linked"))
        assert "linked" not in [r.name for r in runs.runs()]
    finally:
        link.unlink()


def test_uploads_are_checked_before_they_are_kept(runs, tmp_path):
    before = snapshot(runs.root)
    wrong = tmp_path / "notes.txt"
    wrong.write_text("hello")
    assert "not a weights file" in one_line_error(lambda: runs.store_upload(wrong))
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (9 * 2**20))
    assert "over this app's limit of 8 MB" in one_line_error(lambda: runs.store_upload(big))

    marker = tmp_path / "pickle-ran"

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(ValueError, match="weights-only"):
        runs.store_upload(evil)
    assert not marker.exists()  # the safe loader never ran it
    assert snapshot(runs.root) == before  # nothing refused was kept


def test_an_upload_named_to_escape_lands_in_uploads(runs, run):
    stored = runs.store_upload(run_weight_files(runs.root / run)["trained"], "../../../escape.safetensors")
    assert stored.startswith("uploads/") and "/" not in stored.removeprefix("uploads/")
    assert (runs.root / stored).is_file() and stored in runs.erasures()


def test_a_restricted_app_names_no_model_it_does_not_offer(runs, run, tmp_path):
    """esd app on a network address (or with --models): only the toys, the operator's list and the runs' own
    bases; a typed path or an upload's metadata naming one is refused in the same words whether it exists or
    not, before any file is looked at."""
    closed = RunsFolder(runs.root, max_upload_mb=8, models=())
    assert closed.offered_models() == ["toy", "toy-dit"]
    messages = {one_line_error(lambda m=m: closed.check_model(m)).split("'")[2] for m in ("/root", "/nowhere", "a/b")}
    assert len(messages) == 1 and "not offered by this app; valid: toy, toy-dit" in messages.pop()
    assert "not offered" in one_line_error(lambda: actions.train_config(closed, concept="green", base_model="/root"))
    assert "single-file checkpoint '/x.ckpt' is not offered" in one_line_error(
        lambda: actions.train_config(closed, concept="green", ckpt_path="/x.ckpt"))
    assert closed.check_model("toy") == "toy" and RunsFolder(runs.root, models=("my/model",)).check_model("my/model")

    # an upload whose header names a path as its base model
    tensors = load_file(run_weight_files(runs.root / run)["trained"])
    named = tmp_path / "names-a-path.safetensors"
    save_file(tensors, str(named), metadata={"base_model": "/etc/passwd"})
    stored = closed.store_upload(named)
    assert "the upload's base model '/etc/passwd' is not offered" in one_line_error(lambda: closed.erasure(stored))
    assert "not offered" in one_line_error(lambda: closed.erasure(stored, "toy"))  # its own name decides


def test_a_run_is_exported_from_its_own_base_whatever_is_typed(runs, run, monkeypatch):
    """Export of a run ignores the upload's base-model box: a stranger's '/root' is never resolved."""
    import esd.formats.erasure_source as source

    real = source.resolve_source

    def only_toy(name):
        assert name == "toy", f"resolved {name!r}"
        return real(name)

    monkeypatch.setattr(source, "resolve_source", only_toy)
    closed = RunsFolder(runs.root, max_upload_mb=8, models=())
    done = actions.export(closed, run, "lora", "4", upload_base="/root")
    assert Path(done["file"]).is_file()


# -- Train ------------------------------------------------------------------------------------------------
def test_the_form_becomes_esd_train_settings(runs):
    cfg = actions.train_config(runs, concept=" green ", iterations="40", seed="7")
    assert (cfg.prompt, cfg.train_method, cfg.iterations, cfg.seed, cfg.lr, cfg.batch_size) == \
        ("green", "xattn", 40, 7, 1e-3, 8)  # the toy's settings are the demo's
    assert Path(cfg.save_path) == runs.root and "lr" in cfg.preset_overrides
    assert actions.train_config(runs, concept="circle", base_model="toy-dit").train_method == "mmdit-x"
    assert "valid for it: " in one_line_error(lambda: actions.train_config(runs, concept="green",
                                                                           train_method="mmdit-x"))
    assert "must be a number" in one_line_error(lambda: actions.train_config(runs, concept="g", lr="fast"))
    assert "whole number" in one_line_error(lambda: actions.train_config(runs, concept="g", iterations="2.5"))
    assert "preset" in one_line_error(lambda: actions.train_config(runs, concept="g", preset="quick"))
    assert "empty" in one_line_error(lambda: actions.train_config(runs, concept="  "))
    labels = actions.method_choices("toy")
    assert ("xattn" in [n for _, n in labels]) and "mmdit-x" not in [n for _, n in labels]
    assert every(label.startswith(f"{n}: ") and len(label) > len(n) + 5 for label, n in labels)


def test_the_flow_matching_toy_trains_and_draws_side_by_side(runs, queue, pipelines):
    job = queue.submit(actions.train_config(runs, concept="green", base_model="toy-dit", iterations=5, seed=0,
                                            name="dit-green"))
    assert queue.wait(job, 300) and job.state == DONE, job.message
    assert json.loads((job.run_dir / "args.json").read_text())["train_method"] == "mmdit-x"
    shown = actions.side_by_side(runs, pipelines, "dit-green", "a green circle", "0-1")
    assert len(shown["erased"]) == 2 and shown["erased"][0][1].startswith("seed 0: ")
    assert "supports SD 1.x and 2.x" in one_line_error(lambda: actions.attack(runs, pipelines, "dit-green"))


def test_a_single_file_checkpoint_trains_and_draws_side_by_side(runs, queue, pipelines, tmp_path):
    """The toy model as one original-layout file (CompVis keys), its configs from the toy's folder: trained and
    drawn through the app as esd train --ckpt_path would."""
    from diffusers import StableDiffusionPipeline
    from ldm_format import pipeline_to_ldm

    folder = resolve_source("toy")
    ckpt = tmp_path / "toy-single.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(folder))
               .items()}, str(ckpt))
    job = queue.submit(actions.train_config(runs, concept="green", iterations=20, seed=0, name="single-file",
                                            ckpt_path=str(ckpt), ckpt_config=folder))
    assert queue.wait(job, 300) and job.state == DONE, job.message
    assert json.loads((job.run_dir / "args.json").read_text())["ckpt_path"] == str(ckpt)
    shown = actions.side_by_side(runs, pipelines, "single-file", "a green circle", "0-1")
    base, erased = (np.stack([im for im, _ in shown[k]]) for k in ("base", "erased"))
    assert base.shape == erased.shape == (2, 32, 32, 3) and not np.array_equal(base, erased)
    assert str(ckpt) in shown["line"]
    assert "single file" in one_line_error(lambda: actions.attack(runs, pipelines, "single-file"))


def test_a_diffusers_folder_trains_and_draws_side_by_side(runs, queue, pipelines, tiny_models):
    """A real model's path (a tiny SD 1.x folder, offered as any model on a loopback app): esd generate's drawing."""
    job = queue.submit(actions.train_config(runs, concept="cat", base_model=tiny_models["sd1"], iterations=2,
                                            ddim_steps=2, seed=0, name="tiny-sd1"))
    assert queue.wait(job, 300) and job.state == DONE, job.message
    shown = actions.side_by_side(runs, pipelines, "tiny-sd1", "a cat", "0-1", steps=2)
    assert len(shown["base"]) == len(shown["erased"]) == 2 and shown["base"][0][1] == "seed 0"  # no toy verdict
    assert shown["base"][0][0].ndim == 3 and not np.array_equal(shown["base"][0][0], shown["erased"][0][0])


def test_trainings_queue_cancel_to_a_checkpoint_and_resume(runs, queue, run):
    first = queue.submit(actions.train_config(runs, concept="red", iterations=120, seed=1, name="red-long"))
    second = queue.submit(actions.train_config(runs, concept="blue", iterations=5, seed=1, name="blue-short"))
    never = queue.submit(actions.train_config(runs, concept="blue", iterations=5, seed=1, name="never"))
    assert "already queued or training" in one_line_error(
        lambda: queue.submit(actions.train_config(runs, concept="blue", iterations=5, name="blue-short")))
    assert "already holds a run" in one_line_error(  # refused now, not when its turn comes
        lambda: queue.submit(actions.train_config(runs, concept="green", iterations=5, name="green")))
    end = time.monotonic() + 120
    while first.iteration < 3:
        assert time.monotonic() < end and first.state in (QUEUED, RUNNING), (first.state, first.message)
        time.sleep(0.02)
    assert first.state == RUNNING and second.state == QUEUED and (queue.place(second), queue.place(never)) == (1, 2)
    queue.cancel(never.id)  # still queued: it never starts, and nothing is written
    assert never.state == CANCELLED and "before it started" in never.message and not never.run_dir.exists()
    assert queue.place(second) == 1
    queue.cancel(first.id)
    assert queue.wait(first, 120) and first.state == CANCELLED, first.message
    assert first.checkpoint is not None and first.checkpoint.is_file() and first.iteration < 120
    assert not (first.run_dir / "args.json").exists()  # nothing but the checkpoint
    assert queue.wait(second, 120) and second.state == DONE
    listed = {r.name: r.status for r in runs.runs()}
    assert listed["red-long"] == "resumable" and listed["blue-short"] == "done"
    assert "red-long" not in runs.erasures()
    assert "not finished" in one_line_error(lambda: runs.erasure("red-long"))

    resumed = queue.submit(actions.resume_config(runs, "red-long"))
    assert queue.wait(resumed, 300) and resumed.state == DONE, resumed.message
    assert resumed.start_iteration == first.iteration and resumed.iteration == 120
    rows = (resumed.run_dir / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 120  # the header and every iteration, the first session's too


def test_a_failed_training_is_one_line_and_the_queue_goes_on(runs):
    calls = []

    def train(job):
        calls.append(job.id)
        if len(calls) == 1:
            raise RuntimeError("out of memory\n  (a second line)")
        if len(calls) == 2:
            raise SystemExit(3)  # not an Exception: still the job's outcome, and the worker lives on
        return DONE, "done"

    queue = TrainingQueue(("cpu",), train=train, on_finish=lambda job: 1 / 0)  # a failing hook too
    failed = queue.submit(actions.train_config(runs, concept="green", iterations=3, name="fails"))
    exited = queue.submit(actions.train_config(runs, concept="green", iterations=3, name="exits"))
    after = queue.submit(actions.train_config(runs, concept="green", iterations=3, name="after"))
    assert queue.wait(failed, 30) and queue.wait(exited, 30) and queue.wait(after, 30)
    assert (failed.state, failed.message) == ("failed", "RuntimeError: out of memory (a second line)")
    assert (exited.state, exited.message) == ("failed", "SystemExit: 3")
    assert after.state == DONE and calls == [failed.id, exited.id, after.id]


def test_a_training_cancelled_while_its_model_loads_writes_nothing(runs, monkeypatch):
    import esd.app.jobs as jobs

    loading, go_on = threading.Event(), threading.Event()

    class SlowSetup(jobs.ESDTrainer):
        def setup(self):
            loading.set()
            assert go_on.wait(60)
            super().setup()

    monkeypatch.setattr(jobs, "ESDTrainer", SlowSetup)
    queue = TrainingQueue(("cpu",))
    job = queue.submit(actions.train_config(runs, concept="green", iterations=50, name="cancelled-loading"))
    assert loading.wait(60) and job.state == RUNNING and job.message == "loading the model"
    queue.cancel(job.id)
    go_on.set()
    assert queue.wait(job, 120)
    assert (job.state, job.message) == (CANCELLED, "cancelled before training started")
    assert job.iteration == 0 and not job.run_dir.exists()


# -- Test -------------------------------------------------------------------------------------------------
def test_side_by_side_from_the_same_seeds_with_verdicts(runs, pipelines, run):
    shown = actions.side_by_side(runs, pipelines, run, "a green circle", "0-2, 9", steps=25)
    assert [c for _, c in shown["base"]][0].startswith("seed 0: ") and len(shown["erased"]) == 4
    base, erased = (np.stack([im for im, _ in shown[k]]) for k in ("base", "erased"))
    assert base.shape == erased.shape == (4, 32, 32, 3) and not np.array_equal(base, erased)
    again = actions.side_by_side(runs, pipelines, run, "a green circle", "9", steps=25)
    # an image's noise depends on its seed alone (the batch it is drawn in changes float rounding only)
    assert np.abs(again["base"][0][0] - base[3]).max() < 1e-4
    assert "green" in shown["base"][0][1]  # the base model draws the concept; the judge says so
    for bad, expected in [("", "no seeds"), ("3-1", "backwards"), ("x", "not a seed"), ("0-99", "at most 16"),
                          ("99999999999999999999", "too large")]:
        assert expected in one_line_error(lambda b=bad: actions.side_by_side(runs, pipelines, run, "red", b))
    assert "prompt is empty" in one_line_error(lambda: actions.side_by_side(runs, pipelines, run, " ", "0"))
    assert "steps" in one_line_error(lambda: actions.side_by_side(runs, pipelines, run, "red", "0", steps=0))


def test_an_official_style_full_unet_upload_draws_as_the_run(runs, pipelines, run, tmp_path):
    """The official ESD code's diffusers-*.pt (the whole UNet's state dict, a weights-only torch file), uploaded
    without a record beside it, with the base model typed: the same erased images as the run itself."""
    full = torch.load(run_weight_files(runs.root / run)["full"], map_location="cpu", weights_only=True)
    official = tmp_path / "diffusers-green-official.pt"
    torch.save(full, official)
    name = runs.store_upload(official)
    assert "does not name its base model" in one_line_error(
        lambda: actions.side_by_side(runs, pipelines, name, "a green circle", "0-1"))
    uploaded = actions.side_by_side(runs, pipelines, name, "a green circle", "0-1", upload_base="toy")
    own = actions.side_by_side(runs, pipelines, run, "a green circle", "0-1")
    assert every(np.array_equal(a, b) for (a, _), (b, _) in zip(uploaded["erased"], own["erased"]))


# -- Evaluate, Attack, Export -------------------------------------------------------------------------------
def test_evaluate_measures_a_toy_run_and_keeps_earlier_results(runs, pipelines, run):
    earlier = runs.root / run / "app" / "evaluate-1" / "report.json"  # an evaluation made before
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    shown = actions.evaluate(runs, pipelines, run, samples=2)
    report = shown["report"]
    assert Path(shown["chart"]).parent.name == "evaluate-2" and earlier.read_text() == "{}"
    assert len(shown["rows"]) == len(report["erased"]) + len(report["others"]) == 30
    assert every(r["n"] == 2 for v in report["erased"].values() for r in [v["before"], *v["after_by_seed"]])
    assert report["summary"]["presence_before"]["n"] == 2 * len(report["erased"])
    # the table's rates are the report's own, each with its Wilson interval
    first = report["erased"][shown["rows"][0][0]]
    assert shown["rows"][0][3] == str(actions.Rate(first["before"]["k"], first["before"]["n"]))
    assert "[" in shown["line"] and "Wilson 95%" in shown["line"] and Path(shown["chart"]).is_file()
    assert json.loads((Path(shown["chart"]).parent / "report.json").read_text())["summary"] == report["summary"]
    assert "samples" in one_line_error(lambda: actions.evaluate(runs, pipelines, run, samples=0))


def test_attack_and_export_write_inside_the_run(runs, pipelines, run):
    attacked = actions.attack(runs, pipelines, run, "prefix", "a green circle", "0", samples=1, steps=2)
    assert "under the prefix attack" in attacked["line"] and Path(attacked["grid"]).is_file()
    assert Path(attacked["grid"]).is_relative_to(runs.root / run / "app")
    assert "not one of" in one_line_error(lambda: actions.attack(runs, pipelines, run, "jailbreak"))

    lora = actions.export(runs, run, "lora", "4")
    assert Path(lora["file"]).name == "lora.safetensors" and "green" in lora["card"]
    folder = actions.export(runs, run, "diffusers")
    assert folder["file"].endswith(".zip") and Path(folder["file"]).is_file()
    assert Path(lora["file"]).is_file()  # the second export did not replace the first
    assert "rank" in one_line_error(lambda: actions.export(runs, run, "lora", "many"))
    assert "not one of" in one_line_error(lambda: actions.export(runs, run, "onnx"))


def test_guarded_callbacks_show_one_line():
    def fails(_):
        raise ValueError("bad\ninput  here")

    def crashes(_):
        raise RuntimeError("boom")

    out = guarded(fails, 3, 1)(None)
    assert out[1] == "**Error:** bad input here" and len(out) == 3
    assert guarded(crashes, 1, 0)(None) == "**Error:** boom"
    assert error_line(OSError("disk full")) == "**Error:** disk full"


def test_esd_app_flags(capsys):
    rc, err = cli(["app", "--port", "0", "--runs", os.devnull + "/x"], capsys)
    assert rc == 2 and len(err) == 1 and "--port" in err[0]
