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
from tiny import sd14_unet

from esd import PRESETS, ESDConfig, select_parameters
from esd.methods import TRAIN_METHODS
from esd.models import load_models
from esd.sampling import encode_erasure_prompts
from esd.train import ESDTrainer

ROOT = Path(__file__).resolve().parents[1]

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
        assert all(view == "trained" and len(set(ts)) == 1 and len(ts) == 2 for view, ts, _ in sampling)
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
              for m, method in TRAIN_METHODS.items() if "unet" in method.families
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
