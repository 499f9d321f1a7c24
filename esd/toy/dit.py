"""The flow-matching toy model: ``esd toy-train-dit --out DIR`` rebuilds ``toy-dit``.

The same world of coloured shapes and the same VAE as the UNet toy model (``toy``), with an SD3-style
MMDiT (diffusers ``SD3Transformer2DModel``) trained by rectified flow, saved as a
``StableDiffusion3Pipeline`` folder. Why SD3 and not FLUX: SD3 samples with true classifier-free
guidance, so the frozen model's e0 and ep are the two branches the sampler computes anyway, as in the
paper; its third text encoder (T5) is optional; and its joint blocks carry the text into the image only
through ``add_k_proj`` / ``add_v_proj``, the weights ``mmdit-x`` trains. FLUX.1-dev is guidance-distilled
(a student of a CFG teacher, which a toy would have to train first) and needs T5.

Components:

* two random, frozen CLIP text encoders with projection (SD3's CLIP-L and CLIP-G slots), built like the
  UNet toy's (token embeddings of std 1.0, so every word keeps its own direction), seeded apart;
* no T5: the pipeline then conditions on zeros in its place, ``max_sequence_length`` (256) tokens of
  ``joint_attention_dim`` features appended to the CLIP tokens;
* the shipped toy VAE, unchanged (its config gains ``shift_factor`` 0, which SD3's pipeline reads);
* ``FlowMatchEulerDiscreteScheduler`` with shift 1 (SD3's shift 3 moves steps to high noise for
  1024 px images; an 8 x 8 latent needs no shift).

Training is rectified flow as in SD3 (Esser et al., 2024): x_t = (1 - s) x0 + s eps with s drawn
logit-normal(0, 1), the transformer predicts eps - x0 at timestep 1000 s.

The 256 zero tokens cost most of a training step yet are all the same: the text stream has no
position embedding and every text-side operation works per token, so identical tokens stay identical
through every block, and attention to n identical keys with identical values equals attention to one
of them with ln(n) added to its logit. Training therefore feeds one zero token and adds ln(256) to
its logits (:class:`esd.families.flow.RepeatedTokenAttention`, which ESD training on any SD3 without T5 uses too);
the saved model is the plain diffusers model, run by the pipeline with all 256 (``tests/test_toy_dit.py``
checks that the two forwards agree).
"""

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from esd.families.flow import encode_sd3, merge_zero_t5_tokens, merges_zero_t5_tokens, use_repeated_token_attention
from esd.families.sources import TOY_MODEL_DIR
from esd.formats.records import environment_record
from esd.toy.recipe import CLIP_TOKEN_EMBEDDING_STD, _batches, _warmup_cosine, encode_latents, optimizer_step
from esd.toy.tokenizer import build_clip_tokenizer
from esd.toy.world import make_dataset, vocabulary


@dataclass
class DitRecipeConfig:
    seed: int = 0
    n_images: int = 24000
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    heads: int = 4
    head_dim: int = 32
    layers: int = 4
    patch_size: int = 2  # 2 x 2 latent pixels per token: 16 image tokens; patch 1 (64) costs 2.5x per step
    text_width: int = 64  # each CLIP encoder's width; the two are concatenated: joint_attention_dim 128
    caption_tokens: int = 16  # CLIP tokens per caption (the longest caption has 9 with BOS and EOS)
    token_embedding_std: float = 1.0  # as the UNet toy's encoder (see recipe.RecipeConfig)
    balanced: bool = False  # world.balanced_weights, as the UNet toy's recipe
    threads: int = 0  # 0: torch's default


def build_text_encoder(vocab_size: int, width: int, token_embedding_std: float) -> CLIPTextModelWithProjection:
    """A random 2-layer CLIP text encoder with projection (the draws come from torch's global generator)."""
    encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=width, vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(token_embedding_std / CLIP_TOKEN_EMBEDDING_STD)
    return encoder.requires_grad_(False).eval()


def build_dit_components(cfg: DitRecipeConfig, vae: AutoencoderKL):
    """Untrained tokenizers, text encoders and transformer, and the scheduler."""
    tokenizers = [build_clip_tokenizer(vocabulary(), cfg.caption_tokens) for _ in range(2)]
    torch.manual_seed(cfg.seed)
    encoders = [build_text_encoder(len(tokenizers[0]), cfg.text_width, cfg.token_embedding_std) for _ in range(2)]
    latent = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    width = cfg.heads * cfg.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_width, caption_projection_dim=width,
        pooled_projection_dim=2 * cfg.text_width, pos_embed_max_size=latent // cfg.patch_size, qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return tokenizers, encoders, transformer, scheduler


@torch.no_grad()
def encode_captions(tokenizers, encoders, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption, what StableDiffusion3Pipeline.encode_prompt gives without T5 (:func:`esd.families.flow.encode_sd3`),
    except that the 256 zero tokens are one: (N, L + 1, 2w) and the pooled projections (N, 2w)."""
    unique = sorted(set(texts))
    seq, extra = encode_sd3(tokenizers, encoders, unique, sum(e.config.hidden_size for e in encoders), zero_tokens=1)
    index = {t: i for i, t in enumerate(unique)}
    rows = torch.tensor([index[t] for t in texts])
    return seq[rows], extra["pooled_projections"][rows]


def merges_zero_tokens(pipe) -> bool:
    """Whether ``pipe`` is an SD3 pipeline without T5 whose transformer attends to one zero token as to
    the 256 of them (esd.families.flow.merge_zero_t5_tokens; then it must be called with ``max_sequence_length=1``)."""
    transformer = getattr(pipe, "transformer", None)
    return (transformer is not None and getattr(pipe, "text_encoder_3", None) is None
            and merges_zero_t5_tokens(transformer))


def train_transformer(transformer, latent_mean, latent_std, embeds, pooled, cfg: DitRecipeConfig, log):
    """Rectified flow on cached latent distributions; returns the EMA transformer (default attention)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    merge_zero_t5_tokens(transformer)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, cfg.steps)
    transformer.train()
    for step, idx in enumerate(_batches(len(latent_mean), cfg.batch, cfg.steps, gen)):
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal(0, 1), as SD3
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = transformer(x_t, encoder_hidden_states=embeds[idx], pooled_projections=pooled[idx],
                           timestep=sigma * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(transformer, ema, opt, sched, loss, step, cfg.ema_decay)
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"transformer step {step + 1}/{cfg.steps} loss {loss.item():.5f}")
    use_repeated_token_attention(ema, None)
    return ema.eval()


def load_toy_vae() -> AutoencoderKL:
    """The shipped UNet toy's VAE, with the ``shift_factor`` (0) that SD3's pipeline reads."""
    vae = AutoencoderKL.from_pretrained(TOY_MODEL_DIR, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval()


def toy_dit_train(out: str | Path, cfg: DitRecipeConfig | None = None, log=print) -> Path:
    """Build the flow-matching toy StableDiffusion3Pipeline into ``out``; returns the folder."""
    cfg = cfg or DitRecipeConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    start = time.perf_counter()
    vae = load_toy_vae()
    tokenizers, encoders, transformer, scheduler = build_dit_components(cfg, vae)
    pixels, texts, _ = make_dataset(cfg.n_images, cfg.seed, cfg.balanced)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latent_mean, latent_std = encode_latents(vae, images)
    scale = vae.config.scaling_factor
    embeds, pooled = encode_captions(tokenizers, encoders, texts)
    log(f"data ready in {time.perf_counter() - start:.0f} s: {len(images)} images, "
        f"{sum(p.numel() for p in transformer.parameters()):,} transformer parameters")
    ema = train_transformer(transformer, latent_mean * scale, latent_std * scale, embeds, pooled, cfg, log)
    pipe = StableDiffusion3Pipeline(transformer=ema, scheduler=scheduler, vae=vae, text_encoder=encoders[0],
                                    tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)
    seconds = time.perf_counter() - start
    record = {"recipe": asdict(cfg), "seconds": round(seconds, 1), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "environment": environment_record()}
    (out / "recipe.json").write_text(json.dumps(record, indent=2))
    log(f"saved toy-dit model to {out} in {seconds:.0f} s")
    return out
