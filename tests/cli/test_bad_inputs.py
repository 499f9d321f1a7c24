"""Bad input to every command: exit code 2, one error line that names the problem, no traceback, and
not one file created or changed anywhere under the test's folder (inputs included), whatever the
input tries. The commands run in-process (``esd.cli.main``); each case fails before any training or
generation, most before a model loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DATA, ROOT, snapshot
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from esd.cli import main
from esd.families.sources import TOY_MODEL_DIR

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
    # -- model folders, devices and run records from strangers (train, export, generate, attack) -------
    (with_flags(TRAIN, "--base_model", "{t}/inputs/models/list_class"),
     "model_index.json's _class_name ['pipeline', 'MyPipeline'] is not a pipeline this tool loads; valid: "
     "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"),
    (["export", "{t}/inputs/nan.safetensors", "--format", "lora", "--out", "{t}/lora.safetensors",
      "--base_model", "{t}/inputs/models/list_class"], "_class_name ['pipeline', 'MyPipeline'] is not a pipeline"),
    (with_flags(TRAIN, "--train_method", "full", "--ckpt_path", "{t}/inputs/flux.safetensors", "--ckpt_config",
                "{t}/inputs/models/list_class"),
     "_class_name ['pipeline', 'MyPipeline'] is not a pipeline"),
    (with_flags(TRAIN, "--base_model", "{t}/inputs/models/other_pipeline"),
     "_class_name 'MyPipeline' is not a pipeline this tool loads"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/os_system"),
     "model_index.json entry 'unet' is ['os', 'system'], not a component this tool loads; valid: "
     "['diffusers', 'UNet2DConditionModel'] or [null, null]"),
    (with_flags(TRAIN, "--base_model", "{t}/inputs/models/os_system"), "entry 'unet' is ['os', 'system']"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/other_library"),
     "entry 'text_encoder' is ['my_lib', 'CLIPTextModel'], not a component this tool loads"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/other_component"),
     "entry 'controlnet' is ['diffusers', 'ControlNetModel'], not a component this tool loads; valid components:"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/string_component"), "entry 'unet' is 'os.system'"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/custom_code"),
     "holds custom code (unet/modeling.py); this tool loads diffusers and transformers classes only"),
    (with_flags(GENERATE, "--base_model", "{t}/inputs/models/auto_map"), "unet/config.json has an auto_map"),
    (with_flags(TRAIN, "--base_model", "{t}/inputs/models/index_list"), "model_index.json is not a JSON object"),
    (with_flags(GENERATE, "--device", "tpu9"), "--device 'tpu9' is not a device; valid: cpu, cuda, cuda:N"),
    (with_flags(GENERATE, "--device", "cuda:x"), "--device 'cuda:x' is not a device"),
    (["attack", "--weights", "{t}/inputs/empty.pt", "--prompts", "{t}/prompts.csv", "--attack", "prefix",
      "--concept", "red", "--out", "{t}/attack", "--base_model", "toy", "--devices", "tpu9"],
     "--device 'tpu9' is not a device"),
    (with_flags(GENERATE, "--esd_path", "{t}/inputs/list_args/w.pt"),
     "args.json' beside the weights is not a run record (a JSON object; it holds a list)"),
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
    make_model_folders(inputs / "models")
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2)}, inputs / "flux.safetensors")
    (inputs / "list_args").mkdir()
    torch.save({key: torch.zeros(shape)}, inputs / "list_args" / "w.pt")
    (inputs / "list_args" / "args.json").write_text('["base_model", "toy"]')
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


def make_model_folders(root):
    """Model folders a stranger could hand over: the toy model's model_index.json with one entry
    changed, or with custom code beside it (no weights: each is refused before any is read)."""
    index = json.loads((TOY_MODEL_DIR / "model_index.json").read_text())
    for name, changes in {"list_class": {"_class_name": ["pipeline", "MyPipeline"]},
                          "other_pipeline": {"_class_name": "MyPipeline"}, "os_system": {"unet": ["os", "system"]},
                          "other_library": {"text_encoder": ["my_lib", "CLIPTextModel"]},
                          "other_component": {"controlnet": ["diffusers", "ControlNetModel"]},
                          "string_component": {"unet": "os.system"}, "custom_code": {}, "auto_map": {}}.items():
        (root / name / "unet").mkdir(parents=True)
        (root / name / "model_index.json").write_text(json.dumps({**index, **changes}))
    (root / "custom_code" / "unet" / "modeling.py").write_text("import os\n")
    (root / "auto_map" / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "auto_map": {"AutoModel": "modeling.MyUNet"}}))
    (root / "index_list").mkdir()
    (root / "index_list" / "model_index.json").write_text("[]")


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, toy_key, capsys, monkeypatch):
    monkeypatch.delenv("ESD_DEBUG", raising=False)
    make_inputs(tmp_path, toy_key)
    before = snapshot(tmp_path, folders=True)
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
    assert snapshot(tmp_path, folders=True) == before, "a bad input created or changed a file"


def test_the_suite_is_at_least_sixty_cases_over_every_command():
    commands = {argv[0] for argv, _ in CASES}
    assert len(CASES) >= 60 and {"train", "generate", "evaluate", "report", "demo", "toy-train",
                                 "toy-eval"} <= commands


# -- silent accepts, now refused up front (each case runs through the suite's own check above) -----------------------
ATTACK = ["attack", "--weights", "{t}/inputs/nan.safetensors", "--prompts", "{t}/prompts.csv", "--attack", "prefix",
          "--concept", "red", "--out", "{t}/attack", "--base_model", "toy", "--devices", "cpu"]
NOT_UTF8 = b"case_number,prompt,evaluation_seed\n0,a caf\xe9 circle,1\n"  # Latin-1
UTF16 = "case_number,prompt,evaluation_seed\n0,a red circle,1\n".encode("utf-16")  # starts b"\xff\xfe"
REFUSED = [
    (TRAIN + ["--train_text_encoder", "--save_format", "trained", "--text_encoder_lr", "inf"],
     "--text_encoder_lr must be a positive number, not inf"),
    (TRAIN + ["--train_text_encoder", "--save_format", "trained", "--text_encoder_lr=-inf"],
     "--text_encoder_lr must be a positive number, not -inf"),
    (with_flags(TRAIN, "--adversarial", "prefix", "--adv_tokens", "100"),
     "--adv_tokens 100 does not fit before the prompt 'cat': it is 3 tokens and the tokenizer's limit is 77 with "
     "BOS and EOS, so at most 72 prefix tokens fit"),
    (with_flags(ATTACK, "--tokens", "100"),
     "--tokens 100 leaves no room for a prompt: the tokenizer's limit is 77 tokens with BOS and EOS, so at most 74"),
    (with_flags(ATTACK, "--tokens", "75"), "--tokens 75 leaves no room for a prompt"),
    (with_flags(TRAIN, "--retain_weight", "2"), "--retain_weight 2.0 set without --retain_prompts"),
    (with_flags(TRAIN, "--export_rank", "4"), "--export_rank set without --export, which it configures; add "
     "--export FORMAT (one or more of: lora, single-file, diffusers)"),
    (with_flags(TRAIN, "--export_rank", "4", "--export_dtype", "fp16"),
     "--export_rank, --export_dtype set without --export, which they configure"),
    (["evaluate", "--protocol", "imagenette-paper", "--images", "{t}/made", "--out", "{t}/eval", "--prompts",
      "{t}/prompts.csv", "--erased_classes", "cat"],
     "{t}/prompts.csv: no column --label_column 'class' (--protocol imagenette-paper scores and counts images per "
     "class by it); columns found: case_number, prompt, evaluation_seed"),
    (with_flags(EVALUATE, "--prompts", "{t}/prompts.csv", "--erased_classes", "cat"),
     "no column --label_column 'class' (--erased_classes are looked up in it)"),
    (["demo", "--base_model", "CompVis/stable-diffusion-v1-4", "--out", "{t}/demo"],
     "--base_model 'CompVis/stable-diffusion-v1-4' is not a toy model; the demo judges the toy world's colours and "
     "shapes, so use one of: toy, toy-dit, or a folder made by esd toy-train"),
    (["demo", "--base_model", "{t}/more/sd", "--out", "{t}/demo"], "--base_model '{t}/more/sd' is not a toy model"),
    (with_flags(GENERATE, "--prompts_path", "{t}/more/latin1.csv"),
     "prompt CSV '{t}/more/latin1.csv' is not UTF-8 text (undecodable byte 0xe9); save it as UTF-8"),
    (with_flags(GENERATE, "--prompts_path", "{t}/more/utf16.csv"),
     "prompt CSV '{t}/more/utf16.csv' is not UTF-8 text (undecodable byte 0xff)"),
    (with_flags(GENERATE, "--prompts_path", "{t}/more/empty.csv"),
     "prompt CSV '{t}/more/empty.csv' is empty; a prompt CSV starts with a header row"),
    (with_flags(EVALUATE, "--prompts", "{t}/more/latin1.csv"), "--prompts '{t}/more/latin1.csv' is not UTF-8 text"),
    (with_flags(EVALUATE, "--prompts", "{t}/more/empty.csv"), "--prompts '{t}/more/empty.csv' is empty"),
    (with_flags(ATTACK, "--prompts", "{t}/more/utf16.csv"), "prompt CSV '{t}/more/utf16.csv' is not UTF-8 text"),
    (with_flags(ATTACK, "--prompts", "{t}/more/empty.csv"), "prompt CSV '{t}/more/empty.csv' is empty"),
    (with_flags(TRAIN, "--retain_prompts", "{t}/more/latin1.csv"),
     "--retain_prompts '{t}/more/latin1.csv' is not UTF-8 text (undecodable byte 0xe9)"),
    (with_flags(TRAIN, "--retain_prompts", "{t}/more/empty.csv"), "--retain_prompts '{t}/more/empty.csv' is empty"),
    (["demo", "--samples", "0", "--out", "{t}/demo"], "--samples must be a positive integer (>= 1), got 0"),
    (["demo", "--iterations", "0", "--out", "{t}/demo"], "--iterations must be a positive integer (>= 1), got 0"),
    (["demo", "--lr", "nan", "--out", "{t}/demo"], "--lr must be a finite number > 0, got nan"),
    (["toy-eval", "--samples", "0"], "--samples must be a positive integer (>= 1), got 0"),
    (["toy-eval", "--base_model", "{t}/more/sd"], "--base_model '{t}/more/sd' is not a toy model"),
    (["demo", "--base_model", "{t}/more/sd5", "--out", "{t}/demo"], "--base_model '{t}/more/sd5' is not a toy model"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[f"{c[0][0]}-refused-{i}" for i, c in enumerate(REFUSED)])
def test_settings_once_accepted_silently_are_refused_in_one_line(argv, message, tmp_path, toy_key, capsys,
                                                                monkeypatch):
    more = tmp_path / "more"
    (more / "sd" / "unet").mkdir(parents=True)  # a diffusers folder that no toy recipe made
    (more / "sd" / "model_index.json").write_text((TOY_MODEL_DIR / "model_index.json").read_text())
    shutil.copytree(more / "sd", more / "sd5")
    (more / "sd5" / "recipe.json").write_text("5")  # JSON, but not a toy recipe's record
    (more / "latin1.csv").write_bytes(NOT_UTF8)
    (more / "utf16.csv").write_bytes(UTF16)
    (more / "empty.csv").write_bytes(b"")
    test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, toy_key, capsys, monkeypatch)


def test_a_prefix_that_just_fits_is_accepted():
    """The room is 77 - BOS - EOS - the prompt's own tokens: 'cat' is 3 toy tokens, so 72 fit and 73 do not."""
    from esd.train.attacks.prefix import check_prefix_fits, stored_tokenizer
    from esd.train.config import ESDConfig

    tokenizer = stored_tokenizer("toy")
    check_prefix_fits(tokenizer, 72, ["cat"], "--adv_tokens")
    with pytest.raises(ValueError, match="at most 72 prefix tokens fit"):
        check_prefix_fits(tokenizer, 73, ["cat"], "--adv_tokens")
    ESDConfig(prompt="cat", train_method="xattn", base_model="toy", devices="cpu", adversarial="prefix",
              adv_tokens=72)  # accepted: no error
    # esd attack over a CSV: a prompt the prefix cuts is counted in one warning line, not refused
    warned = []
    check_prefix_fits(tokenizer, 5, ["cat", "a " * 71 + "cat", "a " * 80], "--tokens", warn=warned.append)
    assert len(warned) == 1 and "2 of 3 prompts are cut at the tokenizer's 77 tokens" in warned[0]
    assert "\n" not in warned[0]
    check_prefix_fits(tokenizer, 5, ["cat"], "--tokens", warn=warned.append)
    assert len(warned) == 1


def test_the_demo_takes_every_toy_model_and_a_retain_weight_with_its_prompts(tmp_path):
    from esd.toy.demo import check_toy_model
    from esd.train.config import ESDConfig

    check_toy_model("toy")
    check_toy_model(str(TOY_MODEL_DIR))  # a folder toy-train made (its recipe.json)
    (tmp_path / "r.txt").write_text("a dog\n")
    cfg = ESDConfig(prompt="cat", train_method="xattn", base_model="toy", devices="cpu",
                    retain_prompts=str(tmp_path / "r.txt"), retain_weight=2.0)
    assert cfg.retain_weight == 2.0


@pytest.mark.parametrize("name, text", [("r.txt", "a dog\na bird\n"),
                                        ("r.csv", "case_number,prompt,evaluation_seed\n0,a dog,1\n1,a bird,2\n")])
def test_a_byte_order_mark_is_not_part_of_the_first_retain_prompt(tmp_path, name, text):
    from esd.train.robust_settings import read_retain_prompts

    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")  # as Notepad saves UTF-8
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    prompts = read_retain_prompts(str(path), ["cat"])
    assert prompts == ["a dog", "a bird"] and "\ufeff" not in prompts[0]


# -- late errors, now refused before the expensive work; Ctrl-C is one line and leaves no temporary file ------------
def forbid(monkeypatch, *targets: str) -> None:
    """Each ``module.function`` in ``targets`` raises if called: a refusal that reaches one came too late."""
    import importlib

    for target in targets:
        module, name = target.rsplit(".", 1)

        def refuse(*args, _what=target, **kwargs):
            raise AssertionError(f"{_what} was called: the refusal came after the expensive work")

        monkeypatch.setattr(importlib.import_module(module), name, refuse)


def add_more_inputs(t, toy_key) -> None:
    """Inputs of the cases below, beside the suite's (made before its snapshot, so they must stay as made)."""
    from safetensors.torch import load_file

    more = t / "more"
    more.mkdir()
    (more / "header_only.csv").write_text(csv_with(""))
    key, _ = toy_key
    real = load_file(str(TOY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"))[key]
    save_file({key: real}, more / "fits.safetensors", metadata={"format": "esd-trained-parameters"})
    (more / "classes.csv").write_text("case_number,prompt,evaluation_seed,class\n0,a church,1,church\n")
    (more / "readonly").mkdir()


def test_attack_with_a_header_only_prompt_csv_is_refused_before_a_model_loads(tmp_path, toy_key, capsys,
                                                                             monkeypatch):
    add_more_inputs(tmp_path, toy_key)
    forbid(monkeypatch, "esd.attack.run.load_pipeline", "esd.attack.run.make_judge", "esd.attack.run.draw")
    test_bad_input_is_one_line_and_writes_nothing(
        with_flags(ATTACK, "--prompts", "{t}/more/header_only.csv", "--weights", "{t}/more/fits.safetensors"),
        "no prompts in '{t}/more/header_only.csv' (a header row only)", tmp_path, toy_key, capsys, monkeypatch)


@pytest.mark.parametrize("weights, message, loads", [
    ("{t}/inputs/corrupt.safetensors", "could not read '{t}/inputs/corrupt.safetensors' as safetensors", False),
    ("{t}/inputs/empty.pt", "as a weights-only torch file (EOFError", False),
    ("{t}/inputs/foreign.safetensors", "does not fit toy: 1 unexpected keys (no.such.layer)", True),
    ("{t}/inputs/nan.safetensors", "holds NaN or Inf in 1 tensors", True),
], ids=["corrupt", "empty", "foreign", "nan"])
def test_attack_weights_are_checked_before_any_image_is_drawn(weights, message, loads, tmp_path, toy_key, capsys,
                                                              monkeypatch):
    """An unreadable file before a model loads; one that does not fit the base model once it is loaded, before
    the references are drawn: no OUT/images/ (nor OUT) is left behind."""
    forbid(monkeypatch, "esd.attack.run.draw", "esd.attack.run.save_images",
           *(() if loads else ("esd.attack.run.load_pipeline",)))
    test_bad_input_is_one_line_and_writes_nothing(with_flags(ATTACK, "--weights", weights), message, tmp_path,
                                                  toy_key, capsys, monkeypatch)


def temporaries(folder) -> list:
    """atomic_write's temporary files and write_folder's temporary folders left under ``folder``."""
    return [p for p in folder.rglob("*") if ".esd-tmp" in p.name or ".esd-probe" in p.name]


def interrupted(argv, capsys, monkeypatch) -> list[str]:
    """Run ``argv``; assert exit code 130 and one stderr line saying so, without a traceback."""
    monkeypatch.delenv("ESD_DEBUG", raising=False)
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 130, err
    assert len(err) == 1 and f"esd {argv[0]}: interrupted; no file was left half-written" in err[0], err
    assert "Traceback" not in err[0]
    return err


def toy_run_folder(folder, toy_key):
    """A run folder of the toy model as esd train writes it: args.json and one trained tensor, moved a little."""
    from safetensors.torch import load_file

    from esd.formats.weights import save_trained_parameters

    key, _ = toy_key
    tensor = load_file(str(TOY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"))[key]
    folder.mkdir()
    save_trained_parameters({key: tensor + 0.01}, folder / f"{folder.name}.safetensors",
                            {"base_model": "toy", "train_method": "full", "prompt": "red"})
    (folder / "args.json").write_text(json.dumps({"base_model": "toy", "ckpt_path": None, "prompt": "red",
                                                  "train_method": "full"}))
    return folder


def test_ctrl_c_in_a_single_file_export_is_one_line_and_leaves_no_temporary_file(tmp_path, toy_key, capsys,
                                                                                monkeypatch):
    import esd.formats.exports as export_module

    run = toy_run_folder(tmp_path / "run", toy_key)

    def half_then_ctrl_c(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "save_file", half_then_ctrl_c)
    out = tmp_path / "model.safetensors"
    interrupted(["export", run, "--format", "single-file", "--out", out], capsys, monkeypatch)
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_ctrl_c_in_a_diffusers_export_keeps_the_old_folder_and_removes_the_temporary_one(where, tmp_path, toy_key,
                                                                                        capsys, monkeypatch):
    """--overwrite of an export: Ctrl-C while the new folder is written, or between moving the old one away
    and renaming the new one into place, leaves the old folder whole under its name and no temporary folder."""
    import os

    from diffusers import DiffusionPipeline

    run = toy_run_folder(tmp_path / "run", toy_key)
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "model_index.json").write_text((TOY_MODEL_DIR / "model_index.json").read_text())
    (out / "mine.txt").write_text("the old export")
    if where == "writing":
        def half_then_ctrl_c(self, folder, *args, **kwargs):
            (Path(folder) / "unet").mkdir()
            (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

        monkeypatch.setattr(DiffusionPipeline, "save_pretrained", half_then_ctrl_c)
    else:
        real_replace = os.replace

        def ctrl_c_at_the_new_folder(src, dst):
            if Path(src).name.endswith(".esd-tmpdir"):
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", ctrl_c_at_the_new_folder)
    interrupted(["export", run, "--format", "diffusers", "--out", out, "--overwrite"], capsys, monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "model_index.json"]
    assert (out / "mine.txt").read_text() == "the old export"
    assert temporaries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "run"]


def test_ctrl_c_in_an_attack_is_one_line_and_leaves_no_half_image(tmp_path, toy_key, capsys, monkeypatch):
    from PIL import Image as PILImage

    add_more_inputs(tmp_path, toy_key)
    (tmp_path / "prompts.csv").write_text(csv_with("0,a red circle,1\n"))

    def half_then_ctrl_c(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PILImage.Image, "save", half_then_ctrl_c)
    argv = [a.replace("{t}", str(tmp_path)) for a in with_flags(
        ATTACK, "--weights", "{t}/more/fits.safetensors", "--samples", "1", "--ddim_steps", "1", "--steps", "1")]
    interrupted(argv, capsys, monkeypatch)
    assert temporaries(tmp_path) == [] and not list((tmp_path / "attack").rglob("*.png"))


@pytest.mark.parametrize("argv, missing, message", [
    (["reproduce", "nudity", "--protocol", "i2p-official", "--prompts", "{data}/i2p_layout.csv"], "nudenet",
     "reproduce nudity (--protocol i2p-official) measures nudenet, which needs the nudenet package (not "
     "installed): pip install nudenet==3.4.2"),
    (["reproduce", "objects", "--prompts", "{t}/more/classes.csv"], "torchvision",
     "measures classify, which needs the torchvision package (not installed): pip install torchvision"),
    (["reproduce", "art", "--prompts", "{data}/i2p_layout.csv"], None,
     "measures lpips, which needs torchvision's ImageNet alexnet weights for LPIPS: not in the torch hub cache"),
    (["reproduce", "coco", "--prompts", "{data}/coco_30k_head.csv"], None,
     "measures clip, which needs the CLIP model 'openai/clip-vit-large-patch14': not in the Hugging Face cache, "
     "and the hub is off (HF_HUB_OFFLINE); offline, pass --clip_model with a local folder"),
], ids=["nudenet", "torchvision", "lpips-offline", "clip-offline"])
def test_reproduce_checks_what_its_metrics_need_before_training(argv, missing, message, tmp_path, toy_key, capsys,
                                                               monkeypatch):
    """A metric that cannot run is one line before anything is trained or drawn (here: nudenet and torchvision
    reported missing, the torch hub cache empty and its server unreachable, the Hugging Face hub off)."""
    import importlib.util

    import huggingface_hub
    import torch
    from huggingface_hub import constants

    add_more_inputs(tmp_path, toy_key)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-cache"))
    monkeypatch.setattr("esd.reproduce.checks.unreachable", lambda url: "URLError: no network")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    forbid(monkeypatch, "esd.reproduce.run.train_esd", "esd.reproduce.run.generate_images",
           "esd.reproduce.run.evaluate")
    data = DATA
    argv = [a.replace("{data}", str(data)) for a in argv] + ["--base_model", "toy", "--limit", "1", "--devices",
                                                             "cpu", "--out", "{t}/rep"]
    test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, toy_key, capsys, monkeypatch)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--train_method", "mmdit-x"], "train method 'mmdit-x' is for the SD3/SD3.5 transformer or FLUX.1 "
     "transformer, not the UNet (SD 1.x, 2.x, XL); valid for it: xattn, noxattn"),
    (["demo", "--base_model", "toy-dit", "--train_method", "xattn"], "train method 'xattn' is for the UNet"),
    (["demo", "--iterations", "0"], "--iterations must be a positive integer (>= 1), got 0"),
    (["demo", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["demo", "--out", "/proc/esd-demo"], "so /proc/esd-demo cannot be written"),  # root too: nothing is made there
    (["demo", "--out", "{t}/inputs/empty.pt/demo"], "is a file, so"),
], ids=["family", "family-dit", "iterations", "lr", "proc", "under-a-file"])
def test_demo_settings_are_checked_before_any_image_is_drawn(argv, message, tmp_path, toy_key, capsys, monkeypatch):
    forbid(monkeypatch, "esd.toy.demo.load_toy_pipeline", "esd.toy.measure.sample", "esd.toy.demo.train_esd")
    if "--out" not in argv:
        argv = argv + ["--out", "{t}/demo"]
    test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, toy_key, capsys, monkeypatch)


def test_demo_refuses_a_folder_it_cannot_create_files_in_even_as_root(tmp_path, toy_key, capsys, monkeypatch):
    """os.access answers from the permission bits (yes, for root); the demo's check creates a file. Here the
    folder is read-only for a user, and for root the creation fails as on a read-only mount."""
    import errno
    import os

    add_more_inputs(tmp_path, toy_key)
    readonly = tmp_path / "more" / "readonly"
    real_open = os.open

    def read_only_mount(path, *args, **kwargs):
        if Path(path).parent == readonly:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_mount)
    forbid(monkeypatch, "esd.toy.demo.load_toy_pipeline", "esd.toy.measure.sample", "esd.toy.demo.train_esd")
    readonly.chmod(0o555)
    try:
        test_bad_input_is_one_line_and_writes_nothing(
            ["demo", "--out", "{t}/more/readonly/demo"], "so {t}/more/readonly/demo cannot be written", tmp_path,
            toy_key, capsys, monkeypatch)
    finally:
        readonly.chmod(0o755)


def test_train_without_cuda_says_so_before_the_hub_is_asked(tmp_path, toy_key, capsys, monkeypatch):
    """--devices 0 on a machine without CUDA: one line naming the valid choice, and not one hub look-up (the
    default base model is a hub id, whose configs the other settings' checks read)."""
    import torch
    from diffusers import DiffusionPipeline

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(DiffusionPipeline, "load_config", classmethod(lambda cls, *a, **k: asked.append(a)))
    argv = ["train", "--prompt", "cat", "--train_method", "xattn", "--devices", "0", "--save_path", "{t}/runs"]
    test_bad_input_is_one_line_and_writes_nothing(argv, "device '0' requested but CUDA is not available", tmp_path,
                                                  toy_key, capsys, monkeypatch)
    assert asked == [], "the hub was asked before the device was checked"


def test_the_paper_script_without_cuda_is_one_line_and_asks_no_hub(tmp_path):
    """python train-scripts/train-esd.py --devices 0 with no GPU visible: the one error line, no
    huggingface_hub warning or retries before it (the hub is not switched off here: it is never asked)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ESD_DEBUG")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = ROOT / "train-scripts" / "train-esd.py"
    done = subprocess.run([sys.executable, str(script), "--prompt", "cat", "--train_method", "xattn", "--devices",
                           "0", "--save_path", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1, err
    assert "CUDA is not available" in err[0] and "valid: 'cpu'" in err[0]
    assert list(tmp_path.iterdir()) == []
