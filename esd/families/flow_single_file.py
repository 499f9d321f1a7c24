"""Original single-file checkpoints of SD3/SD3.5 (Stability's MMDiT layout) and FLUX.1 (Black Forest Labs'
layout): which family a file holds, read from its tensor names alone, and its transformer in diffusers' layout.

The family is told by the key names diffusers' ``infer_diffusers_model_type`` looks for, without its checks on
tensor sizes, which pin the published widths (SD3-medium's 1536, FLUX.1's 3072) and would refuse a model of the
same architecture at another size. A ``.safetensors`` header lists the names without reading any tensor.
"""

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_sd3_transformer_checkpoint_to_diffusers,
    load_single_file_checkpoint,
)
from safetensors import safe_open

ORIGINAL_PREFIX = "model.diffusion_model."  # Stability's files nest the denoiser under it; FLUX.1's do not


@dataclass(frozen=True)
class OriginalLayout:
    """A transformer family's original single-file layout."""

    markers: tuple[str, ...]  # names that mark it in an original file
    not_markers: tuple[str, ...]  # names of later models that share its markers (diffusers tells them apart so)
    transformer_class: type
    pipeline: str  # the pipeline class its --ckpt_config folder needs
    to_diffusers: Callable  # (the file's state dict, the transformer's config) -> diffusers' state dict


FLUX_MLP_RATIO = 4  # FLUX.1's feed-forward width over its model width (the single blocks' fused linear1)


def checkpoint_keys(path: str) -> frozenset[str]:
    """The tensor names of a checkpoint: see :func:`checkpoint_shapes`."""
    return frozenset(checkpoint_shapes(path))


def checkpoint_shapes(path: str) -> dict[str, tuple]:
    """Each tensor's shape by name: from a safetensors header, or a ``.ckpt``/``.pt`` opened memory-mapped where
    its format allows (``weights_only``: files may come from strangers) so that its tensors are not read.
    Read once per file version: the settings' checks, loading and saving each ask for the family."""
    stat = os.stat(path)
    return _checkpoint_shapes(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _checkpoint_shapes(path: str, mtime_ns: int, size: int) -> dict[str, tuple]:
    """checkpoint_shapes, for one version of the file (a rewritten file has another mtime or size)."""
    if str(path).endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # a file from before torch 1.6's zip format cannot be memory-mapped: read it whole
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:  # Lightning-style nesting, as diffusers unwraps it
        state = state["state_dict"]
    return {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}


def flow_checkpoint_family(path: str) -> str | None:
    """``sd3`` (SD3, SD3.5) or ``flux`` (FLUX.1 dev/schnell) for an original transformer checkpoint; None for
    anything else (an SD 1.x/2.x/SDXL file, whose loader says what is wrong with other files)."""
    keys = checkpoint_keys(path)
    for family, layout in FLOW_CHECKPOINTS.items():
        if any(k in keys for k in layout.markers) and not any(k in keys for k in layout.not_markers):
            return family
    return None


def flux_to_diffusers(checkpoint: dict, config) -> dict:
    """FLUX.1's original tensor names -> FluxTransformer2DModel's. The mapping is diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``, which fixes the single blocks' fused
    q|k|v|mlp split at FLUX.1's width (3072); here the width comes from ``config`` (heads x head dim).
    Original final-layer modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)."""
    sd = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in checkpoint.items()}
    width = config.num_attention_heads * config.attention_head_dim
    out = {}

    def take(new, old):
        out[new] = sd.pop(old)

    def take_qkv(prefix, old, names):  # a fused (3 * width, ...) projection -> three
        for part in ("weight", "bias"):
            for name, tensor in zip(names, sd.pop(f"{old}.{part}").chunk(3, dim=0), strict=True):
                out[f"{prefix}{name}.{part}"] = tensor

    def take_mlp(new, old):  # diffusers' FeedForward: net.0.proj (GELU's input), net.2 (output)
        for part in ("weight", "bias"):
            take(f"{new}.net.0.proj.{part}", f"{old}.0.{part}")
            take(f"{new}.net.2.{part}", f"{old}.2.{part}")

    embedders = {"timestep_embedder": "time_in", "text_embedder": "vector_in"}
    if config.guidance_embeds:
        embedders["guidance_embedder"] = "guidance_in"
    for new, old in embedders.items():
        for part in ("weight", "bias"):
            take(f"time_text_embed.{new}.linear_1.{part}", f"{old}.in_layer.{part}")
            take(f"time_text_embed.{new}.linear_2.{part}", f"{old}.out_layer.{part}")
    for part in ("weight", "bias"):
        take(f"context_embedder.{part}", f"txt_in.{part}")
        take(f"x_embedder.{part}", f"img_in.{part}")
        take(f"proj_out.{part}", f"final_layer.linear.{part}")
        shift, scale = sd.pop(f"final_layer.adaLN_modulation.1.{part}").chunk(2, dim=0)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift])

    for i in range(config.num_layers):  # double-stream (joint) blocks: image and text streams side by side
        new, old = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part in ("weight", "bias"):
            take(f"{new}norm1.linear.{part}", f"{old}img_mod.lin.{part}")
            take(f"{new}norm1_context.linear.{part}", f"{old}txt_mod.lin.{part}")
            take(f"{new}attn.to_out.0.{part}", f"{old}img_attn.proj.{part}")
            take(f"{new}attn.to_add_out.{part}", f"{old}txt_attn.proj.{part}")
        take_qkv(f"{new}attn.", f"{old}img_attn.qkv", ("to_q", "to_k", "to_v"))
        take_qkv(f"{new}attn.", f"{old}txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
        for stream, added in (("img", ""), ("txt", "added_")):
            take(f"{new}attn.norm_{added}q.weight", f"{old}{stream}_attn.norm.query_norm.scale")
            take(f"{new}attn.norm_{added}k.weight", f"{old}{stream}_attn.norm.key_norm.scale")
        take_mlp(f"{new}ff", f"{old}img_mlp")
        take_mlp(f"{new}ff_context", f"{old}txt_mlp")

    split = (width, width, width, FLUX_MLP_RATIO * width)  # linear1 = [q; k; v; mlp_in]
    for i in range(config.num_single_layers):  # single-stream blocks: text and image tokens share every weight
        new, old = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part in ("weight", "bias"):
            take(f"{new}norm.linear.{part}", f"{old}modulation.lin.{part}")
            take(f"{new}proj_out.{part}", f"{old}linear2.{part}")
            q, k, v, mlp = sd.pop(f"{old}linear1.{part}").split(split, dim=0)
            out.update({f"{new}attn.to_q.{part}": q, f"{new}attn.to_k.{part}": k, f"{new}attn.to_v.{part}": v,
                        f"{new}proj_mlp.{part}": mlp})
        take(f"{new}attn.norm_q.weight", f"{old}norm.query_norm.scale")
        take(f"{new}attn.norm_k.weight", f"{old}norm.key_norm.scale")
    return out


# family -> its original layout
FLOW_CHECKPOINTS = {
    "sd3": OriginalLayout(tuple(CHECKPOINT_KEY_NAMES["sd3"] + CHECKPOINT_KEY_NAMES["sd35_large"]), (),
                          SD3Transformer2DModel, "StableDiffusion3Pipeline",
                          lambda checkpoint, config: convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)),
    # FLUX.2, FLUX.3 and Chroma share FLUX.1's double_blocks names; diffusers tells them apart by these, and so do we.
    "flux": OriginalLayout(tuple(CHECKPOINT_KEY_NAMES["flux"]),
                           tuple(CHECKPOINT_KEY_NAMES["flux2"] + CHECKPOINT_KEY_NAMES["flux3"]
                                 + CHECKPOINT_KEY_NAMES["chroma"]),
                           FluxTransformer2DModel, "FluxPipeline", flux_to_diffusers),
}


def load_flow_transformer(ckpt_path: str, family: str, ckpt_config: str, local_files_only: bool,
                          torch_dtype: torch.dtype | None = None):
    """The transformer of an original SD3/SD3.5 or FLUX.1 file, built from ``ckpt_config``'s
    ``transformer/config.json`` and loaded strictly (a missing or unexpected tensor is named), in
    ``torch_dtype`` (default fp32, as ``from_pretrained``). Tensors of
    other components in the file (text encoders, VAE of an all-in-one SD3 file) are left unread here."""
    layout = FLOW_CHECKPOINTS[family]
    cls = layout.transformer_class
    config = cls.load_config(ckpt_config, subfolder="transformer", local_files_only=local_files_only)
    with torch.device("meta"):
        model = cls.from_config(config)
    checkpoint = load_single_file_checkpoint(ckpt_path, local_files_only=True)
    try:
        state = layout.to_diffusers(checkpoint, model.config)
    except KeyError as e:
        raise ValueError(f"no tensor {e} in the {family} checkpoint {ckpt_path!r}") from e
    dtype = torch_dtype or torch.float32  # as from_pretrained: fp32 unless asked, whatever the file holds
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    return model
