"""diffusers -> original (CompVis / Stability ``sgm``) key layout: the inverse of the renaming in
diffusers' ``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), so that a file written here loads with
``from_single_file`` and in AUTOMATIC1111 / ComfyUI.

The original UNet numbers its blocks flat: ``input_blocks.0`` is ``conv_in``; each down stage then has
``layers_per_block`` (resnet, attention) blocks and one downsampler; each up stage ``layers_per_block + 1``
blocks, the last with the upsampler. Inside a transformer the names are the same in both layouts.
"""

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}"


def ldm_unet_key(key: str, config) -> str:
    """The original name (without ``model.diffusion_model.``) of the diffusers UNet key ``key``
    (a parameter, or a module name followed by ``.weight``)."""
    lpb = config["layers_per_block"]
    stride = lpb + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        n = stride * int(m[1]) + int(m[3]) + 1
        return f"input_blocks.{n}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        n = stride * int(m[1]) + int(m[3])
        return f"output_blocks.{n}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, if the block has one
        return f"output_blocks.{stride * b + lpb}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    module, _, param = key.rpartition(".")
    if module not in _UNET_TOP:
        raise ValueError(f"UNet key {key!r} has no original-layout name (not a Stable Diffusion UNet?)")
    return f"{_UNET_TOP[module]}.{param}"


def unet_to_ldm(state_dict: dict, config) -> dict:
    """A diffusers UNet state dict under original names (``model.diffusion_model.*``)."""
    return {UNET_PREFIX + ldm_unet_key(k, config): v for k, v in state_dict.items()}


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL -> ``first_stage_model.*``; the mid-block attention becomes 1x1 convs,
    and the decoder's blocks are numbered upwards, as in the original."""
    out = {}
    for key, value in state_dict.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            side, kind, b, r, layer, p = m.groups()
            b = int(b) if kind == "down" else num_blocks - 1 - int(b)
            new = f"{side}.{kind}.{b}.block.{r}.{_VAE_RESNET[layer]}.{p}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if value.ndim == 2:  # (out, in) -> (out, in, 1, 1)
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[VAE_PREFIX + new] = value
    return out


def _text_model_keys(state_dict: dict) -> dict:
    """HF CLIP keys with the ``text_model.`` prefix that original checkpoints use (transformers 5 drops it
    in memory for ``CLIPTextModel``, keeps it for ``CLIPTextModelWithProjection``)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state_dict.items() if not k.endswith("position_ids")}


_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_to_openclip(state_dict: dict) -> dict:
    """An HF CLIP text encoder in OpenCLIP's layout: q, k, v stacked into ``in_proj``, the projection
    stored transposed as one matrix."""
    sd = _text_model_keys(state_dict)
    out = {}
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # (proj, hidden) -> (hidden, proj)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            i, p = m.groups()
            parts = [sd[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(parts)  # (3 * hidden, ...)
        elif re.fullmatch(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            continue  # stacked with q above
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP name")
    return out


def checkpoint_to_ldm(unet_state_dict: dict, unet_config, text_encoder_layouts, vae, text_encoders: list) -> dict:
    """A whole Stable Diffusion model as one original-layout checkpoint: UNet, VAE, text encoder(s).
    ``text_encoder_layouts``: where the family keeps each text encoder, HF CLIP (SD 1.x, SDXL's first) or
    OpenCLIP (SD 2.x, SDXL's second), and under which prefix (Family.ldm_text_encoders)."""
    ckpt = unet_to_ldm(unet_state_dict, unet_config)
    ckpt.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    for (kind, prefix), encoder in zip(text_encoder_layouts, text_encoders, strict=True):
        sd = clip_to_openclip(encoder.state_dict()) if kind == "openclip" else _text_model_keys(encoder.state_dict())
        ckpt.update({prefix + k: v for k, v in sd.items()})
    return ckpt
