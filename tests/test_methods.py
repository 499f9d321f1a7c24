import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from ldm_format import to_ldm

from esd.methods import ALIASES, TRAIN_METHODS, compvis_block_to_diffusers, resolve_method, select_parameters


@pytest.fixture(scope="module")
def unet(tiny_models):
    return UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")


def names(unet):
    return [n for n, _ in unet.named_parameters()]


def test_every_method_selects_exactly_its_parameters(unet):
    everything = names(unet)
    time_or_out = ("time_embedding.", "conv_norm_out.", "conv_out.")
    linear_or_conv = [f"{m}.{p}" for m, module in unet.named_modules()
                      if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                      for p, _ in module.named_parameters(recurse=False)]
    expected = {
        "xattn": [n for n in everything if ".attn2." in n],
        "selfattn": [n for n in everything if ".attn1." in n],
        "full": everything,
        "noxattn": [n for n in everything if ".attn2." not in n and not n.startswith(time_or_out)],
        "notime": [n for n in everything if not n.startswith(time_or_out)],
        "xattn-strict": [n for n in everything if ".attn2.to_k." in n or ".attn2.to_v." in n],
        "xlayer": [n for n in everything if ".attn2." in n
                   and n.startswith(("up_blocks.2.attentions.0.", "up_blocks.2.attentions.2."))],
        "selflayer": [n for n in everything if ".attn1." in n
                      and n.startswith(("down_blocks.1.attentions.0.", "down_blocks.2.attentions.0."))],
        # The official code: Linear and Conv2d layers only, so no norm layer (GroupNorm, LayerNorm) trains.
        "esd-u": [n for n in linear_or_conv if ".attn2." not in n],
        "esd-all": linear_or_conv,
    }
    assert set(expected) == set(TRAIN_METHODS)
    for method, want in expected.items():
        got = select_parameters(unet, method)
        assert got == want, method
        assert got, method
    # Sanity of the groups themselves: ESD-u and ESD-x split the non-time, non-output parameters.
    assert set(expected["xattn"]) | set(expected["noxattn"]) == set(expected["notime"])
    assert not set(expected["xattn"]) & set(expected["noxattn"])


def test_aliases_and_unknown_method(unet):
    for alias, name in ALIASES.items():
        assert select_parameters(unet, alias) == select_parameters(unet, name)
    with pytest.raises(ValueError, match="unknown train method 'attn'.*xattn.*esd-x"):
        resolve_method("attn")


def test_compvis_block_mapping_agrees_with_diffusers_conversion(unet):
    """xlayer/selflayer name CompVis blocks; our mapping must match diffusers' own ldm conversion."""
    sd = unet.state_dict()
    ldm = to_ldm(sd)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ldm_name = {id(v): k for k, v in ldm.items()}
    for kind, index, module in [("output", 6, "attn2"), ("output", 8, "attn2"), ("input", 4, "attn1"),
                                ("input", 7, "attn1")]:
        prefix = compvis_block_to_diffusers(kind, index)
        ours = [k for k in sd if k.startswith(prefix) and module in k]
        theirs = [k for k in sd if f"model.diffusion_model.{kind}_blocks.{index}." in ldm_name[id(sd[k])]
                  and module in k]
        assert ours == theirs and ours
    with pytest.raises(ValueError, match="no attention"):
        compvis_block_to_diffusers("input", 3)
