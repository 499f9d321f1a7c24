import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esd.generate import GenerationConfig, batches, generate_images, read_jobs, shard

ROOT = Path(__file__).resolve().parents[1]
# The paper's prompt files' column layouts, with a few rows: COCO-30k's first five captions, and I2P's
# columns (an unnamed index first, case_number last) with benign synthetic prompts for its last five cases.
DATA = Path(__file__).parent / "data"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a photo of a cat", "a church", "a dog"], "evaluation_seed": [11, 22, 33],
                  "case_number": [0, 1, 2]}).to_csv(path, index=False)
    return path


def config(prompts, out, model, **kw):
    settings = {"num_samples": 2, "ddim_steps": 3, "scheduler": "lms", "device": "cpu", **kw}
    return GenerationConfig(prompts_path=str(prompts), save_path=str(out), base_model=model, **settings)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def test_names_counts_seeds_and_record(prompts, tmp_path, tiny_models):
    counts = generate_images(config(prompts, tmp_path / "a", tiny_models["sd1"], batch_size=4))
    a = files(tmp_path / "a")
    assert sorted(a) == [f"{c}_{i}.png" for c in range(3) for i in range(2)] and counts["generated"] == 6
    record = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert record["safety_checker"] == "off" and record["seeds"] == [11, 22, 33] and record["images"] == 6
    generate_images(config(prompts, tmp_path / "b", tiny_models["sd1"], batch_size=4))
    assert files(tmp_path / "b") == a  # same seeds, same bytes
    assert a["0_0.png"] != a["0_1.png"] != a["1_0.png"]


def test_resume_after_interruption_gives_identical_files(prompts, tmp_path, tiny_models):
    generate_images(config(prompts, tmp_path / "full", tiny_models["sd1"], batch_size=2))
    out = tmp_path / "killed"
    generate_images(config(prompts, out, tiny_models["sd1"], batch_size=2))
    # What a kill leaves: some images missing, a temporary file that was never renamed.
    (out / "1_1.png").unlink()
    (out / "2_0.png").unlink()
    (out / ".2_1.png.tmp999").write_bytes(b"partial")
    counts = generate_images(config(prompts, out, tiny_models["sd1"], batch_size=2))
    assert counts["skipped"] == 2 and counts["generated"] == 2
    assert files(out) == files(tmp_path / "full")


def test_csv_errors_name_the_columns(tmp_path, tiny_models):
    coco = DATA / "coco_30k_head.csv"
    with pytest.raises(ValueError, match="no column --case_column 'case_number'; columns found: image_id, source, "
                                         "prompt, evaluation_seed"):
        read_jobs(config(coco, tmp_path, tiny_models["sd1"]))
    jobs = read_jobs(config(coco, tmp_path, tiny_models["sd1"], case_column="image_id", num_samples=1))
    assert len(jobs) == 5 and jobs[0].filename == "000000203564_0.png"  # leading zeros kept
    i2p = read_jobs(config(DATA / "i2p_layout.csv", tmp_path, tiny_models["sd1"], from_case=4700))
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
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
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
    import torch
    torch.save({"conv_in.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit"):
        generate_images(config(prompts, tmp_path / "y", tiny_models["sd1"], esd_path=str(wrong)))
    r = subprocess.run([sys.executable, str(ROOT / "eval-scripts" / "generate-images.py"), "--prompts_path",
                        str(prompts), "--save_path", str(tmp_path / "z"), "--base_model", tiny_models["sd1"],
                        "--esd_path", str(wrong), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit" in r.stderr and "missing keys" in r.stderr and "shape mismatches" in r.stderr


def test_batches_are_fixed_partitions(prompts, tmp_path, tiny_models):
    jobs = read_jobs(config(prompts, tmp_path, tiny_models["sd1"]))
    assert [len(b) for b in batches(jobs, 4)] == [4, 2]


def test_sld_baseline_steers_away_from_plain_sd(prompts, tmp_path, tiny_models):
    """Safe Latent Diffusion (the paper's inference-time baseline): same seeds, same files, but its
    safety guidance changes the images. The 'max' preset has no warm-up, so 3 steps feel it."""
    generate_images(config(prompts, tmp_path / "sd", tiny_models["sd1"], scheduler="ddim", num_samples=1))
    generate_images(config(prompts, tmp_path / "sld", tiny_models["sd1"], scheduler="ddim", num_samples=1,
                           pipeline="sld", sld_preset="max"))
    sd, sld = files(tmp_path / "sd"), files(tmp_path / "sld")
    assert sorted(sd) == sorted(sld)
    assert all(sd[f] != sld[f] for f in sd)
    record = json.loads((tmp_path / "sld" / "generation.json").read_text())
    assert record["settings"]["pipeline"] == "sld" and record["settings"]["sld_preset"] == "max"


@pytest.mark.parametrize("case", ["../../escaped", "/tmp/escaped", "foo/bar", "..", ".hidden", "a\\b", ""])
def test_case_values_never_write_outside_the_save_path(case, tmp_path, tiny_models):
    """Prompt CSVs come from strangers: a case value that is not a plain file name is a one-line error
    naming the row and value, raised before any model loads or anything is written."""
    csv = tmp_path / "in" / "prompts.csv"
    csv.parent.mkdir()
    pd.DataFrame({"prompt": ["a cat", "a dog"], "evaluation_seed": [1, 2], "case_number": ["0", case]}).to_csv(
        csv, index=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, str(ROOT / "eval-scripts" / "generate-images.py"), "--prompts_path", str(csv),
                        "--save_path", str(tmp_path / "out" / "images"), "--base_model", tiny_models["sd1"],
                        "--device", "cpu", "--num_samples", "1", "--ddim_steps", "2"], capture_output=True, text=True,
                       timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "row 2 (line 3), --case_column 'case_number':" in r.stderr and "not a plain file name" in r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/escaped").exists()
