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
