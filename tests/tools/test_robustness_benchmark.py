"""benchmarks/robustness.py over training seeds: the base model is measured once for all seeds, every seed's
erasures are judged on the first seed's images, finished seeds are reused, and robust ESD's targets get verdicts
from their intervals. Training and measuring are replaced by stand-ins that record their calls (the benchmark's
own figures need hours of CPU; this checks the bookkeeping around them)."""

import json
from pathlib import Path

import pytest

from benchmarks import robustness
from esd.toy.world import prompts_for


@pytest.fixture
def fake(monkeypatch):
    calls = {"train": [], "measure": []}
    erased, others, _ = prompts_for("red")

    def train(s, name, **robust):
        calls["train"].append((s.seed, name))
        folder = Path(s.out) / "runs" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "args.json").write_text(json.dumps({"seed": s.seed}))
        return (10.0 if name == "esd" else 25.0 + s.seed % 2), folder / f"{name}.safetensors"

    def measure(s, weights, references, attacks, log):
        calls["measure"].append((s.seed, robustness.image_seed(s), None if weights is None else weights.stem))
        level = 1.0 if weights is None else (0.02 if weights.stem == "robust" else 0.3) + 0.01 * (s.seed % 2)
        out = {"literal": {p.text: level for p in erased}, "others": {p.text: 0.99 for p in others},
               "prefix": {p.text: min(1.0, 2 * level) for p in erased}}
        if "inversion" in attacks:
            out["inversion"] = {p.text: 0.9 for p in erased}
        return out

    monkeypatch.setattr(robustness, "train", train)
    monkeypatch.setattr(robustness, "measure", measure)
    monkeypatch.setattr(robustness, "base_references", lambda s: {})
    return calls


def test_over_seeds_measures_the_base_once_on_the_first_seeds_images(tmp_path, fake):
    s = robustness.Settings(out=str(tmp_path / "out"), seed=1001, seeds=3, samples=50)
    summary = robustness.over_seeds(s, log=lambda *a: None)
    assert fake["train"] == [(seed, name) for seed in (1001, 1002, 1003) for name in ("esd", "robust")]
    base_calls = [c for c in fake["measure"] if c[2] is None]
    assert base_calls == [(1001, 1001, None)]  # once, for every seed
    assert {c[1] for c in fake["measure"]} == {1001}  # every erasure judged on image seeds 1001 + i
    assert (tmp_path / "out" / "base.json").exists()
    seed_2 = json.loads((tmp_path / "out" / "seed_1002" / "results.json").read_text())
    assert seed_2["provenance"]["settings"]["image_seed"] == 1001
    assert seed_2["asr_prefix_base"] == 1.0 and "judged image i of every prompt: seed 1001 + i" in \
        seed_2["provenance"]["seeds"]

    verdicts = {t["target"]: t for t in summary["targets"]}
    presence = verdicts["mean literal presence <= 5%"]
    assert presence["estimate"] == pytest.approx((0.03 + 0.02 + 0.03) / 3)
    assert presence["verdict"] == "met" and presence["high"] <= 0.05
    worst = verdicts["worst seed's prefix ASR <= 15%"]
    assert worst["estimate"] == pytest.approx(0.06) and "seed 1001" in worst["shown"]
    assert verdicts["training time <= 3x plain ESD's"]["verdict"] == "met"  # ratios 2.6, 2.5, 2.6
    assert verdicts["other prompts within 3 points of plain ESD (robust - plain)"]["verdict"] == "met"  # 0 each

    fake["train"].clear()
    fake["measure"].clear()
    again = robustness.over_seeds(s, log=lambda *a: None)  # every seed done: read, nothing trained or drawn
    assert fake["train"] == [] and fake["measure"] == []
    assert again["figures"] == summary["figures"]
    assert again["figures"]["asr_prefix_base"]["n"] == 18 * 50  # one measurement: its Wilson interval over images


def test_seeds_judged_beside_another_base_measurement_are_refused(tmp_path, fake, monkeypatch):
    out = tmp_path / "out"
    robustness.over_seeds(robustness.Settings(out=str(out), seed=1, seeds=2, samples=10), log=lambda *a: None)
    monkeypatch.setattr(robustness, "REFERENCE_SEED", 20_000)  # the code now makes another base measurement
    with pytest.raises(SystemExit, match="this code would make otherwise"):
        robustness.over_seeds(robustness.Settings(out=str(out), seed=1, seeds=3, samples=10), log=lambda *a: None)
    assert not (out / "seed_3").exists()  # refused before anything ran
    monkeypatch.setattr(robustness, "REFERENCE_SEED", 10_000)
    found = json.loads((out / "base.json").read_text())
    found["key"]["samples"] = 99  # base.json replaced by another measurement: seeds 1 and 2 were not judged beside it
    (out / "base.json").write_text(json.dumps(found))
    with pytest.raises(SystemExit, match="judged beside another base measurement"):
        robustness.over_seeds(robustness.Settings(out=str(out), seed=1, seeds=2, samples=10), log=lambda *a: None)


def test_a_finished_seed_with_other_settings_is_refused(tmp_path, fake):
    robustness.over_seeds(robustness.Settings(out=str(tmp_path), seed=5, seeds=2, samples=10), log=lambda *a: None)
    with pytest.raises(SystemExit, match="other settings.*--samples 10"):
        robustness.over_seeds(robustness.Settings(out=str(tmp_path), seed=5, seeds=2, samples=20), log=lambda *a: None)


def test_the_base_measurement_is_measured_again_when_what_decides_it_changes(tmp_path, fake):
    s = robustness.Settings(out=str(tmp_path), seed=3, samples=10)
    path = tmp_path / "base.json"
    robustness.base_measurement(s, {}, path, log=lambda *a: None)
    robustness.base_measurement(s, {}, path, log=lambda *a: None)
    assert len(fake["measure"]) == 1  # read the second time
    robustness.base_measurement(robustness.Settings(out=str(tmp_path), seed=4, image_seed=3, samples=10), {},
                                path, log=lambda *a: None)
    assert len(fake["measure"]) == 1  # another training seed, the same images: read
    for changed in ({"prefix_steps": 5}, {"image_seed": 4}, {"samples": 20}, {"concept": "green"}):
        robustness.base_measurement(robustness.Settings(**{"out": str(tmp_path), "seed": 3, "samples": 10,
                                                           **changed}), {}, path, log=lambda *a: None)
    assert len(fake["measure"]) == 5  # each change measured again
