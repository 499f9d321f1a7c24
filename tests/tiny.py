"""Tiny models with the real SD 1.x, SD 2.x, SDXL, SD3 and FLUX.1 architectures (block layout,
attention types, conditioning), built in-process and saved as diffusers folders."""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from esd.families.registry import select_parameters
from esd.formats.weights import save_trained_parameters
from esd.toy.tokenizer import build_clip_tokenizer

WORDS = "a photo of cat dog church garbage truck nudity cowboy hat van gogh painting".split()
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _text_encoder(cls, hidden, vocab, seed, **kw):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=vocab, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **kw)
    return cls(cfg)


def _vae(latent_channels=4, **kw):
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels,
                         norm_num_groups=8, layers_per_block=1, **kw)


def _flow_vae():
    """16 latent channels with a shift factor, as SD3's and FLUX's VAEs (FLUX.1's factors)."""
    return _vae(16, scaling_factor=0.3611, shift_factor=0.1159)


def _t5(d_model, vocab, seed):
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=d_model, d_ff=2 * d_model, d_kv=4, num_layers=1, num_heads=2,
                                   vocab_size=vocab, relative_attention_num_buckets=8))


def _scheduler(prediction_type="epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build(family: str, folder: str | Path) -> Path:
    """Save a tiny ``family`` ('sd1', 'sd2', 'sdxl') pipeline to ``folder``."""
    folder = Path(folder)
    tokenizer = build_clip_tokenizer(WORDS)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if family == "sd1":
        unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
                                    down_block_types=SD_DOWN, up_block_types=SD_UP, cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=32)
        pipe = StableDiffusionPipeline(_vae(), _text_encoder(CLIPTextModel, 32, vocab, 1), tokenizer, unet,
                                       _scheduler(), None, None, requires_safety_checker=False)
    elif family == "sd2":  # linear projections, per-block head dims, v-prediction (768-v)
        unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
                                    down_block_types=SD_DOWN, up_block_types=SD_UP, cross_attention_dim=32,
                                    attention_head_dim=(2, 4, 8, 8), use_linear_projection=True,
                                    norm_num_groups=32)
        pipe = StableDiffusionPipeline(_vae(), _text_encoder(CLIPTextModel, 32, vocab, 1), tokenizer, unet,
                                       _scheduler("v_prediction"), None, None, requires_safety_checker=False)
    elif family == "sdxl":  # two text encoders, text-time added conditioning, deeper transformers
        unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 32, 32), layers_per_block=2,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                    cross_attention_dim=48, norm_num_groups=32)
        pipe = StableDiffusionXLPipeline(_vae(), _text_encoder(CLIPTextModel, 32, vocab, 1),
                                         _text_encoder(CLIPTextModelWithProjection, 16, vocab, 2, projection_dim=16),
                                         tokenizer, build_clip_tokenizer(WORDS), unet, _scheduler())
    else:
        raise ValueError(family)
    pipe.save_pretrained(folder)
    return folder


FLOW_PIPELINES = ("sd3", "sd3-t5", "flux-dev", "flux-schnell")


def build_flow(kind: str, folder: str | Path) -> Path:
    """Save a tiny flow-matching pipeline to ``folder``: ``sd3`` (CLIP-L and CLIP-G, no T5: the
    pipeline's zeros take its place), ``sd3-t5``, ``flux-dev`` (guidance embedding, dynamic shifting)
    or ``flux-schnell`` (neither). 16 latent channels as the real VAEs; the T5 tokenizer is the tiny CLIP
    one (any tokenizer the pipeline can call serves the tests)."""
    folder = Path(folder)
    vocab = len(build_clip_tokenizer(WORDS))
    if kind.startswith("sd3"):
        t5 = kind == "sd3-t5"
        pipe = StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(in_channels=16),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(),
            text_encoder=_text_encoder(CLIPTextModelWithProjection, 8, vocab, 1, projection_dim=4),
            tokenizer=build_clip_tokenizer(WORDS),
            text_encoder_2=_text_encoder(CLIPTextModelWithProjection, 8, vocab, 2, projection_dim=4),
            tokenizer_2=build_clip_tokenizer(WORDS),
            text_encoder_3=_t5(16, vocab, 3) if t5 else None,
            tokenizer_3=build_clip_tokenizer(WORDS, model_max_length=256) if t5 else None)
    elif kind in ("flux-dev", "flux-schnell"):
        dev = kind == "flux-dev"
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15) if dev else FlowMatchEulerDiscreteScheduler()
        pipe = FluxPipeline(transformer=tiny_flux_transformer(in_channels=64, guidance_embeds=dev),
                            scheduler=scheduler, vae=_flow_vae(),
                            text_encoder=_text_encoder(CLIPTextModel, 8, vocab, 1),
                            tokenizer=build_clip_tokenizer(WORDS),
                            text_encoder_2=_t5(16, vocab, 2),
                            tokenizer_2=build_clip_tokenizer(WORDS, model_max_length=512))
    else:
        raise ValueError(f"{kind!r}; valid: {', '.join(FLOW_PIPELINES)}")
    pipe.save_pretrained(folder)
    return folder


# SD v1.4's UNet config, as published in its diffusers folder: for parameter counts (on the meta
# device, no memory) and the SD-scale benchmarks (random weights).
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd14_unet(device: str = "meta") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(**SD14_UNET)


# SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), the entries that
# differ from UNet2DConditionModel's defaults: for parameter counts on the meta device.
SDXL_BASE_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                      transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, norm_num_groups=32,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816)


def sdxl_base_unet(device: str = "meta") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(**SDXL_BASE_UNET)


# Transformer configs as published in the models' diffusers folders (transformer/config.json), for
# parameter counts on the meta device. SD3.5-medium: MMDiT-X, dual (image) attention in blocks 0-12.
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# FLUX.1-dev: 19 joint (double-stream) and 38 single-stream blocks, guidance-distilled.
FLUX1_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def sd35_medium_transformer(device: str = "meta") -> SD3Transformer2DModel:
    with torch.device(device):
        return SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)


def flux1_dev_transformer(device: str = "meta") -> FluxTransformer2DModel:
    with torch.device(device):
        return FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)


def tiny_sd3_transformer(in_channels: int = 4) -> SD3Transformer2DModel:
    """Two joint blocks, the first with SD3.5's dual attention and the last context_pre_only (no text
    output projection nor text feed-forward), as in the real models."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=in_channels, out_channels=in_channels,
                                 num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_flux_transformer(in_channels: int = 4, guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """Two joint and two single-stream blocks, with FLUX.1-dev's guidance embedding (schnell: without)."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4))


def make_run(base: str, folder: Path, method: str = "esd-all", weights_only: bool = True, scale: float = 1e-2):
    """A run folder whose erasure moves every tensor ``method`` trains (only Linear/Conv2d weights when
    ``weights_only``) by seeded noise. Returns (run folder, base UNet state, erased tensors)."""
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    names = [n for n in select_parameters(unet, method) if n.endswith(".weight") or not weights_only]
    erased = {n: base_sd[n] + scale * torch.randn(base_sd[n].shape, generator=g) for n in names}
    folder.mkdir(parents=True)
    save_trained_parameters(erased, folder / f"{folder.name}.safetensors",
                            {"base_model": base, "train_method": method, "prompt": "cat"})
    (folder / "args.json").write_text(json.dumps({"base_model": base, "ckpt_path": None, "prompt": "cat",
                                                  "train_method": method}))
    return folder, base_sd, erased
