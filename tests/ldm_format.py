"""Write a diffusers SD 1.x UNet state dict with CompVis ``ldm`` key names, so the
tests can check loading of original-format weights without downloading any.

The mapping is the inverse of the renaming in diffusers' ``convert_ldm_unet_checkpoint``
(CompVis numbers blocks flat: see ``esd.methods.compvis_block_to_diffusers``)."""

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def to_ldm(state_dict: dict, layers_per_block: int = 2, up_has_attention=(False, True, True, True)) -> dict:
    stride = layers_per_block + 1
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = stride * b + i + 1
            new = f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = stride * b + i
            new = f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{stride * b + layers_per_block}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            new = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
                   "conv_out": "out.2"}[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]
        out["model.diffusion_model." + new] = value
    return out


VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL -> CompVis ``first_stage_model.*`` (attention as 1x1 convs)."""
    out = {}
    for key, value in state_dict.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            side, kind, b, r, layer, p = m.groups()
            b = int(b) if kind == "down" else num_blocks - 1 - int(b)  # CompVis numbers decoder blocks upwards
            new = f"{side}.{kind}.{b}.block.{r}.{VAE_RESNET[layer]}.{p}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{VAE_RESNET[m[3]]}.{m[4]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)$", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out["first_stage_model." + new] = value
    return out


def pipeline_to_ldm(pipe) -> dict:
    """A whole SD 1.x pipeline as one CompVis-format checkpoint (UNet, VAE, CLIP text encoder)."""
    ckpt = to_ldm(pipe.unet.state_dict())
    ckpt.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    # Original checkpoints hold the HF CLIP keys under "text_model." (transformers 5 drops that prefix in memory).
    ckpt.update({f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
                 for k, v in pipe.text_encoder.state_dict().items()})
    return ckpt
