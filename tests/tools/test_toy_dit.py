"""The flow-matching toy model's recipe (esd/toy/dit.py): what it trains on is what the SD3 pipeline
feeds the model at inference, and a tiny rebuild gives a pipeline that loads and draws."""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from esd.families.flow import SD3_T5_TOKENS, use_repeated_token_attention
from esd.families.sources import ModelLoadError, resolve_source
from esd.toy.card import write_model_card
from esd.toy.dit import (
    DitRecipeConfig,
    build_dit_components,
    encode_captions,
    load_toy_vae,
    toy_dit_train,
)
from esd.toy.quality import judge_accuracy, load_toy_pipeline, quality_table, sample

TINY = dict(heads=2, head_dim=8, layers=2, text_width=16, n_images=48, steps=2, batch=8)


@pytest.fixture(scope="module")
def parts():
    cfg = DitRecipeConfig(**TINY)
    vae = load_toy_vae()
    tokenizers, encoders, transformer, scheduler = build_dit_components(cfg, vae)
    with torch.no_grad():  # SD3 starts its output layer near zero; move every weight so the check sees them all
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return cfg, vae, tokenizers, encoders, transformer, scheduler


def test_training_conditioning_is_what_the_pipeline_feeds_the_model(parts):
    cfg, vae, tokenizers, encoders, transformer, scheduler = parts
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0],
                                    tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=None, tokenizer_3=None)
    texts = ["a red circle", "", "a photo of a blue square"]
    seq, pooled = encode_captions(tokenizers, encoders, texts)
    for i, text in enumerate(texts):
        embeds, _, pipe_pooled, _ = pipe.encode_prompt(text, None, None, do_classifier_free_guidance=False)
        n = cfg.caption_tokens
        assert embeds.shape[1] == n + SD3_T5_TOKENS
        torch.testing.assert_close(seq[i, :n], embeds[0, :n])
        assert not embeds[0, n:].any() and not seq[i, n:].any()  # the T5 slot: zeros, one of them in training
        torch.testing.assert_close(pooled[i], pipe_pooled[0])


def test_one_token_with_log_copies_is_attention_over_all_copies(parts):
    _, _, tokenizers, encoders, transformer, _ = parts
    seq, pooled = encode_captions(tokenizers, encoders, ["a red circle", "green", ""])
    full = torch.cat([seq[:, :-1], seq.new_zeros(3, SD3_T5_TOKENS, seq.shape[2])], 1)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50.0, 500.0, 950.0])
    with torch.no_grad():
        use_repeated_token_attention(transformer, None)
        reference = transformer(x, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        use_repeated_token_attention(transformer, SD3_T5_TOKENS)
        short = transformer(x, encoder_hidden_states=seq, pooled_projections=pooled, timestep=t).sample
        use_repeated_token_attention(transformer, 1)  # without the ln(256): a different model
        wrong = transformer(x, encoder_hidden_states=seq, pooled_projections=pooled, timestep=t).sample
    use_repeated_token_attention(transformer, None)
    assert reference.abs().mean() > 0.1
    torch.testing.assert_close(short, reference, atol=2e-5, rtol=1e-4)
    assert (wrong - reference).abs().max() > 1e-2


def test_tiny_rebuild_loads_as_an_sd3_pipeline_and_draws(tmp_path):
    out = toy_dit_train(tmp_path / "dit", DitRecipeConfig(**TINY), log=lambda m: None)
    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"]["steps"] == 2 and record["environment"]["torch"]
    plain = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert not any(type(b.attn.processor).__name__ == "RepeatedTokenAttention"  # the saved model is diffusers'
                   for b in plain.transformer.transformer_blocks)
    pipe = load_toy_pipeline(str(out))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    images = sample(pipe, "a red circle", 2, seed=0, steps=2)  # one zero token standing for 256
    assert images.shape == (2, 32, 32, 3)
    reference = plain(["a red circle"] * 2, num_inference_steps=2, guidance_scale=7.5, output_type="np",
                      generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert images.std() > 0.01
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(reference), atol=1e-4, rtol=0)
    evaluation = {"judge_clean": judge_accuracy(n_per_scene=1), "judge_vae": judge_accuracy(1, vae=pipe.vae),
                  "quality": quality_table(pipe, n=1)}
    card = write_model_card(out, evaluation).read_text()
    assert "StableDiffusion3Pipeline" in card and "esd toy-train-dit --out DIR" in card
    assert "25 flow-matching Euler steps" in card and "| a photo of a red circle |" in card


def test_toy_dit_name_resolves_or_says_how_to_build_it(monkeypatch, tmp_path):
    import esd.families.sources as sources

    monkeypatch.setitem(sources.TOY_MODELS, "toy-dit", (tmp_path / "absent", "esd toy-train-dit"))
    with pytest.raises(ModelLoadError, match="toy-dit model is not built .*esd toy-train-dit"):
        resolve_source("toy-dit")


def test_demo_erases_with_the_mmdit_analogue_of_esd_x_on_a_flow_matching_toy(tmp_path):
    from esd.toy.demo import DemoConfig, run_demo

    model = toy_dit_train(tmp_path / "dit", DitRecipeConfig(**TINY), log=lambda m: None)
    report = run_demo(DemoConfig(concept="red", out=str(tmp_path / "demo"), base_model=str(model), iterations=2,
                                 batch_size=2, samples=2, retain_weight=10.0), log=lambda m: None)
    assert report["erasure"]["train_method"] == "mmdit-x" and report["erasure"]["family"] == "sd3"
    assert set(report["erased"]) >= {"red", "a red circle"} and report["samples_per_prompt"] == 2
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "(mmdit-x)" in md and "retain weight 10.0" in md
    # --retain_weight: the other colours' phrasings that the demo does not measure, kept as theta* draws them
    retain = (tmp_path / "demo" / "retain_prompts.txt").read_text().splitlines()
    assert report["erasure"]["retain_weight"] == 10.0 and report["erasure"]["robust"]["retain_prompt_count"] == 27
    assert "blue circle" in retain and not any("red" in p for p in retain)
    assert not set(retain) & (set(report["erased"]) | set(report["others"]))
