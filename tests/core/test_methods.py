import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from helpers import every
from ldm_format import to_ldm
from tiny import tiny_flux_transformer, tiny_sd3_transformer

from esd import ESDConfig
from esd.core.methods import ALIASES, TRAIN_METHODS, compvis_block_to_diffusers, resolve_method
from esd.families.registry import FAMILIES, applies, detect_family, select_parameters


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
    assert set(expected) == {name for name, m in TRAIN_METHODS.items() if applies(m, FAMILIES["sd1"])}
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
    assert set(back) == set(sd) and every(torch.equal(back[k], sd[k]) for k in sd)
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


@pytest.fixture(scope="module")
def transformers():
    return {"sd3": tiny_sd3_transformer(), "flux": tiny_flux_transformer()}


def test_transformer_methods_select_exactly_their_parameters(transformers):
    for family, model in transformers.items():
        everything = names(model)
        text_kv = [n for n in everything if n.startswith("transformer_blocks.")
                   and n.split(".")[3] in ("add_k_proj", "add_v_proj")]
        cond_or_out = ("time_text_embed.", "norm_out.", "proj_out.")
        # Every joint block has both projections, weight and bias.
        assert len(text_kv) == 4 * len(model.transformer_blocks), family
        expected = {
            "mmdit-x": text_kv,
            "mmdit-u": [n for n in everything if n not in text_kv and not n.startswith(cond_or_out)],
            "full": everything,
        }
        if family == "flux":
            single_kv = [n for n in everything if n.startswith("single_transformer_blocks.")
                         and n.split(".")[3] in ("to_k", "to_v")]
            assert len(single_kv) == 4 * len(model.single_transformer_blocks)
            expected["mmdit-x-single"] = text_kv + single_kv
            # mmdit-u keeps the single-stream blocks (their keys and values too) and the patch embedding.
            assert set(single_kv) | {"x_embedder.weight"} <= set(expected["mmdit-u"])
        else:
            # SD3.5's attn2 is image self-attention: ESD-u keeps it; the last block has no text output.
            assert "transformer_blocks.0.attn2.to_k.weight" in expected["mmdit-u"]
            assert "pos_embed.proj.weight" in expected["mmdit-u"]
            assert not any(n.startswith("transformer_blocks.1.attn.to_add_out") for n in everything)
        assert detect_family(model).name == family
        assert set(expected) == {name for name, m in TRAIN_METHODS.items() if applies(m, FAMILIES[family])}, family
        for method, want in expected.items():
            got = select_parameters(model, method)
            assert got and sorted(got) == sorted(want), (family, method)
        assert not set(expected["mmdit-x"]) & set(expected["mmdit-u"])
        assert {n for n in everything if n.startswith(cond_or_out)} | set(expected["mmdit-x"]) | set(
            expected["mmdit-u"]) == set(everything)


def test_methods_refuse_the_wrong_family(unet, transformers):
    for method in ("xattn", "noxattn", "esd-x", "esd-u"):
        for model in transformers.values():
            with pytest.raises(ValueError, match=rf"^train method '{method}' is for the UNet .*, not the "
                               rf".*transformer; valid for it: full, mmdit-x, mmdit-u[^\n]*$"):
                select_parameters(model, method)
    for method in ("mmdit-x", "mmdit-u", "mmdit-x-single"):
        with pytest.raises(ValueError, match=rf"^train method '{method}' is for .*transformer, not the UNet "
                           r"\(SD 1.x, 2.x, XL\); valid for it: xattn, noxattn, .*esd-x, esd-x-strict$"):
            select_parameters(unet, method)
    with pytest.raises(ValueError, match=r"'mmdit-x-single' is for the FLUX.1 transformer, not the SD3/SD3.5 "
                       r"transformer; valid for it: full, mmdit-x, mmdit-u$"):
        select_parameters(transformers["sd3"], "mmdit-x-single")
    with pytest.raises(ValueError, match=r"^no train methods for a Linear; valid models: UNet2DConditionModel, "
                       r"SD3Transformer2DModel, FluxTransformer2DModel$"):
        select_parameters(torch.nn.Linear(2, 2), "full")


def test_a_method_of_another_family_is_refused_at_configuration(tiny_models):
    """ESDConfig reads the family from model_index.json and refuses before any model loads."""
    with pytest.raises(ValueError, match="'mmdit-x' is for .*, not the UNet"):
        ESDConfig(prompt="Van Gogh", train_method="mmdit-x", base_model=tiny_models["sd1"])
