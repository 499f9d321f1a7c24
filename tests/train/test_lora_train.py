"""``esd train --lora_rank``: only the LoRA factors train, the run's files hold base + (alpha / r) up @ down, the
LoRA loads through diffusers and gives the merged model; seeded runs repeat and resume exactly; ``--export``."""

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import every
from safetensors import safe_open
from safetensors.torch import load_file

from esd import ESDConfig, load_erased_unet, train_esd
from esd.cli import main
from esd.core.methods import TRAIN_METHODS, TrainMethod
from esd.families.registry import FAMILIES
from esd.families.sources import TOY_MODEL_DIR
from esd.formats.lora import kohya_name
from esd.train.lora import plain_state_dict
from esd.train.recipe import ESDTrainer

FAST = {"ddim_steps": 6, "pool_size": 1, "seed": 0, "iterations": 2, "lr": 1e-2}  # plumbing, not erasure


def lora_config(base, tmp_path, name, **kw) -> ESDConfig:
    settings = {"prompt": "cat", "train_method": "xattn", "lora_rank": 2, **FAST, **kw}
    return ESDConfig(base_model=str(base), save_path=str(tmp_path), name=name, **settings)


def lora_factors(path) -> tuple[dict, dict]:
    """kohya key -> tensor, and the header's strings."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def unet_output(unet, seed=0):
    """One prediction at a fixed random input (tiny SD1 shapes)."""
    g = torch.Generator().manual_seed(seed)
    latents, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def test_only_factors_train_and_the_files_agree_with_them(tiny_models, tmp_path, monkeypatch):
    """noxattn on tiny SD1: 3x3 convolutions (LoCon) and linears get adapters; its norms and biases are kept
    out and stay the base's. The merged weights are base + (alpha / r) up @ down of the saved LoRA, which
    diffusers' load_lora_weights (and the card's snippet) turn into the merged model's predictions."""
    base = tiny_models["sd1"]
    trainer = ESDTrainer(lora_config(base, tmp_path, "run", train_method="noxattn", lora_alpha=3.0))
    trainer.setup()
    before = plain_state_dict(trainer.unet)
    trainer.save(trainer.train())
    after = plain_state_dict(trainer.unet)
    assert every(torch.equal(before[k], after[k]) for k in before)  # the UNet's own weights never moved
    assert every(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in trainer.trained_names)
    assert any(dict(trainer.unet.named_parameters())[n].abs().max() > 0
               for n in trainer.trained_names if "lora_B" in n)  # B starts at 0 and trained
    assert trainer.theta.excluded and every(n.endswith(".bias") or "norm" in n for n in trainer.theta.excluded)

    run = trainer.output_dir
    factors, header = lora_factors(run / "lora-run.safetensors")
    merged = load_file(run / "run.safetensors")
    assert set(merged) == {f"{m}.weight" for m in trainer.theta.modules}
    assert any(before[k].ndim == 4 and before[k].shape[-1] == 3 for k in merged)  # a 3x3 conv among them
    for name, weight in merged.items():
        key = kohya_name(name.removesuffix(".weight"), trainer.unet.config, FAMILIES["sd1"])
        up, down = factors[f"{key}.lora_up.weight"], factors[f"{key}.lora_down.weight"]
        assert float(factors[f"{key}.alpha"]) == 3.0 and down.shape[0] == 2
        expected = before[name] + 3.0 / 2 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
    full = torch.load(run / "diffusers-run.pt", weights_only=True)
    assert every(torch.equal(full[k], merged[k] if k in merged else before[k]) for k in before)
    assert header["esd_lora_rank"] == "2" and header["esd_train_method"] == "noxattn"
    assert (header["ss_base_model_version"], header["ss_v2"], header["ss_network_dim"], header["ss_network_alpha"],
            header["ss_output_name"]) == ("sd_v1", "False", "2", "3", "lora-run")
    record = json.loads((run / "args.json").read_text())
    assert (record["lora_rank"], record["lora_alpha"]) == (2, 3.0)
    assert record["trained_parameters"] == sum(v.numel() for k, v in factors.items() if not k.endswith("alpha"))

    erased = unet_output(load_erased_unet(run / "run.safetensors", base))
    assert (erased - unet_output(load_erased_unet(run / "diffusers-run.pt", base))).abs().max() == 0
    assert (erased - unet_output(StableDiffusionPipeline.from_pretrained(base).unet)).abs().max() > 1e-4
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(run / "lora-run.safetensors"))
    torch.testing.assert_close(unet_output(pipe.unet), erased, rtol=1e-4, atol=1e-5)

    card = (run / "README.md").read_text()
    assert "| trained as | a LoRA (peft): rank 2, alpha 3.0, on" in card
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "load_lora_weights" in b]
    monkeypatch.chdir(run)
    scope = {}
    exec(snippet, scope)  # loads and fuses the LoRA
    torch.testing.assert_close(unet_output(scope["pipe"].unet), erased, rtol=1e-4, atol=1e-5)


def test_seeded_runs_repeat_and_resume_is_exact(tiny_models, tmp_path):
    """Two runs of one seed (one of them checkpointing) give the same factors bit for bit, and so does the
    run resumed from the checkpoint; another seed draws other A's."""
    base = tiny_models["sd1"]

    def factors(result):
        return lora_factors(result.output_dir / f"lora-{result.output_dir.name}.safetensors")[0]

    a = train_esd(lora_config(base, tmp_path, "a", iterations=4))
    part = train_esd(lora_config(base, tmp_path, "part", iterations=4, save_every=2))
    fa, fp = factors(a), factors(part)
    assert every(torch.equal(fa[k], fp[k]) for k in fa) and a.losses == part.losses
    ckpt = part.output_dir / "checkpoints" / "checkpoint-2.pt"
    assert every(".lora_" in k for k in torch.load(ckpt, weights_only=True)["trained"])
    resumed = train_esd(lora_config(base, tmp_path, "resumed", iterations=4, resume=str(ckpt)))
    fr = factors(resumed)
    assert every(torch.equal(fa[k], fr[k]) for k in fa) and resumed.losses == a.losses
    other = factors(train_esd(lora_config(base, tmp_path, "other", iterations=1, seed=1)))
    assert not any(torch.equal(fa[k], other[k]) for k in fa if "lora_down" in k)
    with pytest.raises(ValueError, match="other settings: --lora_rank 4 vs 2"):
        train_esd(lora_config(base, tmp_path, "bad", iterations=4, resume=str(ckpt), lora_rank=4))


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "0"], "--lora_rank must be a positive integer, got 0"),
    (["--lora_rank", "-1"], "--lora_rank must be a positive integer, got -1"),
    (["--lora_alpha", "4"], "--lora_alpha is the scale of a LoRA: it needs --lora_rank"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be a positive number"),
    (["--export", "lora,ckpt"], "--export 'lora,ckpt' is not valid: give each of lora, single-file, diffusers"),
    (["--export", "lora", "--export_rank", "0"], "--export_rank '0' is not valid"),
])
def test_bad_lora_and_export_values_are_one_line_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("esd.train.recipe.load_models", lambda *a, **k: pytest.fail("loaded a model"))
    rc = main(["train", "--prompt", "red", "--train_method", "xattn", "--base_model", "toy", "--save_path",
               str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err
    assert not any(tmp_path.iterdir())


def test_a_method_with_no_lora_layers_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(TRAIN_METHODS, "norms", TrainMethod("norms", "norm layers", lambda n, m, _: "norm" in n))
    monkeypatch.setattr("esd.train.recipe.load_models", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=r"train method 'norms' selects no Linear or Conv2d weight .*methods with "
                                         r"LoRA layers in this model: xattn, noxattn, selfattn, full,"):
        ESDTrainer(lora_config(TOY_MODEL_DIR, tmp_path, "n", train_method="norms"))


def test_train_exports_at_the_end_into_the_run_folder(tmp_path):
    """Toy model, LoRA-trained: --export lora,single-file writes what esd export writes, with its settings."""
    rc = main(["train", "--prompt", "red", "--train_method", "xattn", "--base_model", "toy", "--iterations", "2",
               "--ddim_steps", "6", "--pool_size", "1", "--seed", "0", "--lr", "1e-2", "--lora_rank", "2",
               "--save_path", str(tmp_path), "--name", "red", "--export", "lora", "--export", "single-file",
               "--export_rank", "full", "--export_dtype", "fp32"])
    assert rc == 0
    run = tmp_path / "red"
    exported, header = lora_factors(run / "export" / "lora.safetensors")
    trained, _ = lora_factors(run / "lora-red.safetensors")
    assert json.loads(header["esd_export"])["export"]["rank"] == "full" and exported.keys() == trained.keys()
    assert every(v.dtype == torch.float32 for v in exported.values())
    with safe_open(str(run / "export" / "single-file.safetensors"), "pt") as f:
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
    record = json.loads((run / "args.json").read_text())
    assert record["export"] == ["lora", "single-file"] and record["export_options"] == {"rank": "full",
                                                                                        "dtype": "fp32"}
    assert "`export/lora.safetensors` (`esd export --format lora`)" in (run / "README.md").read_text()


def test_overwrite_removes_the_old_runs_diffusers_export(tmp_path):
    """A run replaced with --overwrite leaves no stale export/diffusers/ model beside its new weights."""
    args = ["train", "--prompt", "red", "--train_method", "xattn", "--base_model", "toy", "--iterations", "1",
            "--ddim_steps", "6", "--pool_size", "1", "--seed", "0", "--save_path", str(tmp_path), "--name", "red",
            "--save_format", "trained"]
    assert main(args + ["--export", "diffusers"]) == 0
    assert (tmp_path / "red" / "export" / "diffusers" / "unet").is_dir()
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert not (tmp_path / "red" / "export" / "diffusers").exists()
    assert json.loads((tmp_path / "red" / "args.json").read_text())["seed"] == 1
