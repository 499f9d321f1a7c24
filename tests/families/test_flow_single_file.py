"""Original single-file SD3/SD3.5 and FLUX.1 transformer checkpoints (``--ckpt_path`` with ``--ckpt_config``):
written here from tiny pipelines in the original layouts (tests/flow_format.py), they load to the folder's exact
tensors, train bit-identically to the folder, get the folder's defaults and checks, and bad pairings are one line."""

import re
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from flow_format import TO_ORIGINAL
from helpers import every
from safetensors.torch import load_file, save_file

from esd import ESDConfig
from esd.cli import main
from esd.families.flow_single_file import flow_checkpoint_family, flux_to_diffusers
from esd.families.models import load_denoiser, load_models
from esd.families.sources import ModelLoadError

KINDS = {"sd3": "sd3", "flux-dev": "flux"}  # tiny pipeline kind -> family


@pytest.fixture(scope="module")
def single_files(flow_models, tmp_path_factory):
    """kind -> (pipeline folder, its transformer as an original-layout .safetensors file)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for kind, family in KINDS.items():
        folder = flow_models[kind]
        transformer = load_denoiser(folder)
        path = root / f"{kind}-original.safetensors"
        save_file(TO_ORIGINAL[family](transformer.state_dict(), transformer.config), path)
        out[kind] = (folder, str(path))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_original_file_loads_the_folders_transformer(kind, single_files):
    folder, path = single_files[kind]
    assert flow_checkpoint_family(path) == KINDS[kind]
    ref, m = load_models(folder), load_models(ckpt_path=path, ckpt_config=folder)
    assert (m.family, m.prediction_type, m.native_resolution, len(m.text_encoders)) == \
        (ref.family, "flow", ref.native_resolution, len(ref.text_encoders))
    ours, theirs = m.unet.state_dict(), ref.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert every(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert type(m.scheduler) is type(ref.scheduler) and m.scheduler.config == ref.scheduler.config


@pytest.mark.parametrize("kind", KINDS)
def test_training_from_the_file_equals_training_from_the_folder(kind, single_files, tmp_path):
    """Two seeded iterations of mmdit-x (FLUX: its bf16 and gradient-checkpointing defaults, and the fp32
    reload of the frozen weights at save) give the same bytes whichever way the model came in; the model
    card loads the file's transformer into the config folder's pipeline."""
    folder, path = single_files[kind]
    runs = {}
    for name, source in [("folder", ["--base_model", folder]),
                         ("file", ["--ckpt_path", path, "--ckpt_config", folder])]:
        rc = main(["train", "--prompt", "cat", "--train_method", "mmdit-x", *source, "--image_size", "64",
                   "--ddim_steps", "3", "--iterations", "2", "--devices", "cpu", "--lr", "1e-2", "--seed", "0",
                   "--save_path", str(tmp_path / name), "--name", "run"])  # one name: the files are named after it
        assert rc == 0
        runs[name] = tmp_path / name / "run"
    files = sorted(p.name for p in runs["folder"].iterdir() if p.suffix in (".pt", ".safetensors"))
    assert files and files == sorted(p.name for p in runs["file"].iterdir() if p.suffix in (".pt", ".safetensors"))
    for f in files:
        a, b = [load_file(r / f) if f.endswith(".safetensors") else torch.load(r / f, weights_only=True)
                for r in (runs["folder"], runs["file"])]
        assert a.keys() == b.keys() and every(torch.equal(a[k], b[k]) for k in a), f
    base = load_denoiser(folder).state_dict()
    trained = load_file(runs["file"] / next(f for f in files if f.endswith(".safetensors")))
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # it did train
    cls = "SD3Transformer2DModel" if KINDS[kind] == "sd3" else "FluxTransformer2DModel"
    card = (runs["file"] / "README.md").read_text()  # its loading lines: the transformer file, the rest the folder's
    assert f"transformer = {cls}.from_single_file({path!r}, config={folder!r}" in card
    assert f"DiffusionPipeline.from_pretrained({folder!r}, transformer=transformer)" in card


def test_config_defaults_and_checks_follow_the_files_family(single_files):
    """The family is read from the file's header before any weights load: FLUX's bf16 and gradient
    checkpointing defaults apply, and --preset paper (a DDIM loop), UNet methods and --adversarial (one
    text encoder) are refused as for the folder."""
    folder, path = single_files["flux-dev"]
    for source in ({"base_model": folder}, {"ckpt_path": path, "ckpt_config": folder}):
        cfg = ESDConfig(prompt="cat", train_method="mmdit-x", **source)
        assert (cfg.family.name, cfg.mixed_precision, cfg.gradient_checkpointing) == ("flux", "bf16", True)
        with pytest.raises(ValueError, match="--preset paper and --timestep_mode original"):
            ESDConfig(prompt="cat", train_method="mmdit-x", preset="paper", **source)
        with pytest.raises(ValueError, match="train method 'xattn' is for the UNet"):
            ESDConfig(prompt="cat", train_method="xattn", **source)
        with pytest.raises(ValueError, match=r"--adversarial supports SD 1.x and 2.x models .* is a flux transformer"):
            ESDConfig(prompt="cat", train_method="mmdit-x", adversarial="prefix", **source)


@pytest.mark.parametrize("config, message", [
    (None, r"--ckpt_path '.*sd3-original.safetensors' is an original sd3 transformer checkpoint without text "
           r"encoders or VAE; pass --ckpt_config with a StableDiffusion3Pipeline folder or hub id"),
    ("toy", r"--ckpt_path '.*sd3-original.safetensors' is an original sd3 checkpoint but --ckpt_config 'toy' is "
            r"a unet pipeline; pass a StableDiffusion3Pipeline folder or hub id"),
    ("flux-dev", r"is an original sd3 checkpoint but --ckpt_config '.*flux-dev' is a flux pipeline"),
])
def test_a_flow_file_without_its_own_pipeline_is_one_line(config, message, single_files, tmp_path, capsys):
    folder, path = single_files["sd3"]
    config = single_files[config][0] if config in single_files else config
    with pytest.raises(ModelLoadError, match=message):
        load_models(ckpt_path=path, ckpt_config=config)
    flags = ["--ckpt_config", config] if config else []
    rc = main(["train", "--prompt", "cat", "--train_method", "mmdit-x", "--ckpt_path", path, *flags,
               "--devices", "cpu", "--save_path", str(tmp_path), "--name", "bad"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "bad").exists()


def test_a_ckpt_file_is_read_as_well(single_files, tmp_path):
    """A pickled original (``torch.save``, Lightning's ``state_dict`` nesting) is told apart and loaded too."""
    folder, path = single_files["flux-dev"]
    ckpt = tmp_path / "flux.ckpt"
    torch.save({"state_dict": load_file(path)}, ckpt)
    assert flow_checkpoint_family(str(ckpt)) == "flux"
    ours, theirs = load_denoiser("", str(ckpt), folder).state_dict(), load_denoiser(folder).state_dict()
    assert every(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_flux_conversion_matches_diffusers_at_flux1_width(single_files):
    """esd's FLUX.1 key conversion (width from the config) gives diffusers' own conversion's tensors at the
    width diffusers fixes (3072: heads 24 x 128). The single blocks' fused linear1 is the width-dependent
    part: it is given FLUX.1's rows (3 x 3072 + 4 x 3072) and one column, so the check stays small."""
    original = load_file(single_files["flux-dev"][1])
    rows = 3 * 3072 + 4 * 3072
    for i in range(2):
        original[f"single_blocks.{i}.linear1.weight"] = torch.randn(rows, 1)
        original[f"single_blocks.{i}.linear1.bias"] = torch.randn(rows)
    config = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=2, num_single_layers=2,
                             guidance_embeds=True)
    ours = flux_to_diffusers(dict(original), config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert ours.keys() == theirs.keys()
    assert every(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
    """flow_checkpoint_family reads each file once (the settings' checks, loading and saving all ask), but a file
    written anew at the same path is a new file: its names are read again."""
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, path)
    assert flow_checkpoint_family(str(path)) is None
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, path)
    assert flow_checkpoint_family(str(path)) == "flux"
