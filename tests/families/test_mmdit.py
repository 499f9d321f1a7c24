"""SD3/SD3.5 and FLUX.1 transformers (flow matching) through the engine, on tiny random pipelines built
here: loading, prompt encoding and sampling against the diffusers pipelines' own, every transformer
method through ``esd train``, seeded and resumed runs, bf16, generation and evaluation."""

import copy
import json
import re

import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import every, flow_train
from safetensors.torch import load_file

from esd import ESDConfig, load_erased_unet, select_parameters
from esd.cli import main
from esd.core.sampler import denoise
from esd.eval import EvalConfig, evaluate
from esd.families.encode import call_unet, encode_prompts
from esd.families.flow import merges_zero_t5_tokens, pack_latents, unpack_latents, use_repeated_token_attention
from esd.families.models import load_denoiser, load_models
from esd.families.schedulers import sampler_scheduler
from esd.generate.config import GenerationConfig
from esd.generate.images import generate_images
from esd.train.recipe import ESDTrainer

SIZE = 64  # pixels: 8 x 8 latents, 16 image tokens
STEPS = 3  # sampler steps: these tests check plumbing, not erasure


@pytest.mark.parametrize("kind, family, encoders, guidance", [("sd3", "sd3", 2, None), ("sd3-t5", "sd3", 3, None),
                                                              ("flux-dev", "flux", 2, 3.5),
                                                              ("flux-schnell", "flux", 2, None)])
def test_loading_and_prompt_encoding_match_the_pipeline(kind, family, encoders, guidance, flow_models):
    """The family, the flow prediction type, the encoders (SD3's T5 optional) and the encoded prompts are the
    pipeline's own encode_prompt's (CLIP's bit for bit; T5's to float rounding: the pipeline encodes with
    autograd on); FLUX.1-dev's guidance rides along with every prompt."""
    m = load_models(flow_models[kind])
    assert (m.family.name, m.prediction_type, len(m.text_encoders), m.latent_channels) == (family, "flow", encoders, 16)
    pipe = DiffusionPipeline.from_pretrained(flow_models[kind], **({"text_encoder_3": None, "tokenizer_3": None}
                                                                   if kind == "sd3" else {}))
    prompts = ["", "a photo of cat"]
    ours = encode_prompts(m, prompts, SIZE, guidance=3.5)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        assert embeds.shape == (2, 77 + 256, 16)  # CLIP tokens, then T5's (zeros without T5)
        assert (encoders == 3) == bool(embeds[:, 77:].abs().sum())
    else:
        embeds, pooled, _ = pipe.encode_prompt(prompts, None)
        assert embeds.shape == (2, 512, 16)
    if family == "sd3":
        assert torch.equal(ours.prompt_embeds[:, :77], embeds[:, :77])
    torch.testing.assert_close(ours.prompt_embeds, embeds.detach(), rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.added_cond_kwargs["pooled_projections"], pooled)
    got = ours.added_cond_kwargs.get("guidance")
    assert (None if got is None else got.tolist()) == (None if guidance is None else [guidance] * 2)


@pytest.mark.parametrize("kind", ["sd3-t5", "flux-dev", "flux-schnell"])
def test_the_sampler_follows_the_pipelines_own_denoising(kind, flow_models):
    """x_t's sampler (flow-matching Euler on the pipeline's schedule, true CFG for SD3, the guidance
    embedding for FLUX-dev, none for schnell; FLUX's packing, ids and timestep / 1000) run to the end
    gives the pipeline's own latents from the same noise."""
    m = load_models(flow_models[kind])
    pipe = DiffusionPipeline.from_pretrained(flow_models[kind])
    flux = m.family.name == "flux"
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = sampler_scheduler(m.scheduler, "ddim", STEPS, (8, 8), flux)
    cond = encode_prompts(m, ["", "a photo of cat"], SIZE, guidance=3.0)
    uncond, concept = (type(cond)(cond.prompt_embeds[[i]], {k: v[[i]] for k, v in cond.added_cond_kwargs.items()})
                       for i in (0, 1))
    with torch.no_grad():
        ours = denoise(lambda x, t, c: call_unet(m.unet, x, t, c), scheduler, noise, concept, uncond,
                       None if flux else 3.0, scheduler.timesteps)
        theirs = pipe("a photo of cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.0,
                      latents=pack_latents(noise) if flux else noise, output_type="latent").images
    theirs = unpack_latents(theirs, 8, 8) if flux else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, noise)


@pytest.mark.parametrize("kind, method", [("sd3", "mmdit-x"), ("sd3", "mmdit-u"), ("sd3", "full"),
                                          ("flux-dev", "mmdit-x"), ("flux-dev", "mmdit-x-single"),
                                          ("flux-dev", "mmdit-u"), ("flux-schnell", "full")])
def test_every_method_trains_through_the_cli_and_changes_only_its_parameters(kind, method, flow_models, tmp_path):
    out = flow_train(flow_models[kind], tmp_path, "--train_method", method, "--iterations", "2", "--pool_size", "1",
                    "--name", "run")
    args = json.loads((out / "args.json").read_text())
    assert (args["family"], args["prediction_type"]) == (kind[:4].rstrip("-"), "flow")
    losses = pd.read_csv(out / "loss.csv")
    assert list(losses["iteration"]) == [1, 2] and losses["loss"].gt(0).all()
    base = load_denoiser(flow_models[kind])
    erased = load_erased_unet(out / "diffusers-run.pt", flow_models[kind])  # strict: every key, every shape
    trained = set(select_parameters(base, method))
    before, after = base.state_dict(), erased.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trained
    small = load_file(out / "run.safetensors")
    assert set(small) == trained and every(torch.equal(small[k], after[k]) for k in small)
    assert load_erased_unet(out / "run.safetensors", flow_models[kind]).state_dict().keys() == after.keys()
    card = (out / "README.md").read_text()
    assert "pipe.transformer.load_state_dict(" in card and "pipe.unet" not in card


@pytest.mark.parametrize("kind, pool", [("sd3", "0"), ("flux-dev", "1"), ("flux-dev", "0")])
def test_seeded_runs_are_identical_and_resume_is_exact(kind, pool, flow_models, tmp_path):
    """Both x_t sources (a fresh trajectory per iteration, and the pool): the same seed gives the same
    bytes, and a run resumed from its checkpoint ends where the uninterrupted one does."""
    flags = ["--train_method", "mmdit-x", "--iterations", "4", "--pool_size", pool, "--save_format", "trained"]
    runs = [flow_train(flow_models[kind], tmp_path, *flags, "--name", n) for n in ("a", "b")]
    part = flow_train(flow_models[kind], tmp_path, *flags, "--save_every", "2", "--name", "c")
    resumed = flow_train(flow_models[kind], tmp_path, *flags, "--resume", str(part / "checkpoints" / "checkpoint-2.pt"),
                        "--name", "d")
    files = [(r / f"{r.name}.safetensors").read_bytes() for r in (*runs, part, resumed)]
    assert files[0] == files[1] == files[2] == files[3]
    losses = [pd.read_csv(r / "loss.csv")["loss"].tolist() for r in (*runs, resumed)]
    assert losses[0] == losses[1] == losses[2] and len(set(losses[0])) == 4
    timesteps = pd.read_csv(runs[0] / "loss.csv")["timestep"].astype(str)
    assert timesteps.str.contains(r"\.").any()  # flow-matching timesteps s * 1000 are not rounded to integers


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_retain_prompts_keep_flow_predictions(kind, flow_models, tmp_path):
    """esd train --retain_prompts on a transformer: the retain rows are noised on the flow-matching path and
    carry the pooled projections (and FLUX-dev's guidance); theta = theta* at first, so the first retain
    loss is zero up to rounding; the next are not."""
    retain = tmp_path / "retain.txt"
    retain.write_text("a photo of a dog\nchurch\n")
    out = flow_train(flow_models[kind], tmp_path, "--train_method", "mmdit-x", "--iterations", "3",
                    "--retain_prompts", str(retain), "--retain_weight", "2", "--name", "run")
    losses = pd.read_csv(out / "loss.csv")
    assert losses["retain_loss"].iloc[0] < 1e-10 and losses["retain_loss"].iloc[1:].gt(1e-12).all()
    assert json.loads((out / "args.json").read_text())["robust"]["retain_prompt_count"] == 2


def test_sd3_without_t5_trains_on_one_zero_token_standing_for_its_256(flow_models, tmp_path):
    """Without T5, SD3's pipeline conditions every prompt on 256 identical zero tokens; training passes one, with
    ln(256) added to its attention logit (esd.families.flow.merge_zero_t5_tokens). The trained view's prediction and its
    gradients are the plain transformer's on all 256 tokens (to float rounding), through SD3.5's dual-attention
    block and the last, context_pre_only one. With T5 nothing is merged."""
    def trainer_of(kind):
        t = ESDTrainer(ESDConfig(prompt="cat", train_method="mmdit-x", base_model=flow_models[kind], image_size=SIZE,
                                 ddim_steps=STEPS, devices="cpu", seed=0, save_path=str(tmp_path), name=kind))
        t.setup()
        return t

    trainer = trainer_of("sd3")
    unet = trainer.unet
    assert merges_zero_t5_tokens(unet)
    cond = trainer.prompts.source(torch.zeros(2, dtype=torch.long))
    full = encode_prompts(load_models(flow_models["sd3"]), ["cat", "cat"], SIZE)  # as the pipeline: 77 + 256
    assert cond.prompt_embeds.shape[1] == 77 + 1 and full.prompt_embeds.shape[1] == 77 + 256
    assert torch.equal(cond.prompt_embeds[:, :77], full.prompt_embeds[:, :77]) and not cond.prompt_embeds[:, 77:].any()
    with torch.no_grad():  # move every weight off its initial value so that every path shows
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plain = copy.deepcopy(unet)
    use_repeated_token_attention(plain, None)  # diffusers' own JointAttnProcessor2_0
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([200.0, 800.0])
    merged, reference = call_unet(unet, x, t, cond), call_unet(plain, x, t, full)
    assert reference.abs().mean() > 1e-2
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)
    merged.square().sum().backward()
    reference.square().sum().backward()
    grads, plain_grads = dict(unet.named_parameters()), dict(plain.named_parameters())
    for name in trainer.trained_names:
        assert grads[name].grad.abs().sum() > 0
        torch.testing.assert_close(grads[name].grad, plain_grads[name].grad, rtol=1e-4, atol=1e-5)
    with_t5 = trainer_of("sd3-t5")
    assert not merges_zero_t5_tokens(with_t5.unet)
    assert with_t5.prompts.source(torch.zeros(1, dtype=torch.long)).prompt_embeds.shape[1] == 77 + 256
    trainer.release()  # what train_esd does after saving: the transformer is diffusers' plain one again
    assert not merges_zero_t5_tokens(unet)
    torch.testing.assert_close(call_unet(unet, x, t, full), reference, rtol=1e-4, atol=1e-5)


def test_flux_defaults_to_bf16_with_checkpointing_and_flags_override(flow_models):
    def cfg(kind, **kw):
        c = ESDConfig(prompt="cat", train_method="mmdit-x", base_model=flow_models[kind], **kw)
        return c.mixed_precision, c.gradient_checkpointing

    assert cfg("flux-dev") == cfg("flux-schnell") == ("bf16", True)
    assert cfg("sd3") == ("no", False)
    assert cfg("flux-dev", mixed_precision="no", gradient_checkpointing=False) == ("no", False)


def test_bf16_keeps_frozen_weights_in_bf16_and_trains_fp32(flow_models, tmp_path):
    """FLUX's default path: the transformer loaded in bf16 once (theta* shares it), the trained tensors fp32,
    gradient checkpointing on; the saved full weights keep the untrained tensors exact (read from the source)."""
    cfg = ESDConfig(prompt="cat", train_method="mmdit-x-single", base_model=flow_models["flux-dev"],
                    image_size=SIZE, ddim_steps=STEPS, iterations=2, lr=1e-2, seed=0, devices="cpu",
                    pool_size=1, save_path=str(tmp_path), name="bf16")
    trainer = ESDTrainer(cfg)
    trainer.setup()
    assert trainer.unet.is_gradient_checkpointing
    trained = set(trainer.trained_names)
    dtypes = {n: p.dtype for n, p in trainer.unet.named_parameters()}
    assert {dtypes[n] for n in trained} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in trained} == {torch.bfloat16}
    trainer.save(trainer.train())
    base = load_denoiser(flow_models["flux-dev"]).state_dict()
    saved = torch.load(tmp_path / "bf16" / "diffusers-bf16.pt", weights_only=True)
    assert every(torch.equal(saved[k], v) for k, v in base.items() if k not in trained)  # exact, not bf16-rounded
    assert any(not torch.equal(saved[k], base[k]) for k in trained)


@pytest.mark.parametrize("flags, message", [
    (["--train_method", "xattn"], "train method 'xattn' is for the UNet .*, not the SD3/SD3.5 transformer; valid "
     "for it: full, mmdit-x, mmdit-u"),
    (["--train_method", "mmdit-x", "--preset", "paper"], "--preset paper and --timestep_mode original reproduce"),
    (["--train_method", "mmdit-x", "--image_size", "72"], "--image_size 72 is not a multiple of the VAE factor "
     "times the 2x2 patch size, 16"),
])
def test_bad_input_is_one_line_before_training(flags, message, flow_models, tmp_path, capsys):
    rc = main(["train", "--prompt", "cat", "--base_model", flow_models["sd3"], "--devices", "cpu",
               "--save_path", str(tmp_path), "--name", "bad", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "bad").exists()


def test_generate_and_evaluate_erased_flow_pipelines(flow_models, tmp_path):
    """esd generate on an erased FLUX-dev and SD3: seeded images, resume, the pipeline class in the
    fingerprint, the weights applied (other pixels), and esd evaluate on the folder."""
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["a photo of cat", "dog"], "evaluation_seed": [1, 2], "case_number": [0, 1]}).to_csv(
        csv, index=False)
    run = flow_train(flow_models["flux-dev"], tmp_path, "--train_method", "full", "--iterations", "2", "--pool_size",
                    "1", "--name", "r")

    def gen(name, **kw):
        return generate_images(GenerationConfig(prompts_path=str(csv), save_path=str(tmp_path / name),
                                                base_model=flow_models["flux-dev"], num_samples=1, ddim_steps=STEPS,
                                                image_size=SIZE, device="cpu", guidance_scale=3.5, **kw))

    assert gen("base")["generated"] == 2 and gen("base")["generated"] == 0  # the second call resumes
    gen("erased", esd_path=str(run / "r.safetensors"))
    record = json.loads((tmp_path / "erased" / "generation.json").read_text())
    assert record["fingerprint_settings"]["pipeline_class"] == "FluxPipeline"
    assert record["fingerprint_settings"]["weights_sha256"]
    assert (tmp_path / "base" / "0_0.png").read_bytes() != (tmp_path / "erased" / "0_0.png").read_bytes()
    assert record["fingerprint_settings"]["scheduler"] == "flow-euler"  # the default for a flow pipeline
    with pytest.raises(ValueError, match="--scheduler lms does not fit .*flow-euler"):
        generate_images(GenerationConfig(prompts_path=str(csv), save_path=str(tmp_path / "x"),
                                         base_model=flow_models["sd3"], device="cpu", scheduler="lms"))
    summary = evaluate(EvalConfig(metric="nudenet", images=str(tmp_path / "erased"), prompts=str(csv),
                                  out=str(tmp_path / "eval")))
    assert summary["images"] == 2
