"""Bad input to every command: exit code 2, one error line that names the problem, no traceback, and
not one file created or changed anywhere under the test's folder (inputs included), whatever the
input tries. The commands run in-process (``esd.cli.main``); each case fails before any training or
generation, most before a model loads."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from esd.cli import main
from esd.models import TOY_MODEL_DIR

TRAIN = ["train", "--prompt", "cat", "--train_method", "xattn", "--base_model", "toy", "--save_path", "{t}/runs",
         "--iterations", "1", "--devices", "cpu"]
GENERATE = ["generate", "--prompts_path", "{t}/prompts.csv", "--save_path", "{t}/images", "--base_model", "toy",
            "--num_samples", "1", "--ddim_steps", "2", "--device", "cpu"]
EVALUATE = ["evaluate", "--metric", "classify", "--images", "{t}/made", "--out", "{t}/eval"]


def with_flags(base: list[str], *flags: str) -> list[str]:
    """``base`` with each flag in ``flags`` (a flag followed by its value) set, replacing a value
    already there."""
    out = list(base)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def csv_with(rows: str) -> str:
    return "case_number,prompt,evaluation_seed\n" + rows


CASES = [
    # -- esd train ---------------------------------------------------------------------------------
    (with_flags(TRAIN, "--train_method", "attn"), "invalid choice: 'attn'"),
    (with_flags(TRAIN, "--base_model", "/no/such/model"), "base model folder '/no/such/model' does not exist"),
    (with_flags(TRAIN, "--base_model", "{t}/inputs"), "is not a diffusers folder"),
    (with_flags(TRAIN, "--lr", "fast"), "argument --lr: invalid float value: 'fast'"),
    (with_flags(TRAIN, "--lr", "-1"), "--lr must be a positive number"),
    (with_flags(TRAIN, "--lr", "nan"), "--lr must be a positive number, got nan"),
    (with_flags(TRAIN, "--prompt", ""), "--prompt is empty"),
    (with_flags(TRAIN, "--prompt", "cat,,dog", "--separator", ","), "empty concept between separators"),
    (with_flags(TRAIN, "--image_size", "30"), "--image_size 30 is not a multiple of the VAE factor 4"),
    (with_flags(TRAIN, "--image_size", "-8"), "--image_size must be positive"),
    (with_flags(TRAIN, "--resume", "/no/such.pt"), "--resume '/no/such.pt' does not exist"),
    (with_flags(TRAIN, "--resume", "{t}/inputs/empty.pt"), "is not a readable ESD checkpoint"),
    (with_flags(TRAIN, "--resume", "{t}/inputs/state.pt"), "is not an ESD checkpoint"),
    (with_flags(TRAIN, "--mixed_precision", "fp8"), "invalid choice: 'fp8'"),
    (with_flags(TRAIN, "--optimizer", "sgd"), "invalid choice: 'sgd'"),
    (with_flags(TRAIN, "--preset", "faithful"), "invalid choice: 'faithful'"),
    (with_flags(TRAIN, "--save_format", "ckpt"), "invalid choice: 'ckpt'"),
    (with_flags(TRAIN, "--name", "../.."), "--name '../..' is not a plain file name"),
    (with_flags(TRAIN, "--name", "/tmp/elsewhere"), "--name '/tmp/elsewhere' is not a plain file name"),
    (with_flags(TRAIN, "--name", "a/b"), "--name 'a/b' is not a plain file name"),
    (with_flags(TRAIN, "--name", ".hidden"), "--name '.hidden' is not a plain file name"),
    (with_flags(TRAIN, "--name", "x" * 200), "at most 120 characters"),
    (with_flags(TRAIN, "--negative_guidance", "nan"), "--negative_guidance must be a finite number, got nan"),
    (with_flags(TRAIN, "--start_guidance", "inf"), "--start_guidance must be a finite number, got inf"),
    (with_flags(TRAIN, "--iterations", "0"), "--iterations must be an integer >= 1, got 0"),
    (with_flags(TRAIN, "--iterations", "1.5"), "argument --iterations: invalid int value: '1.5'"),
    (with_flags(TRAIN, "--batch_size", "0"), "--batch_size must be an integer >= 1, got 0"),
    (with_flags(TRAIN, "--ddim_steps", "0"), "--ddim_steps must be an integer >= 1, got 0"),
    (with_flags(TRAIN, "--save_every", "-1"), "--save_every must be an integer >= 0, got -1"),
    (with_flags(TRAIN, "--pool_size", "-1"), "--pool_size must be an integer >= 0, got -1"),
    (with_flags(TRAIN, "--timestep_mode", "original"), "--timestep_mode original pairs a partial trajectory"),
    (with_flags(TRAIN, "--preset", "paper", "--pool_size", "8"), "--sampler_model trained samples x_t on-policy"),
    (with_flags(TRAIN, "--preset", "official", "--timestep_mode", "original"), "needs --sampler_scheduler ddim"),
    (with_flags(TRAIN, "--save_path", "{t}/inputs/empty.pt/runs"), "is a file, so"),
    (with_flags(TRAIN, "--ckpt_path", "/no/such.ckpt"), "--ckpt_path '/no/such.ckpt' does not exist"),
    (with_flags(TRAIN, "--devices", "tpu"), "bad device 'tpu'"),
    (with_flags(TRAIN, "--name", "existing", "--save_path", "{t}"), "already holds a run (args.json)"),
    # -- esd generate ------------------------------------------------------------------------------
    (with_flags(GENERATE, "--prompts_path", "/no/such.csv"), "prompt CSV '/no/such.csv' does not exist"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/traversal.csv"), "'../x' is not a plain file name"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/absolute.csv"), "'/abs/x' is not a plain file name"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/subdir.csv"), "'foo/bar' is not a plain file name"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/duplicate.csv"), "'1' repeats row 1"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/empty_prompt.csv"), "'' is an empty prompt"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/fraction_seed.csv"), "'1.5' is not an integer seed"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/negative_seed.csv"), "'-1' is not an integer seed"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/text_seed.csv"), "'abc' is not an integer seed"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/huge_seed.csv"), "is not an integer seed"),
    (with_flags(GENERATE, "--prompts_path", "{t}/inputs/no_seed.csv"), "no column --seed_column 'evaluation_seed'"),
    (with_flags(GENERATE, "--case_column", "image_id"), "no column --case_column 'image_id'"),
    (with_flags(GENERATE, "--guidance_scale", "nan"), "--guidance_scale must be a finite number >= 0, got nan"),
    (with_flags(GENERATE, "--guidance_scale", "-1"), "--guidance_scale must be a finite number >= 0, got -1.0"),
    (with_flags(GENERATE, "--num_samples", "0"), "--num_samples, --batch_size and --ddim_steps must be >= 1"),
    (with_flags(GENERATE, "--image_size", "30"), "--image_size 30 is not a multiple of the VAE factor 4"),
    (with_flags(GENERATE, "--scheduler", "heun"), "invalid choice: 'heun'"),
    (with_flags(GENERATE, "--mixed_precision", "fp8"), "invalid choice: 'fp8'"),
    (with_flags(GENERATE, "--esd_path", "/no/such.pt"), "erased weights '/no/such.pt' do not exist"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/empty.pt"), "as a weights-only torch file (EOFError"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/nan.safetensors"), "holds NaN or Inf in 1 tensors"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/corrupt.safetensors"), "as safetensors"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/foreign.safetensors"), "does not fit toy"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/empty.pt", "--model_name", "x"), "not both"),
    (with_flags(GENERATE, "--save_path", "{t}/made"), "but no generation.json"),
    (with_flags(GENERATE, "--base_model", "/no/such/model"), "base model folder '/no/such/model' does not exist"),
    # -- esd evaluate ------------------------------------------------------------------------------
    (with_flags(EVALUATE, "--metric", "accuracy"), "invalid choice: 'accuracy'"),
    (with_flags(EVALUATE, "--images", "/no/such"), "no <case>_<i>.png images in '/no/such'"),
    (with_flags(EVALUATE, "--images", "{t}/corrupt_images"), "0_0.png"),
    (with_flags(EVALUATE, "--prompts", "/no/such.csv"), "/no/such.csv"),
    (with_flags(EVALUATE, "--prompts", "{t}/inputs/no_seed.csv", "--case_column", "image_id"),
     "no column --case_column 'image_id'"),
    (with_flags(EVALUATE, "--prompts", "{t}/inputs/other_cases.csv"), "which is not in"),
    (with_flags(EVALUATE, "--metric", "lpips"), "--metric lpips needs --reference"),
    (with_flags(EVALUATE, "--metric", "lpips", "--reference", "/no/such"), "--reference '/no/such' is not a folder"),
    (with_flags(EVALUATE, "--metric", "fid", "--fid_dims", "10"), "invalid choice: 10"),
    (with_flags(EVALUATE, "--threshold", "high"), "invalid float value: 'high'"),
    (with_flags(EVALUATE, "--threshold", "2"), "--threshold must be a number in [0, 1], got 2.0"),
    (with_flags(EVALUATE, "--limit", "0"), "--limit must be an integer >= 1, got 0"),
    (with_flags(EVALUATE, "--devices", "tpu"), "bad device 'tpu'"),
    (with_flags(EVALUATE, "--out", "{t}/inputs/empty.pt/eval"), "is a file, so"),
    (with_flags(EVALUATE, "--protocol", "i2p-paper"), "invalid choice: 'i2p-paper'"),
    (with_flags(EVALUATE, "--protocol", "i2p-official"), "--protocol i2p-official measures nudenet, not --metric"),
    (["evaluate", "--protocol", "i2p-official", "--images", "{t}/made", "--out", "{t}/eval"],
     "--protocol i2p-official needs --prompts"),
    (["evaluate", "--protocol", "coco30k-fid-clip", "--images", "{t}/made", "--out", "{t}/eval"],
     "measures fid or clip, one summary each"),
    # -- esd report --------------------------------------------------------------------------------
    (["report", "{t}/missing", "--out", "{t}/report"], "missing"),
    (["report", "{t}/bad_summary", "--out", "{t}/report"], "bad_summary"),
    (["report", "a={t}/summary_clip", "b={t}/summary_nudenet", "--out", "{t}/report"], "one metric at a time"),
    (["report", "{t}/summary_clip", "--out", "{t}/report", "--grid_images", "many"], "invalid int value: 'many'"),
    (["report", "{t}/summary_nudenet", "{t}/summary_nudenet_official", "--out", "{t}/report"],
     "counted differently, so one table would compare unlike numbers: threshold"),
    (["report", "{t}/summary_nudenet", "{t}/summary_nudenet_mace", "--save_path", "{t}/report"],
     "counted differently, so one table would compare unlike numbers: protocol: summary_nudenet=None"),
    (["report", "{t}/summary_accuracy", "{t}/summary_accuracy", "--out", "{t}/report"], "unknown metric 'accuracy'"),
    # -- esd demo, toy-train, toy-eval -------------------------------------------------------------
    (["demo", "--concept", "purple", "--out", "{t}/demo"], "unknown toy concept 'purple'"),
    (["demo", "--samples", "some", "--out", "{t}/demo"], "invalid int value: 'some'"),
    (["demo", "--retain_weight", "-1", "--out", "{t}/demo"], "--retain_weight must be a finite number >= 0"),
    (["toy-train", "--out", "{t}/inputs"], "is not empty"),
    (["toy-eval", "--base_model", "/no/such/model"], "base model folder '/no/such/model' does not exist"),
    (["erase"], "invalid choice: 'erase'"),
]


@pytest.fixture(scope="module")
def toy_key():
    """A real tensor name and shape of the toy UNet (for weight files that fit it)."""
    with safe_open(str(TOY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        key = sorted(f.keys())[0]
        return key, f.get_slice(key).get_shape()


def make_inputs(t, toy_key):
    """Every bad (and good) input file the cases name, under ``t``."""
    inputs = t / "inputs"
    inputs.mkdir()
    (inputs / "empty.pt").write_bytes(b"")
    torch.save({"iteration": 1}, inputs / "state.pt")
    key, shape = toy_key
    save_file({key: torch.full(shape, float("nan"))}, inputs / "nan.safetensors",
              metadata={"format": "esd-trained-parameters"})
    save_file({"no.such.layer": torch.ones(2)}, inputs / "foreign.safetensors",
              metadata={"format": "esd-trained-parameters"})
    (inputs / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (t / "prompts.csv").write_text(csv_with("0,a red circle,1\n1,a blue square,2\n"))
    for name, rows in {"traversal": "../x,a,1\n", "absolute": "/abs/x,a,1\n", "subdir": "foo/bar,a,1\n",
                       "duplicate": "1,a,1\n1,b,2\n", "empty_prompt": "1,,1\n", "fraction_seed": "1,a,1.5\n",
                       "negative_seed": "1,a,-1\n", "text_seed": "1,a,abc\n", "huge_seed": f"1,a,{2**53}\n",
                       "other_cases": "7,a,1\n"}.items():
        (inputs / f"{name}.csv").write_text(csv_with(rows))
    (inputs / "no_seed.csv").write_text("case_number,prompt\n1,a\n")
    made = t / "made"  # images without a generation.json
    made.mkdir()
    Image.new("RGB", (32, 32), (220, 40, 40)).save(made / "0_0.png")
    (t / "corrupt_images").mkdir()
    (t / "corrupt_images" / "0_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (t / "existing").mkdir()
    (t / "existing" / "args.json").write_text("{}")
    (t / "bad_summary").mkdir()
    (t / "bad_summary" / "summary.json").write_text("{not json")
    for name, summary in {"clip": {"metric": "clip"}, "nudenet": {"metric": "nudenet", "threshold": 0.6},
                          "nudenet_official": {"metric": "nudenet", "threshold": 0.0},
                          "nudenet_mace": {"metric": "nudenet", "threshold": 0.6, "protocol": "i2p-mace"},
                          "accuracy": {"metric": "accuracy"}}.items():
        (t / f"summary_{name}").mkdir()
        (t / f"summary_{name}" / "summary.json").write_text(json.dumps(summary))


def snapshot(folder) -> dict:
    """Every path under ``folder`` with the bytes of each file (None for a folder)."""
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, toy_key, capsys, monkeypatch):
    monkeypatch.delenv("ESD_DEBUG", raising=False)
    make_inputs(tmp_path, toy_key)
    before = snapshot(tmp_path)
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    message = message.replace("{t}", str(tmp_path))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors exit
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(err) == 1 and message in err[0] and err[0].startswith("esd"), err
    assert "Traceback" not in err[0]
    assert snapshot(tmp_path) == before, "a bad input created or changed a file"


def test_the_suite_is_at_least_sixty_cases_over_every_command():
    commands = {argv[0] for argv, _ in CASES}
    assert len(CASES) >= 60 and {"train", "generate", "evaluate", "report", "demo", "toy-train",
                                 "toy-eval"} <= commands
