import json
import shutil

import huggingface_hub
import pytest
import torch
from helpers import every
from safetensors.torch import load_file

from esd import ESDPipeline
from esd.families.sources import DEFAULT_BASE_MODEL, TOY_MODEL_DIR

PROMPTS = ["a red circle", "a blue square"]  # the toy model's world


def pixels(images):
    return [list(im.getdata()) for im in images]


def test_eval_unlearn_arguments_and_defaults_train_save_and_reload(tmp_path):
    """eval-unlearn's ESDTechnique passes every argument by these names; its defaults are the official
    code's negative_guidance 2.0 (our eta 1) and use_fp16=True (CUDA only), and save_path is a file that
    it later passes as load_path."""
    weights = tmp_path / "esd-red.pt"
    contract = dict(model_id="toy", device="cpu", erase_concept="red", erase_from=None,
                    train_method="noxattn", negative_guidance=2.0, train_steps=2, learning_rate=5e-5, use_fp16=True)
    pipe = ESDPipeline(**contract, save_path=str(weights), load_path=None)
    assert pipe.dtype == torch.float32 and pipe.pipe.unet.dtype == torch.float32  # fp16 is for CUDA only
    images = pipe.generate(PROMPTS, seed=0, num_inference_steps=2, guidance_scale=7.5)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert pixels(pipe.generate(PROMPTS, seed=0, num_inference_steps=2)) == pixels(images)  # seeded

    # The file is the whole UNet state dict; the run's records sit in the folder named after its stem.
    records = tmp_path / "esd-red"
    assert pipe.output_dir == records and sorted(p.name for p in tmp_path.iterdir()) == ["esd-red", "esd-red.pt"]
    assert sorted(p.name for p in records.iterdir()) == ["README.md", "args.json", "loss.csv", "loss.png"]
    args = json.loads((records / "args.json").read_text())
    assert args["negative_guidance"] == 1.0 and args["mixed_precision"] == "no" and args["iterations"] == 2
    assert "../esd-red.pt" in (records / "README.md").read_text()
    state = torch.load(weights, weights_only=True)
    assert state.keys() == pipe.pipe.unet.state_dict().keys()

    # eval-unlearn's reload: the same path as save_path and load_path; nothing trains, nothing is written.
    before = weights.read_bytes()
    loaded = ESDPipeline(**contract, save_path=str(weights), load_path=str(weights))
    assert pixels(loaded.generate(PROMPTS, seed=0, num_inference_steps=2, guidance_scale=7.5)) == pixels(images)
    assert loaded.output_dir is None and weights.read_bytes() == before
    with pytest.raises(ValueError, match="already exists; pass it as load_path"):
        ESDPipeline(**contract, save_path=str(weights))
    assert weights.read_bytes() == before


def test_safetensors_save_path_holds_the_trained_tensors(tmp_path):
    weights = tmp_path / "red.safetensors"
    pipe = ESDPipeline(model_id="toy", device="cpu", erase_concept="red", train_method="xattn",
                       train_steps=2, learning_rate=1e-3, save_path=str(weights))
    images = pipe.generate(PROMPTS, seed=0, num_inference_steps=2)
    trained = load_file(weights)
    own = pipe.pipe.unet.state_dict()
    assert trained and every("attn2" in k and torch.equal(own[k], v) for k, v in trained.items())
    loaded = ESDPipeline(model_id="toy", device="cpu", load_path=str(weights))
    assert pixels(loaded.generate(PROMPTS, seed=0, num_inference_steps=2)) == pixels(images)


@pytest.mark.parametrize("save_path, message", [("weights.bin", r"must name a weights file ending in \.pt or "
                                                                "\\.safetensors"),
                                                ("a folder/", "must name a weights file"),
                                                ("bad name!.pt", "save_path's file name 'bad name!' is not a plain")])
def test_bad_save_path_is_refused_before_loading(save_path, message, tmp_path):
    # The hub model is not in the offline cache: reaching the loading step would fail otherwise.
    with pytest.raises(ValueError, match=message):
        ESDPipeline(model_id=DEFAULT_BASE_MODEL, device="cpu", erase_concept="cat", save_path=str(tmp_path / save_path))
    assert not any(tmp_path.iterdir())


def hub_cache(root, repo_id=DEFAULT_BASE_MODEL):
    """A Hugging Face hub cache in which ``repo_id`` is the toy model, as a download would leave it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(TOY_MODEL_DIR, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def test_eval_unlearn_esd_technique_round_trip(tmp_path, monkeypatch):
    wrapper = pytest.importorskip("eval_unlearn.techniques.esd.wrapper",
                                  reason="eval-unlearn is not installed (pip install esd[eval-unlearn])")
    cache = hub_cache(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read when the module loaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = tmp_path / "out" / "esd-red.pt"
    # Its defaults otherwise: model_id CompVis/stable-diffusion-v1-4 (fixed), train_method noxattn,
    # negative_guidance 2.0, learning_rate 5e-5, use_fp16 True.
    settings = dict(device="cpu", erase_concept="red", train_steps=2, save_path=str(weights))
    technique = wrapper.ESDTechnique(**settings)
    images = technique.generate(PROMPTS, seed=0, num_inference_steps=2)
    assert weights.is_file() and technique.pipeline.dtype == torch.float32
    args = json.loads((tmp_path / "out" / "esd-red" / "args.json").read_text())
    assert args["base_model"] == DEFAULT_BASE_MODEL and args["negative_guidance"] == 1.0
    assert args["train_method"] == "noxattn" and args["lr"] == 5e-5

    reloaded = wrapper.ESDTechnique(**settings, load_path=str(weights))
    again = reloaded.generate(PROMPTS, seed=0, num_inference_steps=2)
    assert pixels(again) == pixels(images)


@pytest.mark.parametrize("kwargs, message", [
    (dict(erase_concept=123), "erase_concept 123 is not a string; name the concept to erase"),
    (dict(erase_concept="cat", erase_from=["cat"]), "erase_from ['cat'] is not a string"),
    (dict(device="tpu"), "device 'tpu' is not a device; valid: cpu, cuda, cuda:N (N a GPU index, or N alone), mps"),
    (dict(device="cuda:x"), "device 'cuda:x' is not a device; valid: cpu, cuda"),
    (dict(model_id=None), "model_id None is not a model; pass a hub id such as 'CompVis/stable-diffusion-v1-4', a "
                          "local diffusers folder, or 'toy'"),
    (dict(model_id=""), "model_id '' is not a model"),
    (dict(save_path="{t}/esd.pt"), "is given without erase_concept: nothing is erased, so nothing would be saved; "
                                   "pass erase_concept to erase and save, or drop save_path"),
    (dict(erase_concept="cat", train_steps=True), "train_steps must be an integer >= 1 or None, got True"),
    (dict(erase_concept="cat", train_steps=0), "train_steps must be an integer >= 1 or None, got 0"),
    (dict(erase_concept="cat", train_steps=2.5), "train_steps must be an integer >= 1 or None, got 2.5"),
    (dict(erase_concept="cat", learning_rate=float("nan")), "learning_rate must be a finite number > 0 or None, "
                                                            "got nan"),
    (dict(erase_concept="cat", negative_guidance=float("inf")), "negative_guidance must be a finite number or None"),
    (dict(erase_concept="cat", use_fp16="yes"), "use_fp16 must be True or False, got 'yes'"),
    (dict(erase_concept="cat", preset="faithful"), "preset 'faithful' is not one of: paper, official, fast"),
    (dict(load_path="{t}/missing.pt"), "load_path '{t}/missing.pt' does not exist"),
], ids=lambda v: None if isinstance(v, dict) else v[:30])
def test_bad_arguments_are_refused_before_a_model_loads(kwargs, message, tmp_path, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("a model was loaded for a bad argument")

    monkeypatch.setattr("esd.pipeline.load_pipeline", no_loading)
    kwargs = {k: v.replace("{t}", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as e:
        ESDPipeline(**{"model_id": "toy", "device": "cpu", **kwargs})
    assert message.replace("{t}", str(tmp_path)) in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def toy_pipe():
    return ESDPipeline(model_id="toy", device="cpu")


@pytest.mark.parametrize("args, kwargs, message", [
    (([],), {}, "prompts [] is empty; pass a prompt string or a non-empty list of prompt strings"),
    ((123,), {}, "prompts must be a string or a list of strings, got 123"),
    ((["a red circle", 5],), {}, "prompts[1] 5 is not a string"),
    ((PROMPTS,), dict(seed=float("nan")), "seed must be an integer 0 <= seed < 2**53 or None, got nan"),
    ((PROMPTS,), dict(seed=-1), "seed must be an integer 0 <= seed < 2**53 or None, got -1"),
    ((PROMPTS,), dict(seed=True), "seed must be an integer 0 <= seed < 2**53 or None, got True"),
    ((PROMPTS,), dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
    ((PROMPTS,), dict(num_inference_steps=True), "num_inference_steps must be an integer >= 1, got True"),
    ((PROMPTS,), dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
    ((PROMPTS,), dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
], ids=lambda v: v[:30] if isinstance(v, str) else None)
def test_bad_generate_arguments_are_one_line_errors(toy_pipe, args, kwargs, message):
    with pytest.raises(ValueError) as e:
        toy_pipe.generate(*args, **{"num_inference_steps": 1, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_numpy_numbers_are_numbers(toy_pipe):
    """A seed or step count read from a pandas CSV is a numpy integer: accepted as the int it is."""
    import numpy as np

    a = toy_pipe.generate(PROMPTS, seed=np.int64(3), num_inference_steps=np.int64(1), guidance_scale=np.float32(7.5))
    b = toy_pipe.generate(PROMPTS, seed=3, num_inference_steps=1, guidance_scale=7.5)
    assert len(a) == len(b) > 0 and every(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_a_model_folder_a_stranger_could_hand_over_is_refused_before_diffusers_reads_it(tmp_path):
    """The API goes through the same model folder check as the commands (esd.families.sources.check_model_folder)."""
    folder = tmp_path / "model"
    shutil.copytree(TOY_MODEL_DIR, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["os", "system"]}))
    with pytest.raises(ValueError, match=r"model_index.json entry 'unet' is \['os', 'system'\], not a component "
                       r"this tool loads; valid: \['diffusers', 'UNet2DConditionModel'\] or \[null, null\]$"):
        ESDPipeline(model_id=str(folder), device="cpu")
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline", "MyPipeline"]}))
    with pytest.raises(ValueError, match=r"_class_name \['pipeline', 'MyPipeline'\] is not a pipeline this tool"):
        ESDPipeline(model_id=str(folder), device="cpu", erase_concept="red")


def test_weights_beside_an_args_json_that_is_not_a_record_are_refused_in_one_line(tmp_path):
    from esd.families.sources import ModelLoadError
    from esd.formats.weights import read_weights

    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    (tmp_path / "args.json").write_text('["base_model", "toy"]')
    with pytest.raises(ModelLoadError, match=r"args.json' beside the weights is not a run record \(a JSON object; "
                       r"it holds a list\)"):
        read_weights(tmp_path / "w.pt")
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"args.json' is unreadable .*must be a run record"):
        read_weights(tmp_path / "w.pt")
    (tmp_path / "args.json").write_text('{"base_model": ["toy"]}')
    assert read_weights(tmp_path / "w.pt")[1] == {"base_model": ""}


def test_without_save_path_no_run_folder_is_checked(tmp_path, monkeypatch):
    """ESDPipeline without save_path writes no run folder, so the folder esd train would use is not checked: an
    earlier run sitting there (./models/<run name>) does not stop it, and nothing is written beside it."""
    from esd import ESDConfig, ESDTrainer
    from esd.pipeline import _UnsavedTrainer

    monkeypatch.chdir(tmp_path)
    cfg = ESDConfig(prompt="red", train_method="xattn", base_model="toy")
    (tmp_path / "models" / cfg.run_name).mkdir(parents=True)
    (tmp_path / "models" / cfg.run_name / "args.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):  # what esd train says there
        ESDTrainer(cfg)
    _UnsavedTrainer(cfg)
    assert sorted(p.name for p in (tmp_path / "models" / cfg.run_name).iterdir()) == ["args.json"]
