"""Faithfulness to the two official codes: the paper loop's (x_t level, query) pairing, the presets,
the official code's method names and SDXL's unconditional prompt."""

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import ROOT, every
from tiny import sd14_unet, sdxl_base_unet

from esd import PRESETS, ESDConfig, select_parameters
from esd.core.methods import TRAIN_METHODS
from esd.core.sampler import Conditioning
from esd.families.encode import encode_erasure_prompts, encode_prompts
from esd.families.models import load_models
from esd.families.registry import FAMILIES, applies
from esd.train.recipe import ESDTrainer

# The paper's original code (CompVis train-esd.py and its DDIM sampler), T = 50, for stopping step k:
# (timesteps its sampler evaluates, the noise level x_t ends at (0: fully denoised), [low, high) of the query).
ORIGINAL_PAIRS = {
    0: (list(range(961, 0, -20)), 0, (0, 20)),
    1: (list(range(961, 0, -20)), 0, (20, 40)),
    2: (list(range(961, 20, -20)), 1, (40, 60)),
    25: (list(range(961, 480, -20)), 461, (500, 520)),
    49: ([961], 941, (980, 1000)),
}


def trainer_for(tiny_models, tmp_path, family="sd1", **kw):
    settings = {"prompt": "cat", "train_method": "xattn", "base_model": tiny_models[family], "seed": 0,
                "iterations": 10, "save_path": str(tmp_path), **kw}
    trainer = ESDTrainer(ESDConfig(**settings))
    trainer.setup()
    return trainer


def record_unet_calls(trainer):
    """Every UNet forward as (view, timesteps, latents); the frozen view must be a separate module."""
    calls = []
    frozen = trainer.views.frozen_unet.module
    assert frozen is not trainer.unet
    for module, view in [(trainer.unet, "trained"), (frozen, "frozen")]:
        def hook(_, args, kwargs, view=view):
            calls.append((view, [int(t) for t in args[1]], args[0].detach().clone()))

        module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def step_at(trainer, monkeypatch, k):
    """One training iteration with the stopping step forced to k."""
    monkeypatch.setattr(trainer.source, "next_batch",
                        functools.partial(type(trainer.source).next_batch, trainer.source, stop_index=k))
    return trainer.step()


def test_paper_preset_calls_the_unet_at_the_original_codes_pairs(tiny_models, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_models, tmp_path, preset="paper")
    calls = record_unet_calls(trainer)
    for k, (sampler_steps, level, (low, high)) in ORIGINAL_PAIRS.items():
        calls.clear()
        record = step_at(trainer, monkeypatch, k)
        *sampling, (view_f, query_f, _), (view_t, query_t, _) = calls
        # The sampler is the model being trained, with classifier-free guidance (2 rows per call).
        assert every(view == "trained" and len(set(ts)) == 1 and len(ts) == 2 for view, ts, _ in sampling)
        assert [ts[0] for _, ts, _ in sampling] == sampler_steps, k
        # Then theta* (e0, ep: 2 rows) and theta (1 row) at one DDPM query in the k-th bin.
        assert (view_f, view_t) == ("frozen", "trained")
        q = query_t[0]
        assert query_f == [q, q] and low <= q < high, (k, q)
        assert (record["ddim_index"], record["xt_level"], record["timestep"]) == (str(k), str(level), str(q))


def test_matched_mode_queries_x_t_at_its_own_timestep(tiny_models, tmp_path, monkeypatch):
    """The official preset (fresh x_t from the frozen sampler): k steps from 981, query at the next."""
    trainer = trainer_for(tiny_models, tmp_path, preset="official", frozen_copy=True)
    calls = record_unet_calls(trainer)
    for k in (0, 1, 25, 49):
        calls.clear()
        record = step_at(trainer, monkeypatch, k)
        *sampling, (view_f, query_f, _), (view_t, query_t, _) = calls
        assert [ts[0] for view, ts, _ in sampling if view == "frozen"] == list(range(981, 981 - 20 * k, -20))
        assert len(sampling) == k and query_t == [981 - 20 * k] and query_f == query_t * 2
        assert record["xt_level"] == record["timestep"] == str(981 - 20 * k)


def test_pool_queries_each_stored_x_t_at_the_timestep_it_was_sampled_at(tiny_models, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_models, tmp_path, preset="fast", frozen_copy=True, pool_size=2, batch_size=4)
    calls = record_unet_calls(trainer)
    trainer.source.refresh()
    seen = {ts[0]: latents[:2] for view, ts, latents in calls if view == "frozen"}  # x at t, per trajectory
    assert sorted(seen, reverse=True) == list(range(981, 0, -20))
    for _ in range(3):
        batch = trainer.source.next_batch()
        assert torch.equal(batch.timesteps, batch.xt_level)
        for latents, t in zip(batch.latents, batch.timesteps):
            assert any(torch.equal(latents, x) for x in seen[int(t)])


def test_presets_hold_the_official_codes_settings_and_flags_override_them():
    paper, official = ESDConfig("cat", "xattn", preset="paper"), ESDConfig("cat", "xattn", preset="official")
    assert (paper.sampler_model, paper.sampler_scheduler, paper.timestep_mode, paper.pool_size, paper.frozen_copy,
            paper.ddim_steps, paper.start_guidance, paper.negative_guidance, paper.lr, paper.iterations) == \
        ("trained", "ddim", "original", 0, True, 50, 3.0, 1.0, 1e-5, 1000)
    assert (official.sampler_model, official.sampler_scheduler, official.timestep_mode, official.pool_size,
            official.lr, official.iterations, official.negative_guidance) == \
        ("frozen", "model", "matched", 0, 5e-5, 200, 1.0)
    fast = ESDConfig("cat", "xattn")
    assert fast.preset == "fast" and fast.pool_size == 8 and fast.preset_overrides == []
    mixed = ESDConfig("cat", "xattn", preset="paper", lr=1e-3, iterations=5)
    assert (mixed.lr, mixed.iterations, mixed.sampler_model) == (1e-3, 5, "trained")
    assert mixed.preset_overrides == ["lr", "iterations"]
    assert set(PRESETS) == {"paper", "official", "fast"}


def test_cli_paper_preset_records_its_pairs_and_resolved_settings(tiny_models, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train-scripts/train-esd.py"), "--prompt", "cat",
                        "--train_method", "xattn", "--base_model", tiny_models["sd1"], "--preset", "paper",
                        "--iterations", "4", "--seed", "3", "--save_path", str(tmp_path),
                        "--name", "paper", "--save_format", "trained"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    args = json.loads((tmp_path / "paper" / "args.json").read_text())
    assert args["preset"] == "paper" and args["preset_overrides"] == ["iterations"]
    assert (args["sampler_model"], args["timestep_mode"], args["lr"], args["iterations"]) == \
        ("trained", "original", 1e-5, 4)
    losses = pd.read_csv(tmp_path / "paper" / "loss.csv")
    assert len(losses) == 4
    for k, level, q in zip(losses["ddim_index"], losses["xt_level"], losses["timestep"]):
        assert level == (20 * k - 39 if k >= 2 else 0)
        assert 20 * k <= q < 20 * k + 20


def pndm_copy(folder, dest, cls="PNDMScheduler", **extra):
    shutil.copytree(folder, dest)
    path = Path(dest) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(_class_name=cls, **extra)
    path.write_text(json.dumps(config))
    return str(dest)


def test_official_preset_samples_with_the_models_own_scheduler(tiny_models, tmp_path, monkeypatch):
    """A model shipped with PNDM (as SD1.4): the official preset samples x_t with PNDM, --sampler_scheduler
    ddim with DDIM, from the same noise; sigma-space schedulers (Euler) are refused with the flag to use."""
    folder = pndm_copy(tiny_models["sd1"], tmp_path / "pndm", skip_prk_steps=True)
    models = {"sd1": folder}
    latents = {}
    for kind in ("model", "ddim"):
        trainer = trainer_for(models, tmp_path, preset="official", sampler_scheduler=kind)
        assert type(trainer.source.scheduler).__name__ == ("PNDMScheduler" if kind == "model" else "DDIMScheduler")
        latents[kind] = trainer.source.next_batch(stop_index=10).latents
    assert not torch.allclose(latents["model"], latents["ddim"])
    euler = pndm_copy(tiny_models["sd1"], tmp_path / "euler", cls="EulerDiscreteScheduler")
    with pytest.raises(ValueError, match="sigma-scaled.*--sampler_scheduler ddim"):
        trainer_for({"sd1": euler}, tmp_path, preset="official")


def test_official_method_names_select_the_official_codes_parameters():
    """On the SD v1.4 UNet config: the official esd-u / esd-all (Linear and Conv2d layers only) and the
    paper code's methods, pinned."""
    unet = sd14_unet()
    params = dict(unet.named_parameters())
    counts = {m: (len(names), sum(params[n].numel() for n in names))
              for m, method in TRAIN_METHODS.items() if applies(method, FAMILIES["sd1"])
              for names in [select_parameters(unet, m)]}
    assert counts == {
        "xattn": (80, 43_962_560), "noxattn": (598, 813_495_680), "selfattn": (80, 49_574_080),
        "full": (686, 859_520_964), "notime": (678, 857_458_240), "xlayer": (10, 3_605_760),
        "selflayer": (10, 8_193_920), "xattn-strict": (32, 19_169_280),
        "esd-u": (388, 815_358_084), "esd-all": (468, 859_320_644),
    }
    esd_u = set(select_parameters(unet, "esd-u"))
    assert {"time_embedding.linear_1.weight", "conv_out.weight", "conv_in.weight"} <= esd_u
    assert not any("norm" in n or ".attn2." in n for n in esd_u)
    assert select_parameters(unet, "esd-x") == select_parameters(unet, "xattn")


def test_official_method_names_select_esd_sdxl_py_parameters_on_the_sdxl_unet():
    """On the SDXL base 1.0 UNet config: esd-u and esd-all select what esd_sdxl.py selects (Linear/Conv2d
    modules whose name holds 'block' and not 'emb', esd-u also not 'attn2'), so no time or added embedding,
    conv_in, conv_out or resnet time_emb_proj; esd-x is xattn; the paper code's noxattn and full keep their
    rule (they never ran on SDXL). Counts pinned."""
    unet = sdxl_base_unet()
    params = dict(unet.named_parameters())

    def count(names):
        return len(names), sum(params[n].numel() for n in names)

    counts = {m: count(select_parameters(unet, m)) for m in ("esd-u", "esd-all", "esd-x", "esd-x-strict",
                                                                 "noxattn", "full")}
    assert counts == {"esd-u": (772, 1_996_259_200), "esd-all": (1_122, 2_541_929_600),
                      "esd-x": (350, 545_670_400), "esd-x-strict": (140, 340_787_200),
                      "noxattn": (1_318, 2_014_485_120), "full": (1_680, 2_567_463_684)}
    # esd_sdxl.py's rule, written here on module names as it is written there
    official = {m: [f"{name}.{p}" for name, module in unet.named_modules()
                    if type(module).__name__ in ("Linear", "Conv2d") and "emb" not in name and "block" in name
                    and (m == "esd-all" or "attn2" not in name)
                    for p, _ in module.named_parameters(recurse=False)] for m in ("esd-u", "esd-all")}
    for m, names in official.items():
        assert sorted(select_parameters(unet, m)) == sorted(names), m
    esd_all = set(select_parameters(unet, "esd-all"))
    dropped = {n for n in params if n.startswith(("time_embedding.", "add_embedding.", "conv_in.", "conv_out."))
               or ".time_emb_proj." in n}
    assert not esd_all & dropped and sum(params[n].numel() for n in dropped) == 24_945_924
    assert select_parameters(unet, "esd-x") == select_parameters(unet, "xattn")


def test_sdxl_uncond_empty_encodes_the_empty_prompt_and_zeros_zeroes_it(tiny_models, tmp_path):
    """Hand computation: diffusers' own SDXL encode_prompt with negative_prompt="" (what the official
    esd_sdxl.py passes) and with no negative prompt (force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
    models = load_models(tiny_models["sdxl"])
    ours = {kind: encode_erasure_prompts(models, ["cat"], None, 128, kind) for kind in ("empty", "zeros")}
    for kind, negative in [("empty", ""), ("zeros", None)]:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt("cat", device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True,
                                                             negative_prompt=negative)
        uncond, concept = ours[kind].uncond, ours[kind].concepts
        assert torch.allclose(uncond.prompt_embeds, neg, atol=1e-6)
        assert torch.allclose(uncond.added_cond_kwargs["text_embeds"], neg_pooled, atol=1e-6)
        assert torch.allclose(concept.prompt_embeds, embeds, atol=1e-6)
        assert torch.allclose(concept.added_cond_kwargs["text_embeds"], pooled, atol=1e-6)
    assert not torch.count_nonzero(ours["zeros"].uncond.prompt_embeds)
    assert torch.count_nonzero(ours["empty"].uncond.prompt_embeds)
    weights = {}
    for kind in ("empty", "zeros"):
        trainer = trainer_for(tiny_models, tmp_path, family="sdxl", sdxl_uncond=kind, lr=1e-3, ddim_steps=6)
        trainer.step()
        weights[kind] = trainer.trained_state()
    assert any(not torch.equal(weights["empty"][k], weights["zeros"][k]) for k in weights["empty"])


def test_official_preset_on_sdxl_takes_esd_sdxl_py_settings_and_flags_override_them(tiny_models):
    """esd_sdxl.py's argparse: guidance 2, negative guidance 1 (its eta_off: our 0), lr 2e-4, 200 iterations,
    50 steps; lr 1e-5 for every method but esd-x and esd-x-strict; x_t from zeros, e0 from "". An explicit
    flag wins; the other presets, and SD 1.x's official, are unchanged."""
    from esd.cli import build_parser, config_from_args
    from esd.train.presets import preset_values

    sdxl = tiny_models["sdxl"]
    x = ESDConfig("cat", "esd-x", preset="official", base_model=sdxl)
    assert x.family.name == "sdxl" and x.preset_overrides == []
    assert (x.start_guidance, x.negative_guidance, x.lr, x.iterations, x.ddim_steps, x.sdxl_uncond) == \
        (2.0, 0.0, 2e-4, 200, 50, "official")
    assert (x.sampler_model, x.sampler_scheduler, x.timestep_mode, x.pool_size, x.frozen_copy) == \
        ("frozen", "model", "matched", 0, False)
    lrs = {m: ESDConfig("cat", m, preset="official", base_model=sdxl).lr
           for m in ("esd-x", "xattn", "esd-x-strict", "xattn-strict", "esd-u", "esd-all", "noxattn", "full")}
    assert lrs == {"esd-x": 2e-4, "xattn": 2e-4, "esd-x-strict": 2e-4, "xattn-strict": 2e-4, "esd-u": 1e-5,
                   "esd-all": 1e-5, "noxattn": 1e-5, "full": 1e-5}
    mixed = ESDConfig("cat", "esd-u", preset="official", base_model=sdxl, lr=1e-3, negative_guidance=1.0,
                      sdxl_uncond="empty")
    assert (mixed.lr, mixed.negative_guidance, mixed.sdxl_uncond, mixed.start_guidance) == (1e-3, 1.0, "empty", 2.0)
    assert mixed.preset_overrides == ["negative_guidance", "lr", "sdxl_uncond"]
    args = build_parser().parse_args(["train", "--prompt", "cat", "--train_method", "esd-x", "--base_model", sdxl,
                                      "--preset", "official", "--start_guidance", "7"])
    cli = config_from_args(args)
    assert (cli.start_guidance, cli.lr, cli.sdxl_uncond, cli.preset_overrides) == (7.0, 2e-4, "official",
                                                                                   ["start_guidance"])
    for preset in ("paper", "fast"):
        c = ESDConfig("cat", "esd-u", preset=preset, base_model=sdxl)
        assert {f: getattr(c, f) for f in PRESETS[preset]} == PRESETS[preset] == \
            preset_values(preset, FAMILIES["sdxl"], "esd-u")
    sd1 = ESDConfig("cat", "esd-x", preset="official", base_model=tiny_models["sd1"])
    assert sd1.family.name == "sd1" and {f: getattr(sd1, f) for f in PRESETS["official"]} == PRESETS["official"]
    # A model whose family the settings cannot read yet (a hub id not in the cache) is settled once loaded.
    late = ESDConfig("cat", "esd-u", preset="official", base_model="someone/not-cached-xl", lr=1e-3)
    assert late.family is None and late.start_guidance == 3.0
    assert late.resolve_for(FAMILIES["sdxl"]) and not late.resolve_for(FAMILIES["sdxl"])
    assert (late.start_guidance, late.negative_guidance, late.lr, late.sdxl_uncond) == (2.0, 0.0, 1e-3, "official")


def test_trainer_settles_the_preset_on_the_models_it_is_given(tiny_models, tmp_path):
    cfg = ESDConfig("cat", "esd-x", preset="official", base_model="someone/not-cached-xl", save_path=str(tmp_path))
    trainer = ESDTrainer(cfg, load_models(tiny_models["sdxl"]))
    assert (cfg.start_guidance, cfg.negative_guidance, cfg.lr, cfg.sdxl_uncond) == (2.0, 0.0, 2e-4, "official")
    assert "-sg_2.0-ng_0.0-" in trainer.output_dir.name


def record_conditionings(module):
    """Every forward of ``module`` as (encoder_hidden_states, added_cond_kwargs, output)."""
    calls = []

    def hook(_, args, kwargs, output):
        calls.append((kwargs["encoder_hidden_states"].detach().clone(),
                      {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}, output.sample.detach()))

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


def assert_rows(hidden, extra, cond: Conditioning, row: int):
    """Rows ``row`` of ``cond`` (one encoded prompt) are what the UNet got, at every row of ``hidden``."""
    assert torch.allclose(hidden, cond.prompt_embeds[row].expand_as(hidden), atol=1e-6)
    for k in ("text_embeds", "time_ids"):
        assert torch.allclose(extra[k], cond.added_cond_kwargs[k][row].expand_as(extra[k]), atol=1e-6), k


def test_sdxl_uncond_official_samples_x_t_with_zeros_and_builds_e0_from_the_encoded_empty_prompt(
        tiny_models, tmp_path, monkeypatch):
    """esd_sdxl.py's mix, on the tensors the UNet is called with: the sampler's unconditional rows are zero
    hidden states and zero pooled embeddings (the time ids kept), e0's rows the encoded "" (not zero); the
    concept rows are the encoded prompt in both. The fresh-trajectory loop and the pool alike."""
    encoded = encode_prompts(load_models(tiny_models["sdxl"]), ["", "cat"], 128)
    assert torch.count_nonzero(encoded.prompt_embeds[0]) and torch.count_nonzero(encoded.added_cond_kwargs[
        "text_embeds"][0])
    zeros = Conditioning(torch.zeros_like(encoded.prompt_embeds), {
        "text_embeds": torch.zeros_like(encoded.added_cond_kwargs["text_embeds"]),
        "time_ids": encoded.added_cond_kwargs["time_ids"]})

    trainer = trainer_for(tiny_models, tmp_path, family="sdxl", preset="official", frozen_copy=True, ddim_steps=6)
    assert trainer.config.sdxl_uncond == "official"
    calls = record_conditionings(trainer.views.frozen_unet.module)
    step_at(trainer, monkeypatch, 3)
    *sampling, (hidden, extra, _) = calls
    assert len(sampling) == 3
    for h, e, _ in sampling:  # guided sampler: [uncond, prompt]
        assert_rows(h[:1], {k: v[:1] for k, v in e.items()}, zeros, 0)
        assert_rows(h[1:], {k: v[1:] for k, v in e.items()}, encoded, 1)
    assert_rows(hidden[:1], {k: v[:1] for k, v in extra.items()}, encoded, 0)  # e0: the encoded ""
    assert_rows(hidden[1:], {k: v[1:] for k, v in extra.items()}, encoded, 1)  # ep

    # The pool: at every step theta*'s e0 and ep (one call), then the sampler's zero-uncond prediction, and the
    # next x_t is the guided step from that one.
    pool = trainer_for(tiny_models, tmp_path, family="sdxl", preset="fast", sdxl_uncond="official", frozen_copy=True,
                       ddim_steps=3, pool_size=1)
    calls = record_conditionings(pool.views.frozen_unet.module)
    pool.source.refresh()
    scheduler, latents = pool.source.scheduler, pool.source.pool["latents"]
    assert len(calls) == 2 * len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        (h, e, pred), (hz, ez, pred_zero) = calls[2 * i:2 * i + 2]
        assert_rows(h[:1], {k: v[:1] for k, v in e.items()}, encoded, 0)
        assert_rows(hz, ez, zeros, 0)
        if i + 1 < len(latents):
            guided = pred_zero.float() + 3.0 * (pred[1:].float() - pred_zero.float())
            step = scheduler.step(guided, t, latents[i:i + 1]).prev_sample
            assert torch.allclose(latents[i + 1:i + 2], step, atol=1e-5)


def test_official_preset_on_a_model_whose_scheduler_is_euler_is_refused_before_loading(tiny_models, tmp_path,
                                                                                       monkeypatch, capsys):
    """SDXL base 1.0 ships EulerDiscreteScheduler: --sampler_scheduler model (--preset official) would sample
    sigma-scaled latents. Refused from the scheduler config, before any weights load; --sampler_scheduler
    ddim is accepted."""
    from esd.cli import main
    from esd.train import recipe as train_module

    euler = tmp_path / "sdxl-euler"
    shutil.copytree(tiny_models["sdxl"], euler)
    config = euler / "scheduler" / "scheduler_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "_class_name": "EulerDiscreteScheduler"}))
    monkeypatch.setattr(train_module, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["train", "--prompt", "cat", "--train_method", "esd-x", "--base_model", str(euler), "--preset", "official",
            "--save_path", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EulerDiscreteScheduler samples sigma-scaled latents" in err
    assert "use --sampler_scheduler ddim" in err and not (tmp_path / "runs").exists()
    late_check = ESDConfig("cat", "esd-x", preset="official", base_model=str(euler), sampler_scheduler="ddim")
    assert late_check.family.name == "sdxl"
