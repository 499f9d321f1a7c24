import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import DATA, ROOT, every, free_port, one_line_error, script_in_process, snapshot

from esd.formats import generation_record
from esd.generate import images as generate
from esd.generate.config import GenerationConfig
from esd.generate.images import batches, generate_images, read_jobs, shard

# The paper's prompt files' column layouts, with a few rows: COCO-30k's first five captions, and I2P's
# columns (an unnamed index first, case_number last) with benign synthetic prompts for its last five cases.


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a photo of a cat", "a church", "a dog"], "evaluation_seed": [11, 22, 33],
                  "case_number": [0, 1, 2]}).to_csv(path, index=False)
    return path


def gen_config(prompts, out, model, **kw):
    settings = {"num_samples": 2, "ddim_steps": 3, "scheduler": "lms", "device": "cpu", **kw}
    return GenerationConfig(prompts_path=str(prompts), save_path=str(out), base_model=model, **settings)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def test_names_counts_seeds_and_record(prompts, tmp_path, tiny_models):
    counts = generate_images(gen_config(prompts, tmp_path / "a", tiny_models["sd1"], batch_size=4))
    a = files(tmp_path / "a")
    assert sorted(a) == [f"{c}_{i}.png" for c in range(3) for i in range(2)] and counts["generated"] == 6
    record = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert record["safety_checker"] == "off" and record["seeds"] == [11, 22, 33] and record["images"] == 6
    generate_images(gen_config(prompts, tmp_path / "b", tiny_models["sd1"], batch_size=4))
    assert files(tmp_path / "b") == a  # same seeds, same bytes
    # ... and the same fingerprint: the settings and rows that decide the pixels, not the folder's path
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["fingerprint"] == record["fingerprint"]
    assert record["rows"]["1"] == {"prompt": "a church", "seed": 22} and len(record["fingerprint"]) == 64
    assert a["0_0.png"] != a["0_1.png"] != a["1_0.png"]


def test_resume_after_interruption_gives_identical_files(prompts, tmp_path, tiny_models):
    generate_images(gen_config(prompts, tmp_path / "full", tiny_models["sd1"], batch_size=2))
    out = tmp_path / "killed"
    generate_images(gen_config(prompts, out, tiny_models["sd1"], batch_size=2))
    # What a kill leaves: some images missing, a temporary file that was never renamed.
    (out / "1_1.png").unlink()
    (out / "2_0.png").unlink()
    (out / ".2_1.png.tmp999").write_bytes(b"partial")
    counts = generate_images(gen_config(prompts, out, tiny_models["sd1"], batch_size=2))
    assert counts["skipped"] == 2 and counts["generated"] == 2
    assert files(out) == files(tmp_path / "full")


def test_csv_errors_name_the_columns(tmp_path, tiny_models):
    coco = DATA / "coco_30k_head.csv"
    with pytest.raises(ValueError, match="no column --case_column 'case_number'; columns found: image_id, source, "
                                         "prompt, evaluation_seed"):
        read_jobs(gen_config(coco, tmp_path, tiny_models["sd1"]))
    jobs = read_jobs(gen_config(coco, tmp_path, tiny_models["sd1"], case_column="image_id", num_samples=1))
    assert len(jobs) == 5 and jobs[0].filename == "000000203564_0.png"  # leading zeros kept
    i2p = read_jobs(gen_config(DATA / "i2p_layout.csv", tmp_path, tiny_models["sd1"], from_case=4700))
    assert [j.filename for j in i2p] == [f"{c}_{i}" + ".png" for c in range(4700, 4703) for i in range(2)]


def test_shards_cover_every_batch_once():
    items = list(range(23))
    for count in (1, 2, 3, 5, 30):
        parts = [shard(items, i, count) for i in range(count)]
        assert sum(parts, []) == items


def test_two_processes_split_the_rows(prompts, tmp_path, tiny_models):
    """A real two-process run (torchrun on the CPU, which accelerate's PartialState reads) writes the same
    bytes as one process. Both run with one thread each: the thread count changes float summation order."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "eval-scripts" / "generate-images.py"), "--prompts_path", str(prompts), "--base_model",
              tiny_models["sd1"], "--num_samples", "2", "--ddim_steps", "3", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port())]
    two = subprocess.run([*launch, *script, "--save_path", str(tmp_path / "sharded")], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("generated 3, skipped 0") == 2  # 6 images, 3 per process
    one = subprocess.run([sys.executable, *script, "--save_path", str(tmp_path / "single")], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert one.returncode == 0 and "generated 6, skipped 0" in one.stdout, one.stderr[-2000:]
    assert files(tmp_path / "sharded") == files(tmp_path / "single")


def test_bad_input_cli(prompts, tmp_path, tiny_models):
    r = subprocess.run([sys.executable, str(ROOT / "eval-scripts" / "generate-images.py"), "--prompts_path",
                        str(DATA / "coco_30k_head.csv"), "--save_path", str(tmp_path / "x"), "--base_model",
                        tiny_models["sd1"]], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "columns found: image_id" in r.stderr
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv_in.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit"):
        generate_images(gen_config(prompts, tmp_path / "y", tiny_models["sd1"], esd_path=str(wrong)))
    r = subprocess.run([sys.executable, str(ROOT / "eval-scripts" / "generate-images.py"), "--prompts_path",
                        str(prompts), "--save_path", str(tmp_path / "z"), "--base_model", tiny_models["sd1"],
                        "--esd_path", str(wrong), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit" in r.stderr and "missing keys" in r.stderr and "shape mismatches" in r.stderr


def test_batches_are_fixed_partitions(prompts, tmp_path, tiny_models):
    jobs = read_jobs(gen_config(prompts, tmp_path, tiny_models["sd1"]))
    assert [len(b) for b in batches(jobs, 4)] == [4, 2]


def test_sld_baseline_steers_away_from_plain_sd(prompts, tmp_path, tiny_models):
    """Safe Latent Diffusion (the paper's inference-time baseline): same seeds, same files, but its
    safety guidance changes the images. The 'max' preset has no warm-up, so 3 steps feel it."""
    generate_images(gen_config(prompts, tmp_path / "sd", tiny_models["sd1"], scheduler="ddim", num_samples=1))
    generate_images(gen_config(prompts, tmp_path / "sld", tiny_models["sd1"], scheduler="ddim", num_samples=1,
                           pipeline="sld", sld_preset="max"))
    sd, sld = files(tmp_path / "sd"), files(tmp_path / "sld")
    assert sorted(sd) == sorted(sld)
    assert every(sd[f] != sld[f] for f in sd)
    record = json.loads((tmp_path / "sld" / "generation.json").read_text())
    assert record["settings"]["pipeline"] == "sld" and record["settings"]["sld_preset"] == "max"


@pytest.mark.parametrize("case", ["../../escaped", "{tmp}/escaped", "foo/bar", "..", ".hidden", "a\\b", ""])
def test_case_values_never_write_outside_the_save_path(case, tmp_path, tiny_models, capsys):
    """Prompt CSVs come from strangers: a case value that is not a plain file name is a one-line error
    naming the row and value, raised before any model loads or anything is written. ``{tmp}``: an absolute
    path, this test's own folder."""
    case = case.replace("{tmp}", str(tmp_path))
    csv = tmp_path / "in" / "prompts.csv"
    csv.parent.mkdir()
    pd.DataFrame({"prompt": ["a cat", "a dog"], "evaluation_seed": [1, 2], "case_number": ["0", case]}).to_csv(
        csv, index=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, err = script_in_process("--prompts_path", csv, "--save_path", tmp_path / "out" / "images", "--base_model",
                                tiny_models["sd1"], "--device", "cpu", "--num_samples", "1", "--ddim_steps", "2",
                                capsys=capsys, script="eval-scripts/generate-images.py")
    assert rc == 2 and len(err) == 1, err
    assert "row 2 (line 3), --case_column 'case_number':" in err[0] and "not a plain file name" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "escaped").exists()


def test_a_folder_made_otherwise_is_refused_before_any_model_loads(prompts, tmp_path, tiny_models, monkeypatch):
    out = tmp_path / "a"
    generate_images(gen_config(prompts, out, tiny_models["sd1"]))
    before = snapshot(out, mtimes=True)
    monkeypatch.setattr(generate, "build_pipeline", lambda *a: pytest.fail("a model loaded before the check"))
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd1"], guidance_scale=3.0)))
    assert "--guidance_scale 3.0 vs 7.5 recorded" in message and "--overwrite" in message
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd2"])))
    assert "base model files' sha256 differ" in message
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd1"], num_samples=3,
                                                            scheduler="ddim")))
    assert "--scheduler ddim vs lms recorded" in message and "--num_samples 3 vs 2 recorded" in message
    edited = tmp_path / "edited.csv"
    pd.read_csv(prompts).assign(prompt=["a photo of a cat", "a dog", "a dog"]).to_csv(edited, index=False)
    message = one_line_error(lambda: generate_images(gen_config(edited, out, tiny_models["sd1"])))
    assert "case '1': prompt differs ('a dog' vs 'a church' recorded)" in message
    assert snapshot(out, mtimes=True) == before  # no byte, no mtime and no lock file changed


def test_erased_weights_are_part_of_the_fingerprint(prompts, tmp_path, tiny_models, monkeypatch):
    from diffusers import UNet2DConditionModel

    state = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet").state_dict()
    torch.save(state, tmp_path / "w1.pt")
    torch.save({**state, "conv_in.bias": state["conv_in.bias"] + 1}, tmp_path / "w2.pt")
    out = tmp_path / "esd"
    generate_images(gen_config(prompts, out, tiny_models["sd1"], num_samples=1, esd_path=str(tmp_path / "w1.pt")))
    record = json.loads((out / "generation.json").read_text())
    assert record["fingerprint_settings"]["weights_sha256"] == generation_record.sha256(tmp_path / "w1.pt")
    monkeypatch.setattr(generate, "build_pipeline", lambda *a: pytest.fail("a model loaded before the check"))
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd1"], num_samples=1,
                                                            esd_path=str(tmp_path / "w2.pt"))))
    assert "erased weights' sha256 differ" in message
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd1"], num_samples=1)))
    assert "erased weights' sha256 none vs" in message


def test_pngs_without_a_record_are_refused(prompts, tmp_path, tiny_models):
    out = tmp_path / "a"
    out.mkdir()
    (out / "0_0.png").write_bytes(b"made elsewhere")
    message = one_line_error(lambda: generate_images(gen_config(prompts, out, tiny_models["sd1"])))
    assert "no generation.json" in message and "--overwrite" in message
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png"]


def test_overwrite_starts_over_and_deletes_only_recorded_images(prompts, tmp_path, tiny_models):
    out = tmp_path / "a"
    generate_images(gen_config(prompts, out, tiny_models["sd1"]))
    old = files(out)
    (out / "notes.txt").write_text("mine")
    (out / "9_0.png").write_bytes(b"not recorded")
    counts = generate_images(gen_config(prompts, out, tiny_models["sd1"], guidance_scale=3.0, till_case=1,
                                    overwrite=True))
    assert (counts["generated"], counts["skipped"]) == (4, 0)
    new = files(out)
    assert sorted(new) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "9_0.png"]  # case 2's images: deleted
    assert every(new[f] != old[f] for f in ["0_0.png", "0_1.png", "1_0.png", "1_1.png"])
    assert new["9_0.png"] == b"not recorded" and (out / "notes.txt").read_text() == "mine"
    record = json.loads((out / "generation.json").read_text())
    assert record["fingerprint_settings"]["guidance_scale"] == 3.0 and list(record["rows"]) == ["0", "1"]
    again = generate_images(gen_config(prompts, out, tiny_models["sd1"], guidance_scale=3.0, till_case=1))
    assert again["skipped"] == 4 and files(out) == new  # the overwritten folder resumes as usual


def test_compatible_runs_over_other_cases_merge_their_rows(prompts, tmp_path, tiny_models):
    out = tmp_path / "parts"
    generate_images(gen_config(prompts, out, tiny_models["sd1"], till_case=0))
    first = json.loads((out / "generation.json").read_text())
    assert first["rows"] == {"0": {"prompt": "a photo of a cat", "seed": 11}} and first["images"] == 2
    counts = generate_images(gen_config(prompts, out, tiny_models["sd1"], from_case=1))
    assert counts["generated"] == 4 and counts["skipped"] == 0
    merged = json.loads((out / "generation.json").read_text())
    assert list(merged["rows"]) == ["0", "1", "2"] and merged["rows"]["2"] == {"prompt": "a dog", "seed": 33}
    assert merged["settings_fingerprint"] == first["settings_fingerprint"]
    assert merged["fingerprint"] != first["fingerprint"] and merged["images"] == 6 and merged["seeds"] == [11, 22, 33]
    generate_images(gen_config(prompts, tmp_path / "whole", tiny_models["sd1"]))
    whole = json.loads((tmp_path / "whole" / "generation.json").read_text())
    assert merged["fingerprint"] == whole["fingerprint"] and files(out) == files(tmp_path / "whole")


def test_concurrent_records_lose_no_rows(prompts, tmp_path, tiny_models):
    """Generators sharing a folder re-read, merge and write generation.json under its lock."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = gen_config(prompts, tmp_path, tiny_models["sd1"])
    settings = generate.pixel_settings(cfg, None, 128)
    rows = [{f"c{i}": {"prompt": f"p{i}", "seed": i}} for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: generation_record.write_record(tmp_path, cfg, settings, r, {}), rows))
    record = json.loads((tmp_path / "generation.json").read_text())
    assert sorted(record["rows"]) == sorted(f"c{i}" for i in range(16)) and record["images"] == 32


@pytest.mark.parametrize("column, values, expected", [
    ("case_number", ["0", "1", "1"], "row 3 (line 4), --case_column 'case_number': '1' repeats row 2"),
    ("prompt", ["a cat", "", "a dog"], "row 2 (line 3), --prompt_column 'prompt': '' is an empty prompt"),
    ("prompt", ["a cat", "  ", "a dog"], "row 2 (line 3), --prompt_column 'prompt': '  ' is an empty prompt"),
    ("evaluation_seed", ["1", "1.5", "3"], "row 2 (line 3), --seed_column 'evaluation_seed': '1.5' is not an integer"),
    ("evaluation_seed", ["1", "2", "-1"], "row 3 (line 4), --seed_column 'evaluation_seed': '-1' is not an integer"),
    ("evaluation_seed", ["abc", "2", "3"], "row 1 (line 2), --seed_column 'evaluation_seed': 'abc' is not an integer"),
    ("evaluation_seed", ["1", "", "3"], "row 2 (line 3), --seed_column 'evaluation_seed': '' is not an integer"),
    ("evaluation_seed", ["1", str(2 ** 53), "3"], f"'{2 ** 53}' is not an integer seed with 0 <= seed < 2**53"),
])
def test_bad_prompt_rows_are_refused_naming_row_column_and_value(column, values, expected, tmp_path, tiny_models):
    csv = tmp_path / "p.csv"
    table = {"prompt": ["a cat", "a church", "a dog"], "evaluation_seed": ["1", "2", "3"],
             "case_number": ["0", "1", "2"]}
    pd.DataFrame({**table, column: values}).to_csv(csv, index=False)
    message = one_line_error(lambda: read_jobs(gen_config(csv, tmp_path / "out", tiny_models["sd1"])))
    assert message.startswith(f"{csv}: ") and expected in message


def test_float_seeds_and_literal_prompts_are_kept(tmp_path, tiny_models):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed,case_number\nNone,12.0,7\nnan,9007199254740991,8\n")
    jobs = read_jobs(gen_config(csv, tmp_path / "out", tiny_models["sd1"], num_samples=1))
    assert [(j.prompt, j.seed, j.case) for j in jobs] == [("None", 12, "7"), ("nan", 2 ** 53 - 1, "8")]


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0])
def test_guidance_must_be_finite_and_not_negative(guidance, prompts, tmp_path, tiny_models):
    message = one_line_error(lambda: gen_config(prompts, tmp_path, tiny_models["sd1"], guidance_scale=guidance))
    assert message == f"--guidance_scale must be a finite number >= 0, got {guidance!r}"
