"""Robust ESD (esd train --adversarial/--retain_prompts): seeded runs repeat bit for bit, a resumed run ends
exactly where a straight one does (the adversarial state is in the checkpoint), the terms are recorded,
and bad settings are refused in one line before any model loads."""

import json
from functools import partial

import helpers
import pandas as pd
import pytest
import torch
from helpers import run_weights, same_tensors

from esd import ESDConfig
from esd.cli import main
from esd.train.robust_settings import read_retain_prompts

ROBUST = {"adv_every": 3, "adv_steps": 2, "adv_tokens": 2, "adv_references": 2}  # plumbing, not strength


# --adv_* without --adversarial is refused, so the tests that attack add ROBUST themselves
train = partial(helpers.train, iterations=4, lr=1e-3, ddim_steps=4, seed=0, save_format="trained")


@pytest.fixture
def retain(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("a photo of a dog\n\nchurch\n")
    return str(path)


@pytest.mark.parametrize("attack", ["prefix", "inversion"])
def test_seeded_robust_runs_repeat_and_resume_exactly(attack, tiny_models, tmp_path, retain):
    """Rounds before iterations 1 and 4: the resumed half starts mid-round (the conditioning comes from the
    checkpoint) and runs a round of its own (the attack's generator and start come from it too). Two seeded
    runs made apart (straight, and 2 + 2) ending bit-identical also shows that seeded runs repeat."""
    kw = {**ROBUST, "adversarial": attack, "retain_prompts": retain}
    full = train(tiny_models["sd1"], tmp_path, "full", **kw)
    part = train(tiny_models["sd1"], tmp_path, "part", save_every=2, **kw)
    resumed = train(tiny_models["sd1"], tmp_path, "resumed", resume=str(part.output_dir / "checkpoints" /
                                                                  "checkpoint-2.pt"), **kw)
    assert same_tensors(run_weights(full), run_weights(resumed)) and resumed.losses == full.losses
    if attack == "prefix":
        plain = train(tiny_models["sd1"], tmp_path, "plain")
        assert not same_tensors(run_weights(plain), run_weights(full))  # the extra terms change the erasure

    losses = pd.read_csv(full.output_dir / "loss.csv")
    assert {"adversarial_loss", "retain_loss"} <= set(losses.columns)
    assert losses["adversarial_loss"].gt(0).all()
    # theta = theta* at first: zero up to rounding (the trained rows are predicted in a 3x larger batch than the
    # frozen ones, one forward with the literal and adversarial rows); later retain losses here are >= 1e-6
    assert losses["retain_loss"].iloc[0] < 1e-10 and losses["retain_loss"].iloc[1:].gt(1e-8).all()
    args = json.loads((full.output_dir / "args.json").read_text())
    assert {k: args[k] for k in ("adversarial", "adv_every", "adv_steps", "adv_tokens", "adv_references",
                                 "retain_prompts", "retain_weight")} == {**kw, **ROBUST, "retain_weight": 1.0}
    assert args["robust"]["retain_prompt_count"] == 2 and args["robust"]["last_attack"]["loss"] > 0
    assert args["robust"]["adversarial_prompt"] == ("<adv0> <adv1> cat" if attack == "prefix" else "<adv>")


def test_adversarial_memory_trains_on_past_rounds_and_resumes_exactly(tiny_models, tmp_path):
    """--adv_memory 2 with a round before every iteration: from the second iteration each adversarial row is
    one of the last two rounds' conditionings, drawn at random; the checkpoint at 2 holds both rounds'
    conditionings, so the resumed half draws from the same two and ends where the straight run does."""
    kw = {**ROBUST, "adversarial": "prefix", "adv_every": 1, "adv_memory": 2}
    full = train(tiny_models["sd1"], tmp_path, "full", **kw)
    part = train(tiny_models["sd1"], tmp_path, "part", save_every=2, **kw)
    checkpoint = torch.load(part.output_dir / "checkpoints" / "checkpoint-2.pt", weights_only=False)
    assert len(checkpoint["robust"]["memory"]) == 2
    resumed = train(tiny_models["sd1"], tmp_path, "resumed", resume=str(part.output_dir / "checkpoints" /
                                                                  "checkpoint-2.pt"), **kw)
    assert same_tensors(run_weights(full), run_weights(resumed)) and resumed.losses == full.losses
    last_only = train(tiny_models["sd1"], tmp_path, "last", **{**kw, "adv_memory": 1})
    assert not same_tensors(run_weights(last_only), run_weights(full))  # the older rounds' rows change the erasure
    assert json.loads((full.output_dir / "args.json").read_text())["adv_memory"] == 2


def test_a_checkpoint_from_before_adv_memory_resumes_only_as_it_was_trained(tiny_models, tmp_path):
    """Such a checkpoint (no adv_memory in its settings, the last round's slot rows as "vectors") trained on
    its last round only: the new default is refused in one line, and --adv_memory 1 continues it exactly."""
    kw = {**ROBUST, "adversarial": "prefix", "adv_memory": 1}
    full = train(tiny_models["sd1"], tmp_path, "full", **kw)
    part = train(tiny_models["sd1"], tmp_path, "part", save_every=2, **kw)
    state = torch.load(part.output_dir / "checkpoints" / "checkpoint-2.pt", weights_only=False)
    del state["config"]["adv_memory"]
    state["robust"]["vectors"] = state["robust"].pop("memory")[-1]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(ValueError, match="trained before --adv_memory existed.*resume it with --adv_memory 1"):
        train(tiny_models["sd1"], tmp_path, "resumed", resume=str(old), **ROBUST, adversarial="prefix")
    resumed = train(tiny_models["sd1"], tmp_path, "resumed", resume=str(old), **kw)
    assert same_tensors(run_weights(full), run_weights(resumed)) and resumed.losses == full.losses


def test_resume_refuses_a_retain_file_edited_since_the_checkpoint(tiny_models, tmp_path, retain):
    """The checkpoint's retain images belong to the prompts the file held then; the same path with other
    prompts is refused in one line before any model loads, and the checkpoint is left as it was."""
    part = train(tiny_models["sd1"], tmp_path, "part", save_every=2, retain_prompts=retain)
    checkpoint = part.output_dir / "checkpoints" / "checkpoint-2.pt"
    before = checkpoint.read_bytes()
    with open(retain, "a") as f:
        f.write("a red barn\n")
    with pytest.raises(ValueError, match=r"changed since checkpoint .* \(3 prompts now, 2 then; first difference "
                                         r"at prompt 3\)"):
        train(tiny_models["sd1"], tmp_path, "resumed", resume=str(checkpoint), retain_prompts=retain)
    assert checkpoint.read_bytes() == before and not (tmp_path / "resumed").exists()


def test_retain_weight_zero_leaves_only_the_adversarial_term(tiny_models, tmp_path, retain):
    """loss.csv records the retain term as weighted, and weight 0 zeroes it."""
    r = train(tiny_models["sd1"], tmp_path, "w0", retain_prompts=retain, retain_weight=0.0, iterations=2)
    assert pd.read_csv(r.output_dir / "loss.csv")["retain_loss"].eq(0).all()


def test_retain_prompts_read_as_text_or_csv(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text(" a dog \n\nchurch\n")
    assert read_retain_prompts(str(text), ["cat"]) == ["a dog", "church"]
    table = tmp_path / "p.csv"
    table.write_text("case_number,prompt,evaluation_seed\n0,a dog,1\n1,a church,2\n2,None,3\n3,,4\n")
    assert read_retain_prompts(str(table), ["cat"]) == ["a dog", "a church", "None"]  # as esd generate reads it


@pytest.mark.parametrize("extra, files, message", [
    ({"adversarial": "gcg"}, {}, "--adversarial 'gcg' is not one of: prefix, inversion"),
    ({"adversarial": "prefix", "adv_every": 0}, {}, "--adv_every must be an integer >= 1, got 0"),
    ({"adversarial": "prefix", "adv_steps": -1}, {}, "--adv_steps must be an integer >= 1"),
    ({"adversarial": "prefix", "adv_memory": 0}, {}, "--adv_memory must be an integer >= 1, got 0"),
    ({"adv_memory": 4}, {}, "--adv_memory set without --adversarial"),
    ({"adv_steps": 20, "adv_tokens": 3}, {}, "--adv_steps, --adv_tokens set without --adversarial"),
    ({"retain_weight": float("nan")}, {}, "--retain_weight must be a finite number >= 0"),
    ({"retain_prompts": "missing.txt"}, {}, "--retain_prompts 'missing.txt' does not exist"),
    ({"retain_prompts": "r.txt"}, {"r.txt": "\n \n"}, "holds no prompt"),
    ({"retain_prompts": "r.txt"}, {"r.txt": "a dog\na Cat on a mat\n"}, "1 prompt(s) name the erased concept 'cat'"),
    ({"retain_prompts": "r.csv"}, {"r.csv": "text,seed\na dog,1\n"}, "has no 'prompt' column (columns: text, seed)"),
    ({"retain_prompts": "r.txt"}, {"r.txt": b"\xff\xfe\x00"}, "is not readable UTF-8 text"),
    ({"retain_prompts": "r.txt"}, {"r.txt": "".join(f"a dog {i}\n" for i in range(10_001))},
     "holds 10,001 prompts; at most 10,000"),
    ({"retain_prompts": "r.txt"}, {"r.txt": b"a dog\n" * (3 * 2**20)}, "is 18.0 MiB; a retain file holds at most"),
    ({"adversarial": "prefix", "prompt": "cat, dog", "separator": ","}, {}, "cannot be combined with --separator"),
    ({"adversarial": "inversion", "erase_from": "dog"}, {}, "cannot be combined with --separator or --erase_from"),
])
def test_bad_robust_settings_are_refused_before_loading(extra, files, message, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    settings = {"prompt": "cat", "train_method": "xattn", "base_model": tiny_models["sd1"], **extra}
    with pytest.raises(ValueError) as e:
        ESDConfig(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sdxl_is_refused_for_adversarial_training_in_one_cli_line(tiny_models, tmp_path, capsys):
    code = main(["train", "--prompt", "cat", "--train_method", "xattn", "--base_model", tiny_models["sdxl"],
                 "--adversarial", "prefix", "--save_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--adversarial supports SD 1.x and 2.x models (one text encoder)" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_retain_prompts_train_on_sdxl_with_its_pooled_embeddings_and_time_ids(tiny_models, tmp_path, retain):
    """The retain rows carry SDXL's extra inputs (they went missing once and the step failed). theta = theta*
    at first, so the first retain loss is zero up to rounding; the next are not."""
    r = train(tiny_models["sdxl"], tmp_path, "xl", retain_prompts=retain, iterations=3)
    losses = pd.read_csv(r.output_dir / "loss.csv")["retain_loss"]
    assert losses.iloc[0] < 1e-10 and losses.iloc[1:].gt(1e-12).all()


def test_forward_noise_follows_ddpm_for_unets_and_the_straight_path_for_flow_models():
    from diffusers import DDPMScheduler

    from esd.train.robust import forward_noise

    x0, eps = torch.full((3, 1, 2, 2), 2.0), torch.full((3, 1, 2, 2), -1.0)
    flow = forward_noise(x0, eps, torch.tensor([0.0, 250.0, 1000.0]), None)  # s = 0, 1/4, 1
    assert torch.allclose(flow[:, 0, 0, 0], torch.tensor([2.0, 1.25, -1.0]))
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 500, 999])
    abar = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(forward_noise(x0, eps, t, ddpm), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_a_retain_set_too_big_for_the_device_is_refused_before_drawing(tiny_models, tmp_path, monkeypatch):
    """The retain set's conditionings and images stay in memory for the run: estimated from one encoded
    prompt and checked against free memory before the frozen model draws any of them."""
    import psutil

    from esd.train import robust

    path = tmp_path / "r.txt"
    path.write_text("".join(f"a dog {i}\n" for i in range(1000)))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 2**20})())
    drawn = []
    monkeypatch.setattr(robust, "denoise", lambda *a, **k: drawn.append(1))
    with pytest.raises(ValueError, match=r"--retain_prompts: 1,000 prompts need about .* GiB on cpu .* more than "
                                         r"half of the 0.0 GiB free"):
        train(tiny_models["sd1"], tmp_path, "big", retain_prompts=str(path), iterations=1)
    assert not drawn
