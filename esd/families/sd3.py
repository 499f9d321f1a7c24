"""SD3 and SD3.5: a flow-matching MMDiT transformer with CLIP-L, OpenCLIP-bigG and an optional T5
(:mod:`esd.families.flow` holds the encoding and the call, as ``StableDiffusion3Pipeline`` does them)."""

from diffusers import SD3Transformer2DModel

from esd.core.sampler import Conditioning
from esd.families.family import Family
from esd.families.flow import (
    SD3_T5_TOKENS,
    call_sd3,
    encode_sd3,
    merge_zero_t5_tokens,
    merges_zero_t5_tokens,
    unmerge_zero_t5_tokens,
)


class SD3Family(Family):
    def call(self, denoiser, latents, timesteps, cond, params=None):
        return call_sd3(denoiser, latents, timesteps, cond.prompt_embeds, cond.added_cond_kwargs, params)

    def load_kwargs(self, index: dict) -> dict:
        """A folder saved without its optional T5 (no ``text_encoder_3``) loads without it."""
        t5 = index.get("text_encoder_3") or [None]
        return {"text_encoder_3": None, "tokenizer_3": None} if isinstance(t5, list) and t5[0] is None else {}

    def encode(self, tokenizers, text_encoders, denoiser, prompts, image_size, zero_empty=False, guidance=None):
        zero_tokens = 1 if merges_zero_t5_tokens(denoiser) else SD3_T5_TOKENS  # see before_training
        return Conditioning(*encode_sd3(tokenizers, text_encoders, prompts, denoiser.config.joint_attention_dim,
                                        zero_tokens))

    def before_training(self, denoiser, text_encoders):
        """Without T5, SD3 conditions every prompt on 256 identical zero tokens; one of them, weighted by ln(256)
        in attention, is the same model (esd.families.flow.merge_zero_t5_tokens) at a fraction of the tokens:
        the toy's 333 become 78."""
        return merge_zero_t5_tokens(denoiser) if len(text_encoders) == 2 else None

    def after_training(self, denoiser, state) -> None:
        if state is not None:
            unmerge_zero_t5_tokens(denoiser, state)


# What the flow-matching transformers share.
TRANSFORMER = dict(denoiser_word="transformer", subfolder="transformer", esd_x="mmdit-x", flow=True, patch=2,
                   generation_scheduler="flow-euler")

SD3 = SD3Family("sd3", "an sd3 transformer", denoiser="sd3", denoiser_title="SD3/SD3.5 transformer",
                denoiser_class=SD3Transformer2DModel, pipeline_classes=("StableDiffusion3Pipeline",),
                layouts=("mmdit",), **TRANSFORMER)
