"""``esd reproduce``: every experiment end to end on the toy model with --limit (2 training iterations,
2 sampling steps), with the networks that would be downloaded replaced by random stand-ins saved to
local files, as in test_metrics.py; the figures mean nothing, the plumbing and the records are checked."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision as tv
from helpers import DATA

from esd.cli import main
from esd.reproduce.config import NOT_PUBLISHED, ReproduceConfig
from esd.reproduce.run import reproduce

FAST = {"base_model": "toy", "limit": 2, "iterations": 2, "steps": 2, "devices": "cpu"}


def run(tmp_path, name, out="out", **kw):
    """reproduce(), returning its result and the lines it logged."""
    lines = []
    cfg = ReproduceConfig(name=name, out=str(tmp_path / out), **{**FAST, **kw})
    return reproduce(cfg, log=lines.append), lines


def read_report(folder) -> dict:
    return json.loads((Path(folder) / "report.json").read_text())


def test_nudity_end_to_end_then_resumes_every_stage(tmp_path):
    result, _ = run(tmp_path, "nudity", prompts=str(DATA / "i2p_layout.csv"))
    out = tmp_path / "out"
    record = read_report(out)
    assert record["complete"] is False and result["complete"] is False  # --limit: a smoke run
    assert record["protocol"] == "i2p-mace" and record["arguments"]["limit"] == 2
    assert record["environment"]["torch"] == torch.__version__ and record["seeds"]["training"] == 0
    figures = {(r["model"], r["quantity"]): r for r in record["figures"]}
    base = figures[("base", "exposed parts (MACE classes)")]
    assert base["published"] == 743 and base["difference"] == base["ours"] - 743
    assert figures[("erased-nudity", "exposed parts (MACE classes)")]["published"] == 123
    assert figures[("base", "images with exposure %")]["published_source"] == NOT_PUBLISHED
    assert "never published" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "images" / "base").glob("*.png")) == ["4698_0.png", "4699_0.png"]
    assert json.loads((out / "erase" / "nudity" / "args.json").read_text())["train_method"] == "noxattn"
    assert (out / "compare" / "nudenet" / "report.md").is_file()

    weights = out / "erase" / "nudity" / "nudity.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in [weights, *(out / "images").rglob("*.png"),
                                                *(out / "eval").rglob("summary.json")]}
    _, lines = run(tmp_path, "nudity", prompts=str(DATA / "i2p_layout.csv"))
    skipped = [line for line in lines if "skipped" in line]
    assert len(skipped) == 5  # erase, 2 generations, 2 evaluations
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    with pytest.raises(ValueError, match="trained with other settings .*--iterations 3 vs 2"):
        run(tmp_path, "nudity", prompts=str(DATA / "i2p_layout.csv"), iterations=3)
    with pytest.raises(ValueError, match="trained with other settings") as fewer:
        run(tmp_path, "nudity", prompts=str(DATA / "i2p_layout.csv"), iterations=1)
    assert str(fewer.value).count("--iterations") == 1 and "--iterations 1 < 2" in str(fewer.value)


def test_objects_erases_one_class_with_limit(tmp_path):
    torch.manual_seed(0)
    torch.save(tv.models.resnet50().eval().state_dict(), tmp_path / "resnet50.pth")
    csv = tmp_path / "imagenette.csv"
    pd.DataFrame({"case_number": [0, 1, 2], "class": ["church", "parachute", "church"],
                  "prompt": ["Image of church", "Image of parachute", "Image of church"],
                  "evaluation_seed": [1, 2, 3]}).to_csv(csv, index=False)
    run(tmp_path, "objects", prompts=str(csv), samples=1, classifier_weights=str(tmp_path / "resnet50.pth"))
    record = read_report(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "erase").iterdir()] == ["church"]  # --limit: one class
    figures = {(r["model"], r["quantity"]): r for r in record["figures"]}
    erased = figures[("erased-church", "erased-class accuracy %")]
    assert erased["published"] == 54.2 and 0 <= erased["ours"] <= 100
    assert figures[("erased-church", "other-class accuracy %")]["published_source"] == NOT_PUBLISHED
    assert ("base", "accuracy % on parachute") in figures
    summary = json.loads((tmp_path / "out" / "eval" / "erased-church-classify" / "summary.json").read_text())
    assert summary["protocol"] == "imagenette-paper" and summary["erased_classes"] == ["church"]


def test_art_measures_lpips_of_the_erased_model_to_the_base(tmp_path):
    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in tv.models.alexnet().features.state_dict().items()}
    torch.save(features, tmp_path / "alex.pth")
    run(tmp_path, "art", prompts=str(DATA / "i2p_layout.csv"), concept="red", lpips_backbone=str(tmp_path / "alex.pth"))
    record = read_report(tmp_path / "out")
    [row] = record["figures"]
    assert row["model"] == "erased-red" and row["quantity"] == "LPIPS to the base model" and row["ours"] >= 0
    assert row["published"] is None and record["protocol"] == "art-lpips"
    assert json.loads((tmp_path / "out" / "erase" / "red" / "args.json").read_text())["train_method"] == "xattn"


def test_coco_without_reference_runs_clip_only_and_says_so(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from esd.toy.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(["a", "bicycle", "motorcycle", "room"])
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": len(tokenizer), "bos_token_id": len(tokenizer) - 2, "eos_token_id": len(tokenizer) - 1}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    run(tmp_path, "coco", prompts=str(DATA / "coco_30k_head.csv"), clip_model=str(tmp_path / "clip"))
    record = read_report(tmp_path / "out")
    assert [(r["model"], r["quantity"]) for r in record["figures"]] == [("base", "CLIP score"),
                                                                       ("erased-nudity", "CLIP score")]
    assert any("FID was not computed" in n for n in record["notes"])
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "base").glob("*.png")) == \
        ["000000179765_0.png", "000000203564_0.png"]  # case names from image_id, leading zeros kept


@pytest.mark.parametrize("argv, message", [
    (["nudity", "--protocol", "art-lpips"], "--protocol 'art-lpips' does not measure nudity; valid: i2p-mace, "
                                            "i2p-official"),
    (["objects", "--concept", "church"], "erases each class of the prompt CSV; drop --concept"),
    (["nudity", "--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["nudity", "--prompts", "/no/such.csv"], "--prompts '/no/such.csv' does not exist"),
    (["objects"], "no column 'class' (reproduce objects reads prompt, evaluation_seed, case_number, class)"),
    (["coco", "--reference", "/no/folder"], "--reference '/no/folder' is not a folder"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    args = ["reproduce", *argv[:1], "--base_model", "toy", "--out", str(tmp_path / "out"),
            "--prompts", str(DATA / "i2p_layout.csv"), *argv[1:]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_limit_keeps_a_prompt_csv_inside_out(tmp_path):
    """--prompts OUT/prompts.csv with --limit: the user's CSV is not rewritten to its first rows; an
    OUT/prompts.csv that no earlier reproduce wrote is not replaced either."""
    import shutil

    from esd.formats.records import OutputError

    out = tmp_path / "rep"
    out.mkdir()
    mine = out / "prompts.csv"
    shutil.copy(DATA / "i2p_layout.csv", mine)
    text = mine.read_text()
    with pytest.raises(OutputError, match="put the prompt CSV outside --out"):
        run(tmp_path, "nudity", out="rep", prompts=str(mine), limit=1)
    assert mine.read_text() == text
    with pytest.raises(OutputError, match="no earlier esd reproduce wrote"):
        run(tmp_path, "nudity", out="rep", prompts=str(DATA / "i2p_layout.csv"), limit=1)
    assert mine.read_text() == text
