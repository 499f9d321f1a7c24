"""esd train --train_text_encoder: the text encoder's layers train beside the UNet's parameters (AdvUnlearn's robust
module). theta's conditioning starts as theta*'s, the file holds both modules' tensors and loads only where a text
encoder is given, robust runs with it resume exactly, and settings it cannot work with are refused in one line."""

import json
from functools import partial

import helpers
import pandas as pd
import pytest
import torch
from helpers import every, run_weights
from safetensors.torch import save_file

from esd import ESDConfig, ModelLoadError, apply_erased_weights
from esd.families.encode import encode_prompts
from esd.families.models import load_models, load_pipeline
from esd.train.text_encoder import PREFIX, TrainedTextEncoder, trainable_names

ROBUST = {"adversarial": "prefix", "adv_every": 3, "adv_steps": 2, "adv_tokens": 2, "adv_references": 2}


train = partial(helpers.train, iterations=4, lr=1e-3, ddim_steps=4, seed=0, save_format="trained")


def test_the_trained_encoder_starts_where_the_frozen_prompts_are(tiny_models):
    """At the first step theta = theta*: the trained encoder's conditioning of the concept (and of --erase_from)
    is the frozen encoding the targets use, bit for bit, and only the layers and final norm train."""
    models = load_models(tiny_models["sd1"])
    frozen = encode_prompts(models, ["cat", "a dog"], 64).prompt_embeds
    encoder = models.text_encoders[0]
    names = trainable_names(encoder)
    assert names and every(".layers." in n or "final_layer_norm" in n for n in names)
    assert not any("embeddings" in n for n in names)
    trained = TrainedTextEncoder(encoder, models.tokenizers[0], ["cat"], None)
    assert torch.equal(trained.source(torch.tensor([0, 0])).prompt_embeds, frozen[[0, 0]])
    assert torch.equal(TrainedTextEncoder(encoder, models.tokenizers[0], ["cat"], "a dog")
                       .source(torch.tensor([0])).prompt_embeds, frozen[[1]])
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == set(names)


def test_weights_hold_both_modules_and_load_only_with_a_text_encoder(tiny_models, tmp_path):
    plain = train(tiny_models["sd1"], tmp_path, "plain")
    run = train(tiny_models["sd1"], tmp_path, "te", train_text_encoder=True)
    # the first step is plain ESD's (same batch, theta = theta*); then the encoder's training changes the run
    assert run.losses[0] == pytest.approx(plain.losses[0], rel=1e-6) and run.losses[1:] != plain.losses[1:]
    state = run_weights(run)
    pipe = load_pipeline(tiny_models["sd1"])
    base_encoder = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    encoder_keys = {k for k in state if k.startswith(PREFIX)}
    assert encoder_keys == {PREFIX + n for n in trainable_names(pipe.text_encoder)}
    assert set(state) - encoder_keys == set(run_weights(plain))  # the UNet's: the train method's, as without it
    assert any(not torch.equal(state[PREFIX + n], base_encoder[n]) for n in trainable_names(pipe.text_encoder))
    args = json.loads((run.output_dir / "args.json").read_text())
    assert args["train_text_encoder"] is True and args["text_encoder_tensors"] == len(encoder_keys)
    assert "text_encoder.' (--train_text_encoder)" in (run.output_dir / "README.md").read_text()

    with pytest.raises(ModelLoadError, match="also erases the text encoder") as e:
        apply_erased_weights(pipe.unet, run.output_dir / "te.safetensors")
    assert "\n" not in str(e.value)
    assert every(torch.equal(v, base_encoder[k]) for k, v in pipe.text_encoder.state_dict().items())  # untouched
    loaded = apply_erased_weights(pipe.unet, run.output_dir / "te.safetensors", text_encoder=pipe.text_encoder)
    assert set(loaded) == set(state)
    now = pipe.text_encoder.state_dict()
    assert every(torch.equal(now[k[len(PREFIX):]], state[k]) for k in encoder_keys)
    assert torch.equal(now["embeddings.token_embedding.weight"],
                       base_encoder["embeddings.token_embedding.weight"])
    # an encoder tensor the model lacks: refused under the same strict checks as the UNet's, nothing loaded
    bad = tmp_path / "bad.safetensors"
    save_file({**state, PREFIX + "encoder.layers.9.mlp.fc1.weight": torch.zeros(2, 2)}, str(bad),
              metadata={"format": "esd-trained-parameters"})
    fresh = load_pipeline(tiny_models["sd1"])
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    with pytest.raises(ModelLoadError, match=r"does not fit .*1 unexpected keys \(text_encoder.encoder.layers.9"):
        apply_erased_weights(fresh.unet, bad, text_encoder=fresh.text_encoder)
    assert every(torch.equal(v, before[k]) for k, v in fresh.unet.state_dict().items())


def test_robust_runs_with_the_text_encoder_resume_exactly(tiny_models, tmp_path):
    """The adversarial and retain rows are encoded by the trained encoder at every step; a run resumed mid-round
    ends bit-identical to a straight one, and resuming without the flag is refused."""
    retain = tmp_path / "retain.txt"
    retain.write_text("a photo of a dog\nchurch\n")
    kw = {**ROBUST, "retain_prompts": str(retain), "train_text_encoder": True}
    full = train(tiny_models["sd1"], tmp_path, "full", **kw)
    part = train(tiny_models["sd1"], tmp_path, "part", save_every=2, **kw)
    checkpoint = str(part.output_dir / "checkpoints" / "checkpoint-2.pt")
    resumed = train(tiny_models["sd1"], tmp_path, "resumed", resume=checkpoint, **kw)
    a, b = run_weights(full), run_weights(resumed)
    assert a.keys() == b.keys() and every(torch.equal(a[k], b[k]) for k in a) and resumed.losses == full.losses
    losses = pd.read_csv(full.output_dir / "loss.csv")
    assert losses["adversarial_loss"].gt(0).all()
    assert losses["retain_loss"].iloc[0] < 1e-10 and losses["retain_loss"].iloc[1:].gt(1e-10).all()
    without = {k: v for k, v in kw.items() if k != "train_text_encoder"}
    with pytest.raises(ValueError, match="--train_text_encoder False vs True"):
        train(tiny_models["sd1"], tmp_path, "again", resume=checkpoint, **without)


@pytest.mark.parametrize("extra, message", [
    ({"save_format": "both"}, "it needs --save_format trained, not 'both'"),
    ({"lora_rank": 2}, "cannot be combined with --lora_rank"),
    ({"preset": "paper"}, "needs x_t sampled by the frozen model"),
    ({"export": ["lora"]}, "--export writes the UNet alone"),
    ({"family": "sdxl"}, "--train_text_encoder supports SD 1.x and 2.x models (one text encoder); --base_model"),
])
def test_settings_it_cannot_work_with_are_refused_before_loading(extra, message, tiny_models, tmp_path):
    family = extra.pop("family", "sd1")
    settings = {"prompt": "cat", "train_method": "xattn", "save_format": "trained", "save_path": str(tmp_path),
                "base_model": tiny_models[family], "train_text_encoder": True, **extra}
    with pytest.raises(ValueError) as e:
        ESDConfig(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_text_encoder_trains_at_its_own_rate(tiny_models, tmp_path):
    """--text_encoder_lr is the encoder's rate in a parameter group of its own: equal to --lr it changes nothing
    (bit for bit), far below it the encoder barely moves while the UNet's tensors train at --lr."""
    one = run_weights(train(tiny_models["sd1"], tmp_path, "one", train_text_encoder=True))
    same = run_weights(train(tiny_models["sd1"], tmp_path, "same", train_text_encoder=True, text_encoder_lr=1e-3))
    assert one.keys() == same.keys() and every(torch.equal(one[k], same[k]) for k in one)
    slow = run_weights(train(tiny_models["sd1"], tmp_path, "slow", train_text_encoder=True, text_encoder_lr=1e-9))
    base_encoder = load_pipeline(tiny_models["sd1"]).text_encoder.state_dict()

    def moved(state, prefix):  # the largest change of a tensor under ``prefix`` from the base model
        return max((state[k] - base_encoder[k[len(PREFIX):]]).abs().max().item() for k in state
                   if k.startswith(prefix))

    assert moved(one, PREFIX) > 1e-4 and moved(slow, PREFIX) < 1e-7  # 4 Adam steps of at most ~lr each
    unet = [k for k in slow if not k.startswith(PREFIX)]
    assert any(not torch.equal(slow[k], one[k]) for k in unet)  # the UNet trained beside an encoder that barely did
    assert json.loads((tmp_path / "slow" / "args.json").read_text())["text_encoder_lr"] == 1e-9
    assert "final layer norm, at lr 1e-09;" in (tmp_path / "slow" / "README.md").read_text()  # the model card
    assert "final layer norm, at lr 0.001;" in (tmp_path / "one" / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    ({"text_encoder_lr": 1e-4}, "--text_encoder_lr is the rate of --train_text_encoder, which is not set"),
    ({"train_text_encoder": True, "text_encoder_lr": -1.0}, "--text_encoder_lr must be a positive number, not -1.0"),
])
def test_a_text_encoder_rate_it_cannot_use_is_refused(extra, message, tiny_models, tmp_path):
    with pytest.raises(ValueError) as e:
        ESDConfig(prompt="cat", train_method="xattn", save_format="trained", save_path=str(tmp_path),
                  base_model=tiny_models["sd1"], **extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_loaded_model_with_two_text_encoders_is_refused_in_one_line(tiny_models):
    """Sources the settings check cannot read before loading (a hub id) are checked once loaded, by the one
    check both --train_text_encoder and --adversarial use."""
    from esd.train.text_encoder import check_loaded_text_encoders

    check_loaded_text_encoders(load_models(tiny_models["sd1"]), "--train_text_encoder")  # one encoder: passes
    with pytest.raises(ValueError) as e:
        check_loaded_text_encoders(load_models(tiny_models["sdxl"]), "--adversarial")
    assert "--adversarial supports SD 1.x and 2.x models (one text encoder);" in str(e.value)
    assert "is sdxl with 2" in str(e.value) and "\n" not in str(e.value)
