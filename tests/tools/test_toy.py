"""The toy world: the shipped model loads and generates, the judge is accurate, ESD-x
erases a colour, the recipe runs end to end."""

import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import ROOT, every

from esd.families.models import load_models
from esd.families.sources import TOY_MODEL_DIR
from esd.toy.demo import DemoConfig, run_demo
from esd.toy.judge import NONE, judge
from esd.toy.quality import judge_accuracy, load_toy_pipeline, sample, score, unconditional_shares
from esd.toy.recipe import RecipeConfig, toy_train
from esd.toy.world import (
    COLOURS,
    HELD_OUT_TEMPLATES,
    SHAPES,
    TRAINED_TEMPLATES,
    all_phrasings,
    all_scenes,
    balanced_weights,
    captions,
    make_dataset,
    render,
    training_scenes,
)


def test_judge_is_exact_on_clean_renders_of_every_combination():
    acc = judge_accuracy(n_per_scene=40, seed=7)
    assert acc["n"] == 40 * 12 and acc["colour"] == 1.0 and acc["shape"] == 1.0


def test_judge_reports_no_object():
    blank = np.full((32, 32, 3), 40, np.uint8)
    assert judge(blank).shape == NONE and judge(blank).colour == NONE


def test_shipped_model_loads_offline_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)  # the plain diffusers path
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and pipe.unet.config.cross_attention_dim == 64
    models = load_models("toy")
    assert models.family.name == "sd1" and models.native_resolution == 32
    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 15 * 2**20
    images = sample(load_toy_pipeline(), "a red circle", 40, seed=0)
    assert images.shape == (40, 32, 32, 3)
    s = score(images, "red", "circle")
    assert s["colour"] >= 0.9 and s["shape"] >= 0.7  # the full quality table is in the model card


def test_toy_text_encoder_gives_each_colour_its_own_direction():
    """The erasure test's premise: "a red circle" and "a yellow circle" differ at the colour token. With
    CLIP's default init (token embeddings std 0.02) this random encoder put them at cosine 0.90-0.95."""
    pipe = load_toy_pipeline("toy")
    ids = pipe.tokenizer([f"a {c} circle" for c in COLOURS], padding="max_length", return_tensors="pt").input_ids
    assert [pipe.tokenizer.decode(i) for i in ids[:, 2]] == list(COLOURS)  # BOS, "a", the colour
    with torch.no_grad():
        h = torch.nn.functional.normalize(pipe.text_encoder(ids)[0][:, 2], dim=-1)
    cosine = h @ h.T
    assert cosine[~torch.eye(len(COLOURS), dtype=torch.bool)].max() < 0.5


def test_a_word_embeds_alike_wherever_it_stands():
    """Why the frozen random encoder is kept: a colour or shape word's hidden state is nearly the same
    alone and inside any caption (as CLIP keeps "Van Gogh" close in "a painting by Van Gogh"), so what
    the UNet learns for a word, and what ESD erases for it, holds in every phrasing."""
    pipe = load_toy_pipeline("toy")

    def state(text, word):
        ids = pipe.tokenizer(text, padding="max_length", return_tensors="pt").input_ids
        position = [pipe.tokenizer.decode(i) for i in ids[0]].index(word)
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0, position]

    for word, texts in [("red", ["a red shape", "red circle", "a circle, red", "a photo of a red circle"]),
                        ("circle", ["a circle", "red circle", "a photo of a blue circle", "a circle, red"])]:
        alone = state(word, word)
        for text in texts:
            assert torch.nn.functional.cosine_similarity(alone, state(text, word), dim=0) > 0.9, text


def test_captions_name_each_word_alone_and_in_several_orders():
    phrasings = all_phrasings()
    assert len(phrasings) == len({p.text for p in phrasings})
    texts = {p.text for p in phrasings}
    assert {"red", "a circle", "red circle", "a red circle", "a circle, red", "a photo of a red circle"} <= texts
    assert every(p.held_out for p in phrasings if any(p.text == t.format(colour=p.colour, shape=p.shape)
                                                    for t in HELD_OUT_TEMPLATES))
    scene = all_scenes()[0]
    assert captions(scene) == [t.format(colour=scene.colour, shape=scene.shape) for t in TRAINED_TEMPLATES]


def test_balanced_data_draws_every_colour_and_every_shape_equally_often():
    scenes = training_scenes()
    weights = balanced_weights(scenes)
    total = sum(weights)
    for axis, values in (("colour", COLOURS), ("shape", SHAPES)):
        for value in values:
            share = sum(w for s, w in zip(scenes, weights) if getattr(s, axis) == value) / total
            assert share == pytest.approx(1 / len(values), abs=1e-9), (axis, value)
    _, _, plain = make_dataset(3000, seed=1)  # the shipped recipe: scenes drawn uniformly
    _, _, balanced = make_dataset(3000, seed=1, balanced=True)
    assert sum(s.colour == "red" for s in plain) / 3000 == pytest.approx(0.3, abs=0.03)
    assert sum(s.colour == "red" for s in balanced) / 3000 == pytest.approx(0.25, abs=0.03)
    assert every((s.colour, s.shape) in {(t.colour, t.shape) for t in scenes} for s in balanced)  # none held out


def test_unconditional_shares_count_every_image_once():
    shares = unconditional_shares(load_toy_pipeline(), n=16)
    assert shares["n"] == 16 and shares["guidance"] == 1.0
    for axis in ("colour", "shape"):
        assert sum(shares[axis].values()) == pytest.approx(1.0)
        assert set(shares[axis]) <= {*COLOURS, *SHAPES, NONE}


def test_judge_survives_the_vae_round_trip():
    vae = load_toy_pipeline().vae
    acc = judge_accuracy(n_per_scene=20, seed=8, vae=vae)
    assert acc["colour"] >= 0.99 and acc["shape"] >= 0.98


def test_esd_x_erases_green_from_every_phrasing_with_the_papers_settings(tmp_path):
    """The demo's defaults: the bare word "green" erased with ESD-x at the paper's eta 1 (1000 iterations).
    30 images per prompt, the same seeds before and after. Erased: the 18 phrasings that name green (trained
    and held-out templates, the held-out green triangle), 540 images: their mean presence must fall to
    <= 5% (measured: 0.1% at 100 images per prompt), and no phrasing may keep more than 15%. Others:
    "a {colour} {shape}" of the other colours and the other colour words alone, each within 10 points
    (paired by seed)."""
    report = run_demo(DemoConfig(concept="green", out=str(tmp_path), samples=30))
    erased = report["erased"].values()
    assert len(erased) == 18 and min(v["presence_before"] for v in erased) >= 0.9
    assert np.mean([v["presence_after"] for v in erased]) <= 0.05
    assert max(v["presence_after"] for v in erased) <= 0.15
    for prompt, v in report["others"].items():
        assert v["accuracy_after"] >= v["accuracy_before"] - 0.10, prompt
    assert {p.name for p in tmp_path.iterdir()} >= {"report.json", "report.md", "erased_before.png",
                                                    "erased_after.png", "others_before.png", "others_after.png"}


def test_recipe_runs_a_few_steps_end_to_end(tmp_path):
    torch.manual_seed(0)
    out = toy_train(tmp_path / "toy", RecipeConfig(n_images=256, vae_steps=3, vae_batch=16, unet_steps=3,
                                                   unet_batch=16), log=lambda *_: None)
    pipe = load_toy_pipeline(str(out))
    images = sample(pipe, "a blue square", 2, seed=0, steps=2)
    assert images.shape == (2, 32, 32, 3) and (out / "recipe.json").exists()


@pytest.mark.parametrize("scene", all_scenes()[:3])
def test_renders_are_32px_rgb(scene):
    img = render(scene, random.Random(0))
    assert img.size == (32, 32) and img.mode == "RGB"


def test_inference_notebook_runs_on_the_toy_model(tmp_path, monkeypatch):
    """Executes the notebook's code cells in order (as a kernel would) on the toy model."""
    import json

    nb = json.loads((ROOT / "notebooks" / "esd-inference.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "esd-inference.ipynb", "exec"), namespace)
    before, after = namespace["comparison"]
    assert before.size == after.size and list(before.getdata()) != list(after.getdata())
    red_before = judge(np.asarray(namespace["before"][0])).colour
    assert red_before == "red"


def test_demo_over_seeds_reports_each_erasure_and_their_mean_with_intervals(tmp_path):
    """--seeds 2: two erasures (seeds 0 and 1) judged on the same image seeds; each seed's pooled rate carries
    its Wilson interval, their mean a t interval; the base model's verdicts come from the cache the second time,
    equal to the first time's, and a damaged cache file is drawn again."""
    cache = tmp_path / "cache"
    cfg = dict(concept="green", samples=2, iterations=2, batch_size=2, seeds=2, cache=str(cache))
    report = run_demo(DemoConfig(out=str(tmp_path / "a"), **cfg), log=lambda m: None)
    s = report["summary"]
    assert report["training_seeds"] == [0, 1] and len(s["presence_after"]) == len(s["accuracy_after"]) == 2
    assert s["presence_before"]["n"] == 18 * 2 and s["accuracy_before"]["n"] == 12 * 2
    for r in [s["presence_before"], *s["presence_after"], s["accuracy_before"], *s["accuracy_after"]]:
        assert r["low"] <= r["rate"] <= r["high"] and r["interval"] == "Wilson 95%"
    mean = s["presence_after_mean"]
    assert mean["seeds"] == 2 and mean["mean"] == pytest.approx(sum(r["rate"] for r in s["presence_after"]) / 2)
    assert mean["interval"] == "t 95% over seeds" and 0 <= mean["low"] <= mean["mean"] <= mean["high"] <= 1
    assert [e["seed"] for e in report["erasures"]] == [0, 1]
    assert {p.name for p in (tmp_path / "a" / "weights").iterdir()} == {"seed_0", "seed_1"}
    assert (tmp_path / "a" / "report.png").stat().st_size > 1000
    assert "t 95%" in (tmp_path / "a" / "report.md").read_text()
    assert report["base_images"].startswith("0 of 30 prompts read from the cache")

    files = sorted((cache / "toy-base").glob("*.npz"))
    assert len(files) == 30
    files[0].write_bytes(b"not an npz")
    again = run_demo(DemoConfig(out=str(tmp_path / "b"), **{**cfg, "seeds": 1}), log=lambda m: None)
    assert again["base_images"].startswith("29 of 30 prompts read from the cache")
    assert {p: v["before"] for p, v in again["erased"].items()} == {p: v["before"] for p, v in report["erased"].items()}
    assert again["summary"]["presence_after_mean"]["interval"] == "one seed: no interval"


def test_the_cached_verdicts_are_the_fresh_ones(tmp_path):
    from esd.toy.measure import BaseCache, measure

    pipe = load_toy_pipeline("toy")
    cache = BaseCache(str(tmp_path), "toy")
    fresh = measure(pipe, "a red circle", 3, 5)
    first, second = cache.get(pipe, "a red circle", 3, 5), cache.get(pipe, "a red circle", 3, 5)
    assert (cache.misses, cache.hits) == (1, 1)
    for m in (first, second):
        assert (m.colours, m.shapes) == (fresh.colours, fresh.shapes) and np.array_equal(m.grid, fresh.grid)
    assert BaseCache("", "toy").folder is None
    # A planted or damaged file is drawn again: the wrong vocabulary, a truncated zip, an empty file.
    path = cache._path("a red circle", 3, 5)
    for damage in ("vocabulary", "truncated", "empty"):
        if damage == "vocabulary":
            with open(path, "wb") as f:
                np.savez(f, colours=np.array(["purple"] * 3), shapes=np.array(fresh.shapes), grid=fresh.grid)
        else:
            path.write_bytes(path.read_bytes()[:40] if damage == "truncated" else b"")
        misses = cache.misses
        m = cache.get(pipe, "a red circle", 3, 5)
        assert cache.misses == misses + 1 and m.colours == fresh.colours, damage


def test_demo_refuses_a_bad_cache_or_seed_count_before_any_work(tmp_path):
    from esd.formats.records import OutputError
    from esd.toy.demo import check_demo

    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match=r"^--cache: .*file is a file, so .*toy-base cannot be a folder$"):
        check_demo(DemoConfig(out=str(tmp_path / "o"), cache=str(tmp_path / "file")))
    with pytest.raises(ValueError, match=r"^--seeds must be a positive integer \(>= 1\), got 0$"):
        check_demo(DemoConfig(out=str(tmp_path / "o"), seeds=0))
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "o").exists()
