"""esd attack: both attacks run on tiny models and write their outputs, learn only real tokens or the one
new token, repeat exactly under a seed; bad input is refused before any work; and on the toy model
concept inversion brings back a colour that a weak erasure hid from the literal prompt."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from helpers import every
from PIL import Image
from safetensors.torch import load_file, save_file

from esd import ESDConfig, train_esd
from esd.attack import AttackConfig, inversion_prompt, run_attack
from esd.attack.run import load_pipeline
from esd.cli import main
from esd.toy.demo import concept_presence
from esd.train.attacks.inversion import TOKEN, inversion_attack
from esd.train.attacks.prefix import prefix_attack, word_tokens
from esd.train.attacks.target import Target, add_placeholders, denoising_loss, slot_embeddings, token_ids

FAST = {"steps": 2, "samples": 2, "ddim_steps": 2, "judge": "toy", "concept": "red"}  # plumbing, not strength


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory):
    """A tiny SD1 model, "erased" weights (its own UNet, so any file it loads is checked strictly) and a CSV."""
    root = tmp_path_factory.mktemp("attack")
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")
    save_file(unet.state_dict(), root / "erased.safetensors")
    (root / "prompts.csv").write_text("case_number,prompt,evaluation_seed\n0,a photo of a cat,3\n7,a red dog,4\n")
    return {"base_model": tiny_models["sd1"], "weights": str(root / "erased.safetensors"),
            "prompts": str(root / "prompts.csv")}


def target_of(path, placeholders):
    """The attacker's view of a tiny model (its own UNet: no erasure needed to test the mechanics)."""
    pipe = load_pipeline(path, torch.device("cpu"))
    target = Target(pipe.unet, pipe.text_encoder, pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config),
                    torch.device("cpu"))
    return target, add_placeholders(target, placeholders)


@pytest.mark.parametrize("attack", ["prefix", "inversion"])
def test_attack_writes_every_output_one_row_per_image(attack, tiny_run, tmp_path):
    out = tmp_path / "out"
    summary = run_attack(AttackConfig(**tiny_run, attack=attack, out=str(out), **FAST), log=lambda *a: None)
    names = {p.name for p in out.iterdir()}
    expected = {"results.csv", "summary.json", "adversarial_prompts.csv", "losses.csv", "grid.png", "images"}
    assert names == expected | ({"token.safetensors"} if attack == "inversion" else set())
    results = pd.read_csv(out / "results.csv", dtype={"case_number": str})
    assert list(results["case_number"]) == ["0", "0", "7", "7"] and list(results["sample"]) == [0, 1, 0, 1]
    assert list(results["evaluation_seed"]) == [3, 3, 4, 4]
    for stage in ("reference", "before", "after"):
        assert results[f"{stage}_present"].isin([0, 1]).all()
        assert sorted(p.name for p in (out / "images" / stage).iterdir()) == ["0_0.png", "0_1.png", "7_0.png",
                                                                             "7_1.png"]
    adversarial = pd.read_csv(out / "adversarial_prompts.csv", dtype={"case_number": str})
    assert list(adversarial.columns) == ["case_number", "prompt", "evaluation_seed", "original_prompt"]
    assert list(adversarial["original_prompt"]) == ["a photo of a cat", "a red dog"]
    if attack == "prefix":  # k tokens, then the prompt
        assert every(len(p.split()) == 5 + len(o.split()) and p.endswith(o)
                   for p, o in zip(adversarial["prompt"], adversarial["original_prompt"]))
    else:  # the concept word is replaced; a prompt without it gets the token in front
        assert list(adversarial["prompt"]) == [f"{TOKEN} a photo of a cat", f"a {TOKEN} dog"]
        assert load_file(out / "token.safetensors")[TOKEN].shape == (32,)  # the tiny encoder's width
    losses = pd.read_csv(out / "losses.csv")
    assert len(losses) == 2 * (2 if attack == "prefix" else 1) and losses["loss"].gt(0).all()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["settings"]["steps"] == 2 and saved["environment"]["torch"] == torch.__version__
    assert saved["presence"]["after"] == results["after_present"].mean()
    assert saved["seeds"]["rows"] == {"0": 3, "7": 4}


def test_prefix_tokens_are_real_vocabulary_words_and_a_seed_repeats_them(tiny_models):
    target, slots = target_of(tiny_models["sd1"], [f"<adv{i}>" for i in range(3)])
    candidates = word_tokens(target)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = [prefix_attack(target, slots, "a cat", latents, candidates, 3, 0.05, torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert runs[0] == runs[1]  # token ids, text and every loss
    ids, tok = runs[0].token_ids, target.tokenizer
    assert len(ids) == 3 and set(ids) <= set(candidates.tolist()) and not set(ids) & set(slots)
    assert tok(runs[0].prefix, add_special_tokens=False).input_ids == ids  # the text is what was optimised
    other = prefix_attack(target, slots, "a cat", latents, candidates, 3, 0.05, torch.Generator().manual_seed(6))
    assert other.losses != runs[0].losses


def test_inversion_learns_only_its_token_and_a_seed_repeats_it(tiny_models):
    target, (slot,) = target_of(tiny_models["sd1"], [TOKEN])
    table = target.embedding_table.detach().clone()
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of {TOKEN}"] * 3
    runs = [inversion_attack(target, slot, prompts, latents, 4, 0.01, 2, torch.Generator().manual_seed(1))
            for _ in range(2)]
    assert torch.equal(runs[0].embedding, runs[1].embedding) and runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].embedding, table[:slot].mean(0))  # it moved from its start
    assert torch.equal(target.embedding_table, table)  # the text encoder itself is untouched


def test_slot_embeddings_swap_only_the_placeholders_rows(tiny_models):
    target, (slot,) = target_of(tiny_models["sd2"], [TOKEN])
    ids = token_ids(target, [f"a {TOKEN} cat", "a cat"])
    v = torch.randn(1, 32, requires_grad=True)
    embedding = target.text_encoder.get_input_embeddings()
    with slot_embeddings(target, [slot], v):
        rows = embedding(ids)
    assert torch.equal(rows[0, 2], v[0].detach()) and torch.equal(rows[1], embedding(ids[1]))
    assert torch.equal(embedding(ids)[0, 2], target.embedding_table[slot])  # the hook is gone after the block
    with slot_embeddings(target, [slot], v):  # v-prediction (sd2): the loss reaches v and nothing else
        denoising_loss(target, ids[:1], torch.randn(1, 4, 16, 16), torch.Generator().manual_seed(0)).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert every(p.grad is None for p in target.text_encoder.parameters())


def test_the_saved_token_loads_with_diffusers_textual_inversion(tiny_run, tmp_path):
    """The route summary.json gives for the inversion's prompts, which esd generate cannot load."""
    run_attack(AttackConfig(**tiny_run, attack="inversion", out=str(tmp_path), **FAST), log=lambda *a: None)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_run["base_model"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(tmp_path / "token.safetensors"))
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row, load_file(tmp_path / "token.safetensors")[TOKEN])


def test_inversion_prompt_replaces_the_whole_word_only():
    assert inversion_prompt("A Red circle, red!", "red") == f"A {TOKEN} circle, {TOKEN}!"
    assert inversion_prompt("a reddish square", "red") == f"{TOKEN} a reddish square"
    assert inversion_prompt("van gogh's starry night", "Van Gogh") == f"{TOKEN}'s starry night"


BAD = [
    (["--attack", "jump"], "argument --attack: invalid choice: 'jump'"),
    (["--attack", "prefix", "--concept", "purple"], "unknown toy concept 'purple'; valid: red, green"),
    (["--attack", "prefix", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--attack", "prefix", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--attack", "prefix", "--judge", "magic"], "argument --judge: invalid choice: 'magic'"),
    (["--attack", "inversion", "--weights", "{t}/missing.safetensors"], "--weights '{t}/missing.safetensors' does not"),
    (["--attack", "prefix", "--out", "{t}/done"], "already holds summary.json; choose a new folder"),
    (["--attack", "prefix", "--prompts", "{t}/bad.csv"], "is an empty prompt"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input_is_one_line_before_any_work(extra, message, tmp_path, capsys):
    (tmp_path / "erased.safetensors").write_bytes(b"never read: the input check comes first")
    (tmp_path / "prompts.csv").write_text("case_number,prompt,evaluation_seed\n0,a red circle,1\n")
    (tmp_path / "bad.csv").write_text("case_number,prompt,evaluation_seed\n0,,1\n")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    argv = ["attack", "--base_model", "toy", "--weights", "{t}/erased.safetensors", "--prompts", "{t}/prompts.csv",
            "--concept", "red", "--out", "{t}/out"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and message.replace("{t}", str(tmp_path)) in err[0], err
    assert not (tmp_path / "out").exists() and (tmp_path / "done" / "summary.json").read_text() == "{}"


def test_sdxl_and_a_real_model_without_judge_are_refused(tiny_models, tiny_run):
    common = {"weights": tiny_run["weights"], "prompts": tiny_run["prompts"], "attack": "prefix",
              "concept": "cat", "out": "unused"}
    with pytest.raises(ValueError, match="--judge is needed for a model other than the toy one; one of: toy"):
        AttackConfig(**common, base_model=tiny_models["sd1"])
    with pytest.raises(ValueError, match="is SDXL; esd attack supports SD 1.x and 2.x"):
        AttackConfig(**common, base_model=tiny_models["sdxl"], judge="nudenet")


def test_inversion_recovers_red_that_a_weak_erasure_hid_on_the_toy_model(tmp_path):
    """The issue's claim at toy scale: an ESD-x erasure of "red" short enough to be shallow lowers red in
    the literal prompts, and a token learned against the erased model brings red back."""
    erased = train_esd(ESDConfig(prompt="red", train_method="xattn", base_model="toy", iterations=150, batch_size=8,
                                 lr=1e-3, negative_guidance=1.0, ddim_steps=25, seed=0, devices="cpu",
                                 save_path=str(tmp_path), save_format="trained", name="red"))
    (tmp_path / "prompts.csv").write_text("case_number,prompt,evaluation_seed\n0,a red circle,1\n1,a red square,2\n"
                                          "2,red,3\n3,a photo of a red triangle,4\n")
    summary = run_attack(AttackConfig(weights=str(erased.output_dir / "red.safetensors"),
                                      prompts=str(tmp_path / "prompts.csv"), attack="inversion", concept="red",
                                      out=str(tmp_path / "attack"), base_model="toy", samples=8, steps=150),
                         log=lambda *a: None)
    presence = summary["presence"]
    assert presence["reference"] >= 0.9  # the base model draws red
    assert presence["before"] <= 0.5  # the erasure hid it from the literal prompts
    assert presence["after"] >= presence["before"] + 0.3  # and the attack brings it back
    for stage, r in summary["intervals"]["presence"].items():  # Wilson 95% over the 32 images of each stage
        assert r["n"] == 32 and r["rate"] == presence[stage] and r["low"] <= r["rate"] <= r["high"], stage
    assert summary["intervals"]["success_rate"]["after"]["n"] == 4  # over prompts
    images = [(tmp_path / "attack" / "images" / "after" / f) for f in pd.read_csv(tmp_path / "attack" / "results.csv")
              ["file"]]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])
    assert presence["after"] == concept_presence(pixels, "colour", "red")  # the demo's own measure agrees
