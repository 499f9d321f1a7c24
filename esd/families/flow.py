"""SD3/SD3.5 and FLUX.1: prompt encoding, the transformer call and the sampler's schedule, as diffusers'
``StableDiffusion3Pipeline`` and ``FluxPipeline`` do them (read from diffusers 0.42's source).

Both are flow-matching models: x_t = (1 - s) x0 + s eps at noise level s = sigma in [0, 1], and the
transformer predicts the velocity v = eps - x0 (the ODE dx/ds = v carries noise, s = 1, to data, s = 0).
The scheduler's timesteps are s * 1000. x_t keeps the VAE latents' layout (B, C, h, w) everywhere in
the engine; FLUX's 2x2 packing into tokens happens only inside :func:`call_flux`.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch.func import functional_call

SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default
FLUX_T5_TOKENS = 512  # FluxPipeline's


def tokenize(tokenizer, prompts: list[str], device, length: int | None = None) -> torch.Tensor:
    """(B, L) token ids padded (and cut) to ``length``, default the tokenizer's own, as diffusers' pipelines
    tokenize; every text encoder's input in this package goes through here."""
    return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_sd3(tokenizers: list, text_encoders: list, prompts: list[str], joint_attention_dim: int,
               zero_tokens: int = SD3_T5_TOKENS):
    """``StableDiffusion3Pipeline.encode_prompt`` (no clip_skip): the penultimate hidden states of CLIP-L
    and CLIP-G concatenated on features (B, 77, 768 + 1280), zero-padded to the T5 width and concatenated
    on tokens with T5's last hidden state (B, 256, 4096), or with zeros of that shape when the pipeline has
    no T5 (``zero_tokens`` of them: 1 for a transformer that merges them, :func:`merge_zero_t5_tokens`);
    the pooled embedding is both CLIPs' projected pooled outputs concatenated (B, 768 + 1280).
    Returns (prompt_embeds (B, 77 + 256, D), {"pooled_projections": (B, P)})."""
    device = text_encoders[0].device
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
        out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    if len(text_encoders) == 3:
        t5 = text_encoders[2](tokenize(tokenizers[2], prompts, device, SD3_T5_TOKENS))[0]
    else:
        t5 = torch.zeros(len(prompts), zero_tokens, joint_attention_dim, device=device, dtype=clip.dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}


class RepeatedTokenAttention(torch.nn.Module):
    """SD3's joint attention where the last text token stands for ``copies`` identical tokens: its
    logits get + ln(copies). Exactly the attention over all the copies (same keys, same values), at
    the cost of one. Written from the attention's definition (diffusers' ``JointAttnProcessor2_0`` is
    the same computation without the bias)."""

    def __init__(self, copies: int):
        super().__init__()
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n_image = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, -1))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        image, text = out[:, :n_image], out[:, n_image:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, text
        return image, attn.to_add_out(text)


def use_repeated_token_attention(transformer, copies: int | None) -> None:
    """Joint attention over ``copies`` copies of the last text token; None: diffusers' own processor."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(JointAttnProcessor2_0() if copies is None else RepeatedTokenAttention(copies))


def merge_zero_t5_tokens(transformer) -> list:
    """Make an SD3 transformer attend to one zero token as to the 256 that ``StableDiffusion3Pipeline``
    appends when it has no T5 (:class:`RepeatedTokenAttention`). Exact up to float rounding: the text
    stream has no position embedding and every text-side operation (context embedder, adaLN, MLP, the
    projections) works per token, so identical tokens stay identical through every block, and attention
    to n identical keys with identical values is attention to one of them with ln(n) added to its logit.
    Conditioning must then be encoded with ``zero_tokens=1`` (:func:`merges_zero_t5_tokens` tells).
    Returns the attention processors it replaced, for :func:`unmerge_zero_t5_tokens`."""
    before = [block.attn.processor for block in transformer.transformer_blocks]
    use_repeated_token_attention(transformer, SD3_T5_TOKENS)
    return before


def unmerge_zero_t5_tokens(transformer, processors: list) -> None:
    """Undo :func:`merge_zero_t5_tokens`: the blocks get back the processors it returned."""
    for block, processor in zip(transformer.transformer_blocks, processors, strict=True):
        block.attn.set_processor(processor)


def merges_zero_t5_tokens(transformer) -> bool:
    """Whether :func:`merge_zero_t5_tokens` was applied to ``transformer``."""
    blocks = getattr(transformer, "transformer_blocks", None)
    return bool(blocks) and isinstance(blocks[0].attn.processor, RepeatedTokenAttention)


@torch.no_grad()
def encode_flux(tokenizers: list, text_encoders: list, prompts: list[str], guidance: float | None):
    """``FluxPipeline.encode_prompt``: CLIP's pooled output (B, 768) and T5's last hidden state (B, 512, 4096).
    FLUX.1-dev's guidance embedding takes ``guidance`` (B,) with every prompt, as the pipeline passes
    its guidance_scale; schnell has none. Returns (prompt_embeds, {"pooled_projections", ["guidance"]})."""
    device = text_encoders[0].device
    clip_tok, t5_tok = tokenizers
    clip, t5 = text_encoders
    pooled = clip(tokenize(clip_tok, prompts, device)).pooler_output
    embeds = t5(tokenize(t5_tok, prompts, device, FLUX_T5_TOKENS))[0]
    extra = {"pooled_projections": pooled}
    if guidance is not None:
        extra["guidance"] = torch.full((len(prompts),), float(guidance), device=device)
    return embeds, extra


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: (B, C, h, w) -> (B, h/2 * w/2, 4C), each token a 2x2 patch."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * w // 2, c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids for packed latents of h x w tokens: (h * w, 3) holding
    (0, row, column), the positions its rotary embedding reads."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device)


def _call(model: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, params: dict | None) -> torch.Tensor:
    return model(hidden, **kwargs)[0] if params is None else functional_call(model, params, (hidden,), kwargs)[0]


def call_sd3(model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
             extra: dict, params: dict | None = None) -> torch.Tensor:
    """The velocity SD3's transformer predicts at x_t = ``latents`` (B, C, h, w). ``timesteps`` (B,) are the
    scheduler's (s * 1000), as the pipeline passes them. With ``params``, those tensors replace the module's own
    (theta* through ``functional_call``)."""
    kwargs = {"encoder_hidden_states": prompt_embeds, "pooled_projections": extra["pooled_projections"],
              "timestep": timesteps, "return_dict": False}
    return _call(model, latents, kwargs, params)


def call_flux(model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
              extra: dict, params: dict | None = None) -> torch.Tensor:
    """The velocity FLUX's transformer predicts at x_t = ``latents`` (B, C, h, w), in that layout: packed 2x2
    into tokens here only. It takes s (timestep / 1000, as FluxPipeline passes it; the model multiplies by 1000
    again), its guidance as given, and the token positions (txt_ids zeros, img_ids the packed grid)."""
    h, w = latents.shape[-2:]
    kwargs = {"encoder_hidden_states": prompt_embeds, "pooled_projections": extra["pooled_projections"],
              "timestep": timesteps / 1000, "guidance": extra.get("guidance"),
              "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=latents.device),
              "img_ids": image_ids(h // 2, w // 2, latents.device), "return_dict": False}
    return unpack_latents(_call(model, pack_latents(latents), kwargs, params), h, w)


class PipelineFlowSchedule(FlowMatchEulerDiscreteScheduler):
    """The flow-matching Euler scheduler whose ``set_timesteps(N)`` sets the schedule the model's own
    pipeline samples with at this image size: FluxPipeline passes sigmas linspace(1, 1/N, N); both
    pipelines pass the resolution-dependent shift mu when the scheduler shifts dynamically (FLUX.1-dev),
    from the image's token count. So the sources can reset it per trajectory with the steps alone."""

    linspace_sigmas: bool = False
    mu: float | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs):
        n = num_inference_steps
        sigmas = np.linspace(1.0, 1 / n, n) if self.linspace_sigmas else None
        super().set_timesteps(n, device, sigmas=sigmas, mu=self.mu)


def flow_scheduler(scheduler, steps: int, latent_size: tuple[int, int],
                   linspace_sigmas: bool) -> PipelineFlowSchedule:
    """The sampler of x_t for a flow model: its own flow-matching Euler scheduler on its pipeline's
    schedule (see :class:`PipelineFlowSchedule`), ``steps`` timesteps set. Euler on dx/ds = v is DDIM
    (eta 0) in the flow parameterisation (x0 and eps predicted from v, x_t rebuilt at the next s), so
    ``--sampler_scheduler ddim`` and ``model`` both mean this sampler."""
    own = PipelineFlowSchedule.from_config(scheduler.config)
    own.linspace_sigmas = linspace_sigmas
    if own.config.use_dynamic_shifting:
        tokens = (latent_size[0] // 2) * (latent_size[1] // 2)  # the pipelines' image_seq_len (2x2 patches)
        c = own.config
        low, high = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        own.mu = c.base_shift + (c.max_shift - c.base_shift) * (tokens - low) / (high - low)  # calculate_shift
    own.set_timesteps(steps)
    return own
