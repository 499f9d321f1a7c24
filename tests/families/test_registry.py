"""One adapter per family: each tiny model's family is the same whether read from its folder's configs, from
its loaded denoiser, or from a single file of it, and every family answers the interface."""

import pytest
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from esd.families.family import Family
from esd.families.ldm_single_file import checkpoint_to_ldm
from esd.families.models import load_models
from esd.families.registry import FAMILIES, check_method, detect_family, families_of_pipeline, methods_of
from esd.families.sources import checkpoint_family, source_family


def test_every_family_reads_alike_from_its_folder_and_its_loaded_model(tiny_models, flow_models):
    folders = {**tiny_models, "sd3": flow_models["sd3"], "flux": flow_models["flux-dev"]}
    assert set(folders) == set(FAMILIES)
    for name, folder in folders.items():
        family = FAMILIES[name]
        assert source_family(folder) is family, name
        loaded = load_models(folder)
        assert loaded.family is detect_family(loaded.unet) is family, name
        assert families_of_pipeline(DiffusionPipeline.load_config(folder)["_class_name"]).count(family) == 1
        assert family.esd_x in methods_of(family) and check_method(family.esd_x, family).name == family.esd_x


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_a_unet_single_file_names_its_family_from_its_tensors(name, tiny_models, tmp_path):
    """SDXL by its second text encoder, SD 2.x by its transformers' Linear proj_in, SD 1.x otherwise: read from
    the file's header, before any weights load, as the loaded model says."""
    pipe = DiffusionPipeline.from_pretrained(tiny_models[name])
    family = FAMILIES[name]
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    ckpt = checkpoint_to_ldm(pipe.unet.state_dict(), pipe.unet.config, family.ldm_text_encoders, pipe.vae, encoders)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    assert checkpoint_family(str(path)) is family


def test_a_family_is_asked_not_compared_with_its_name():
    family = FAMILIES["sdxl"]
    assert isinstance(family, Family) and str(family) == family.name == "sdxl"
    with pytest.raises(TypeError, match="compared with the string 'sdxl'; ask the family"):
        family == "sdxl"  # noqa: B015 - the comparison itself raises
    assert family != FAMILIES["sd1"] and {family: 1}[FAMILIES["sdxl"]] == 1
