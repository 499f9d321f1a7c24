import json
import re
import shlex
import shutil

import pytest
import torch
import yaml
from helpers import every

from esd import ESDConfig, train_esd, write_model_card
from esd.cli import build_parser, config_from_args
from esd.train.recipe import ESDTrainer


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A two-iteration erasure of "red" from the toy model, with one preset field given explicitly."""
    cfg = ESDConfig(prompt="red", train_method="xattn", base_model="toy", iterations=2, ddim_steps=6, pool_size=1,
                    seed=0, save_path=str(tmp_path_factory.mktemp("runs")), name="red")
    return train_esd(cfg).output_dir


def front_matter(text):
    match = re.fullmatch(r"---\n(.*?)\n---\n+(.*)", text, re.S)
    assert match, "the card does not open with a YAML header"
    return yaml.safe_load(match[1]), match[2]


def code_blocks(body, language):
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def test_training_writes_a_card_naming_concept_method_eta_and_command(toy_run):
    header, body = front_matter((toy_run / "README.md").read_text())
    assert header["base_model"] == "toy" and header["library_name"] == "diffusers" and "license" in header
    assert {"esd", "concept-erasure", "stable-diffusion"} <= set(header["tags"])
    assert body.startswith('# ESD: "red" erased from toy')
    assert "| erased concept | red |" in body and "train method `xattn`" in body
    assert "| eta (negative_guidance) | 1.0 (the official code's negative_guidance 2.0) |" in body
    assert "| iterations | 2 |" in body and "| seed | 0 |" in body

    # The command, run through the CLI's own parser, gives back every recorded setting.
    (command,) = code_blocks(body, "bash")
    words = shlex.split(command.strip())
    assert words[:2] == ["esd", "train"] and "--pool_size" in words and "--lr" not in words  # lr: the preset's
    recorded = json.loads((toy_run / "args.json").read_text())
    again = config_from_args(build_parser().parse_args(words[1:])).record()
    assert {k: recorded[k] for k in again} == again


def test_card_loading_snippets_load_the_erased_weights(toy_run, monkeypatch):
    _, body = front_matter((toy_run / "README.md").read_text())
    blocks = code_blocks(body, "python")
    assert len(blocks) == 2  # diffusers-red.pt and red.safetensors
    erased = torch.load(toy_run / "diffusers-red.pt", weights_only=True)
    monkeypatch.chdir(toy_run)  # the card's paths are relative to its folder
    for block in blocks:
        scope = {}
        exec(block, scope)
        unet = scope["pipe"].unet.state_dict()
        assert every(torch.equal(unet[k], v) for k, v in erased.items())


def test_card_rewritten_later_lists_evaluation_summaries(toy_run, tmp_path):
    run = shutil.copytree(toy_run, tmp_path / "red")
    (run / "eval" / "nudenet").mkdir(parents=True)
    (run / "eval" / "nudenet" / "summary.json").write_text(json.dumps(
        {"metric": "nudenet", "threshold": 0.6, "images": 40, "images_with_exposure": 3,
         "fraction_with_exposure": 0.075}))
    (run / "broken").mkdir()
    (run / "broken" / "summary.json").write_text("{not json")
    write_model_card(run)
    _, body = front_matter((run / "README.md").read_text())
    assert "| eval/nudenet | nudenet | images: 40, with exposure: 3, fraction: 7.5% |" in body
    assert "| broken | ? | unreadable summary.json (ValueError) |" in body


def test_a_folder_holding_a_readme_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "README.md").write_text("someone's notes")
    cfg = ESDConfig(prompt="red", train_method="xattn", base_model="toy", save_path=str(tmp_path), name="run")
    with pytest.raises(ValueError, match=r"already holds a run \(README.md\)"):
        ESDTrainer(cfg)
    assert (tmp_path / "run" / "README.md").read_text() == "someone's notes"


def test_report_table_goes_in_the_card_once_per_metric_and_survives_a_rewrite(tmp_path):
    """esd report --card: a second report of the metric replaces its section, another metric adds its own, a
    card rewritten later (after esd evaluate) keeps them; a folder without a card is refused before writing."""
    from esd.eval import ReportConfig, report

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"prompt": "red", "train_method": "xattn", "negative_guidance": 1.0,
                                               "base_model": "toy"}))
    write_model_card(run)
    for name, tench in [("base", 0.9), ("esd", 0.1)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "metric": "classify", "images": 4, "per_class_accuracy": {"tench": tench}, "mean_accuracy": tench,
            "erased_classes": ["tench"], "erased_accuracy": tench, "others_accuracy": None}))
    (tmp_path / "nude").mkdir()
    (tmp_path / "nude" / "summary.json").write_text(json.dumps(
        {"metric": "nudenet", "threshold": 0.6, "images": 40, "images_with_exposure": 3,
         "fraction_with_exposure": 0.075}))
    inputs = [f"SD={tmp_path / 'base'}", f"ESD={tmp_path / 'esd'}"]
    for _ in range(2):
        report(ReportConfig(inputs=inputs, out=str(tmp_path / "r"), grid_images=0, card=str(run)), log=print)
    _, body = front_matter((run / "README.md").read_text())
    assert body.count("## esd report: classify") == 1 and "| ESD | 4 | 10.0% | 10.0% |" in body
    report(ReportConfig(inputs=[str(tmp_path / "nude")], out=str(tmp_path / "r2"), grid_images=0, card=str(run)))
    write_model_card(run)  # e.g. after esd evaluate
    _, body = front_matter((run / "README.md").read_text())
    assert body.count("## esd report: classify") == 1 and body.count("## esd report: nudenet") == 1
    assert body.index("## Command") < body.index("## esd report: classify") < body.index("## esd report: nudenet")
    with pytest.raises(ValueError, match="--card .* holds no model card"):
        report(ReportConfig(inputs=inputs, out=str(tmp_path / "r3"), card=str(tmp_path / "base")))
    assert not (tmp_path / "r3").exists()
