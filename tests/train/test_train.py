import json
from functools import partial

import helpers
import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import every, run_script, run_weights, same_tensors, script_in_process
from ldm_format import to_ldm
from safetensors.torch import load_file

from esd import ESDConfig, ModelLoadError, load_erased_unet, select_parameters, train_esd
from esd.train.recipe import ESDTrainer

FAST = {"ddim_steps": 6, "seed": 0}  # short sampler: these tests check plumbing, not erasure


def base_unet(path):
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_two_iteration_cli_run_writes_loadable_outputs(family, tiny_models, tmp_path):
    r = run_script("--prompt", "cat", "--train_method", "xattn", "--base_model", tiny_models[family],
                "--iterations", 2, "--ddim_steps", 6, "--seed", 0, "--save_path", tmp_path, "--lr", "1e-3",
                "--name", "run")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "args.json", "diffusers-run.pt", "loss.csv",
                                                     "loss.png", "run.safetensors"]
    args = json.loads((out / "args.json").read_text())
    assert args["family"] == family and args["seed"] == 0 and args["environment"]["torch"] == torch.__version__
    assert args["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    losses = pd.read_csv(out / "loss.csv")
    assert list(losses["iteration"]) == [1, 2] and losses["loss"].notna().all()

    base = base_unet(tiny_models[family])
    fresh = base_unet(tiny_models[family])
    fresh.load_state_dict(torch.load(out / "diffusers-run.pt"), strict=True)  # the notebook way
    trained = set(select_parameters(base, "xattn"))
    base_sd, new_sd = base.state_dict(), fresh.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], new_sd[k])}
    assert changed and changed <= trained
    small = load_file(out / "run.safetensors")
    assert set(small) == trained
    assert every(torch.equal(small[k], new_sd[k]) for k in small)


train = partial(helpers.train, iterations=2, lr=1e-3, **FAST)


def test_same_seed_same_weights_and_pinned_loss(tiny_models, tmp_path):
    a = train(tiny_models["sd1"], tmp_path, "a")
    b = train(tiny_models["sd1"], tmp_path, "b")
    c = train(tiny_models["sd1"], tmp_path, "c", seed=1)
    assert same_tensors(run_weights(a), run_weights(b))
    assert not same_tensors(run_weights(a), run_weights(c))
    assert a.losses == b.losses
    # Regression pins (tiny SD1, seed 0, torch CPU): first losses of the fast path and the paper's loop.
    paper = train(tiny_models["sd1"], tmp_path, "paper", preset="paper")
    assert [a.losses[0], paper.losses[0]] == pytest.approx(PINNED_FIRST_LOSSES, rel=1e-3)


# The paper pin moved from 8.3116e-06 when its loop was fixed to the original code's (x_t level, query) pairing.
PINNED_FIRST_LOSSES = [4.8325e-06, 2.2345e-05]


def test_resume_gives_the_same_final_weights(tiny_models, tmp_path):
    full = train(tiny_models["sd1"], tmp_path, "full", iterations=4)
    part = train(tiny_models["sd1"], tmp_path, "part", iterations=4, save_every=2)
    ckpt = part.output_dir / "checkpoints" / "checkpoint-2.pt"
    assert ckpt.exists()
    resumed = train(tiny_models["sd1"], tmp_path, "resumed", iterations=4, resume=str(ckpt))
    assert same_tensors(run_weights(full), run_weights(resumed))
    assert resumed.losses == full.losses  # the history is carried in the checkpoint
    with pytest.raises(ValueError, match="other settings: --train_method .selfattn. vs .xattn."):
        train(tiny_models["sd1"], tmp_path, "bad", iterations=4, resume=str(ckpt), train_method="selfattn")


def test_frozen_copy_on_second_device_matches_functional_view(tiny_models, tmp_path):
    """devices='cpu,cpu' keeps a whole frozen UNet (the original layout); it must train identically
    to the default single-copy view that swaps in frozen trained parameters."""
    one = train(tiny_models["sd2"], tmp_path, "one", devices="cpu", iterations=3)
    two = train(tiny_models["sd2"], tmp_path, "two", devices="cpu,cpu", iterations=3)
    a, b = run_weights(one), run_weights(two)
    assert every(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("options", [
    {"sampler_model": "trained", "timestep_mode": "original", "pool_size": 0},
    {"pool_size": 0, "erase_from": "dog", "batch_size": 2},
    {"preset": "official", "erase_from": "dog", "batch_size": 3},
    {"erase_from": "dog", "train_method": "noxattn", "batch_size": 2},
    {"prompt": "cat, dog", "separator": ",", "train_method": "esd-x-strict"},
])
def test_variants_train(options, tiny_models, tmp_path):
    before = base_unet(tiny_models["sdxl"]).state_dict()
    cfg = ESDConfig(**{"prompt": "cat", "train_method": "xattn", "base_model": tiny_models["sdxl"],
                       "iterations": 2, "save_path": str(tmp_path), "lr": 1e-3, "save_format": "trained",
                       **FAST, **options})
    result = train_esd(cfg)
    w = run_weights(result)
    assert set(w) == set(result.trained_names)
    assert any(not torch.equal(w[k], before[k]) for k in w)
    if "separator" in options:
        assert set(pd.read_csv(result.output_dir / "loss.csv")["word"]) <= {"cat", "dog"}


def test_mixed_precision_keeps_untrained_weights_exact(tiny_models, tmp_path):
    r = train(tiny_models["sd1"], tmp_path, "bf16", mixed_precision="bf16")
    full = torch.load(r.output_dir / "diffusers-bf16.pt")
    base = base_unet(tiny_models["sd1"]).state_dict()
    trained = set(r.trained_names)
    assert every(full[k].dtype == torch.float32 for k in full)
    assert every(torch.equal(full[k], base[k]) for k in base if k not in trained)


def test_fp16_save_halves_the_files_and_loads_strictly(tiny_models, tmp_path):
    ref = train(tiny_models["sd1"], tmp_path, "fp32")
    half = train(tiny_models["sd1"], tmp_path, "fp16", save_precision="fp16")
    a, b = run_weights(ref), run_weights(half)
    assert every(b[k].dtype == torch.float16 and torch.equal(b[k], a[k].half()) for k in a)
    for f in ("fp16.safetensors", "diffusers-fp16.pt"):
        small, big = (half.output_dir / f).stat().st_size, (ref.output_dir / f.replace("fp16", "fp32")).stat().st_size
        assert small < 0.55 * big
    unet = load_erased_unet(half.output_dir / "fp16.safetensors", base_model=tiny_models["sd1"])
    loaded = unet.state_dict()
    assert every(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], a[k].half().float()) for k in a)


@pytest.mark.parametrize("option", [{"gradient_checkpointing": True, "train_method": "noxattn"},
                                    {"compile": True}])
def test_memory_and_speed_options_train_the_same(option, tiny_models, tmp_path, monkeypatch):
    """Gradient checkpointing recomputes the same activations, and the compiled UNet (one compiled
    forward for the trained view and for the frozen view swapped in by functional_call) computes the
    same function: the trained weights match the plain run's. torch.compile is traced by dynamo with
    the eager backend here: inductor's C++ build takes minutes on 2 cores and is torch's to test."""
    if option.get("compile"):
        compile_calls, real_compile = [], torch.compile

        def eager_compile(fn, **kw):
            compile_calls.append(fn)
            return real_compile(fn, backend="eager")

        monkeypatch.setattr(torch, "compile", eager_compile)
    method = option.get("train_method", "xattn")
    plain = train(tiny_models["sd1"], tmp_path, "plain", train_method=method)
    other = train(tiny_models["sd1"], tmp_path, "other", **option)
    a, b = run_weights(plain), run_weights(other)
    assert a.keys() == b.keys()
    assert every(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not every(torch.equal(a[k], base) for k, base in weights_of_base(tiny_models["sd1"], a).items())
    assert json.loads((other.output_dir / "args.json").read_text())[next(iter(option))] is True
    if option.get("compile"):
        assert len(compile_calls) == 1


def test_adam8bit_keeps_uint8_state_trains_like_adam_and_resumes(tiny_models, tmp_path):
    """ESD-u on the tiny SD1: every trained tensor of 4,096 elements or more gets uint8 moments (the
    smaller ones stay fp32 in bitsandbytes), the 8-bit updates point where Adam's do, and a checkpoint
    (which holds the quantised state) resumes to the same weights."""
    pytest.importorskip("bitsandbytes")
    base = base_unet(tiny_models["sd1"]).state_dict()
    runs = {}
    for name in ("adam", "adam8bit"):
        cfg = ESDConfig(prompt="cat", train_method="noxattn", base_model=tiny_models["sd1"], iterations=3, lr=1e-3,
                        save_path=str(tmp_path), name=name, optimizer=name, **FAST)
        trainer = ESDTrainer(cfg)
        trainer.setup()
        runs[name] = trainer.train(), trainer
        trainer.save(runs[name][0])
    trainer = runs["adam8bit"][1]
    large = [p for p in trainer.params if p.numel() >= 4096]
    assert large and every(trainer.optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    assert every(trainer.optimizer.state[p]["state1"].dtype == torch.float32 for p in trainer.params
               if p.numel() < 4096)
    a, b = run_weights(runs["adam"][0]), run_weights(runs["adam8bit"][0])
    delta_a = torch.cat([(a[k] - base[k]).flatten() for k in a])
    delta_b = torch.cat([(b[k] - base[k]).flatten() for k in a])
    assert not torch.equal(delta_a, delta_b)  # quantised moments: not Adam bit for bit
    assert torch.nn.functional.cosine_similarity(delta_a, delta_b, dim=0) > 0.95

    full = train(tiny_models["sd1"], tmp_path, "full8", train_method="noxattn", optimizer="adam8bit", iterations=4)
    part = train(tiny_models["sd1"], tmp_path, "part8", train_method="noxattn", optimizer="adam8bit", iterations=4,
                 save_every=2)
    resumed = train(tiny_models["sd1"], tmp_path, "resumed8", train_method="noxattn", optimizer="adam8bit",
                    iterations=4, resume=str(part.output_dir / "checkpoints" / "checkpoint-2.pt"))
    assert same_tensors(run_weights(full), run_weights(resumed))


def weights_of_base(path, keys):
    base = base_unet(path).state_dict()
    return {k: base[k] for k in keys}


def test_load_erased_unet_reads_every_format_strictly(tiny_models, tmp_path):
    r = train(tiny_models["sd1"], tmp_path, "w")
    reference = torch.load(r.output_dir / "diffusers-w.pt")
    from_pt = load_erased_unet(r.output_dir / "diffusers-w.pt", base_model=tiny_models["sd1"]).state_dict()
    from_st = load_erased_unet(r.output_dir / "w.safetensors", base_model=tiny_models["sd1"]).state_dict()
    ldm_path = tmp_path / "compvis.ckpt"
    torch.save({"state_dict": to_ldm(reference)}, ldm_path)
    from_ldm = load_erased_unet(ldm_path, base_model=tiny_models["sd1"]).state_dict()
    for sd in (from_pt, from_st, from_ldm):
        assert same_tensors(sd, reference)
    with pytest.raises(ModelLoadError, match=r"does not fit .*sdxl.*missing keys.*unexpected keys"):
        load_erased_unet(r.output_dir / "diffusers-w.pt", base_model=tiny_models["sdxl"])
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        load_erased_unet(r.output_dir / "w.safetensors", base_model=tiny_models["sdxl"])
    evil = tmp_path / "evil.pt"
    torch.save({"x": object()}, evil)
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_erased_unet(evil, base_model=tiny_models["sd1"])


@pytest.mark.parametrize("args, message", [
    (["--train_method", "attn"], "invalid choice: 'attn'"),
    (["--base_model", "/no/such/model"], "base model folder '/no/such/model' does not exist"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--prompt", ""], "--prompt is empty"),
    (["--image_size", "100"], "--image_size 100 is not a multiple of the VAE factor 8"),
    (["--resume", "/no/such.pt"], "--resume '/no/such.pt' does not exist"),
    (["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--preset", "faithful"], "invalid choice: 'faithful'"),
    (["--name", "../.."], "--name '../..' is not a plain file name"),
    (["--negative_guidance", "nan"], "--negative_guidance must be a finite number, got nan"),
    (["--start_guidance", "inf"], "--start_guidance must be a finite number, got inf"),
    (["--name", "/tmp/elsewhere"], "--name '/tmp/elsewhere' is not a plain file name"),
    (["--name", "a/b"], "--name 'a/b' is not a plain file name"),
    (["--timestep_mode", "original"], "--timestep_mode original pairs a partial trajectory"),
    (["--preset", "paper", "--pool_size", "8"], "--sampler_model trained samples x_t on-policy"),
    (["--preset", "official", "--timestep_mode", "original"], "needs --sampler_scheduler ddim"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_models, tmp_path, capsys):
    defaults = {"--prompt": "cat", "--train_method": "xattn", "--base_model": tiny_models["sd1"],
                "--save_path": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2]):
        defaults[flag] = value
    rc, lines = script_in_process(*[x for kv in defaults.items() for x in kv], "--iterations", 1, capsys=capsys)
    assert rc == 2
    assert len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir())  # nothing written


def test_checkpoints_hold_optimizer_and_rng(tiny_models, tmp_path):
    cfg = ESDConfig(prompt="cat", train_method="xattn", base_model=tiny_models["sd1"], iterations=2, save_every=1,
                    save_path=str(tmp_path), name="ck", **FAST)
    trainer = ESDTrainer(cfg)
    trainer.setup()
    trainer.train()
    state = torch.load(tmp_path / "ck" / "checkpoints" / "checkpoint-1.pt", weights_only=True)
    assert {"iteration", "trained", "optimizer", "generator", "history", "config"} <= set(state)
    assert state["iteration"] == 1 and state["optimizer"]["state"]


def test_single_file_checkpoint_loads_offline_and_trains(tiny_models, tmp_path):
    """An original-format checkpoint (CompVis keys for UNet, VAE and CLIP) through diffusers' single-file
    loading, with --ckpt_config pointing at a local diffusers folder so that nothing is fetched."""
    from diffusers import StableDiffusionPipeline
    from ldm_format import pipeline_to_ldm
    from safetensors.torch import save_file

    from esd.families.models import load_models

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"])
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe).items()}, ckpt)
    models = load_models(ckpt_path=str(ckpt), ckpt_config=tiny_models["sd1"])
    assert same_tensors(models.unet.state_dict(), pipe.unet.state_dict())
    assert same_tensors(models.text_encoders[0].state_dict(), pipe.text_encoder.state_dict())
    r = run_script("--prompt", "cat", "--train_method", "xattn", "--ckpt_path", ckpt, "--ckpt_config",
                tiny_models["sd1"], "--iterations", 2, "--ddim_steps", 4, "--seed", 0, "--save_path", tmp_path,
                "--name", "single")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "single" / "args.json").read_text())["ckpt_path"] == str(ckpt)


def test_default_run_names_stay_inside_save_path_and_long_ones_are_hashed(tiny_models, tmp_path):
    """The default name encodes the prompt: path characters in it become '-', so the run folder is a
    direct child of --save_path; a 200-word prompt gives a name cut to 120 characters ending in a hash
    of the whole, so two long prompts that share a start keep apart."""
    save = tmp_path / "runs"
    result = train(tiny_models["sd1"], save, None, prompt="cat/../../escaped", iterations=1, ddim_steps=2)
    assert result.output_dir.parent == save and [p.name for p in save.iterdir()] == [result.output_dir.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    long_a = ESDConfig(prompt="word " * 199 + "one", train_method="xattn").run_name
    long_b = ESDConfig(prompt="word " * 199 + "two", train_method="xattn").run_name
    assert len(long_a) == len(long_b) == 120 and long_a != long_b and long_a[:100] == long_b[:100]


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tiny_models, tmp_path):
    """--lr 1e12 blows the weights up within a few Adam steps: the run stops with a one-line error at
    the first non-finite loss, or refuses to save non-finite weights, and writes no result."""
    r = run_script("--prompt", "cat", "--train_method", "xattn", "--base_model", tiny_models["sd1"], "--lr", "1e12",
                "--iterations", 4, "--ddim_steps", 2, "--seed", 0, "--save_path", tmp_path, "--name", "run")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "training diverged" in lines[0], r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_resume_compares_settings_not_what_the_run_recorded_beside_them(tiny_models):
    """args.json and checkpoints also record what was loaded ("family": "sd1", trained parameter counts...);
    ESDConfig has a ``family`` property of its own ("unet" for a single file), which is not a setting."""
    cfg = ESDConfig(prompt="cat", train_method="xattn", base_model=tiny_models["sd1"])
    recorded = {**cfg.record(), "family": "sd1", "trained_parameters": 10}
    assert cfg.resume_conflicts(recorded) == []
    assert cfg.resume_conflicts({**recorded, "lr": 1.0}) == [f"--lr {cfg.lr!r} vs 1.0"]
