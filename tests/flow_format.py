"""Original-layout (Stability's SD3 MMDiT, Black Forest Labs' FLUX.1) transformer weights for the tests: the
inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` and
``convert_flux_transformer_checkpoint_to_diffusers``, so that loading original files is checked without
downloading any. Each function consumes the whole diffusers state dict: a tensor it does not place fails."""

import torch

SD3_PREFIX = "model.diffusion_model."  # Stability's files nest the MMDiT under it


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the final (and SD3's last context) modulation's order differs."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


class _Writer:
    """Moves tensors from a diffusers state dict into an original one, for both weight and bias."""

    def __init__(self, state_dict: dict):
        self.src, self.out = dict(state_dict), {}

    def move(self, old: str, new: str, parts=("weight", "bias"), fn=lambda t: t):
        for p in parts:
            self.out[f"{new}.{p}" if p else new] = fn(self.src.pop(f"{old}.{p}" if p else old))

    def fuse(self, olds: list[str], new: str, parts=("weight", "bias")):
        for p in parts:
            self.out[f"{new}.{p}"] = torch.cat([self.src.pop(f"{o}.{p}") for o in olds])

    def done(self) -> dict:
        assert not self.src, f"not placed in the original layout: {sorted(self.src)}"
        return {k: v.contiguous() for k, v in self.out.items()}


def sd3_to_original(state_dict: dict, config) -> dict:
    """An SD3Transformer2DModel state dict in the original MMDiT layout, under ``model.diffusion_model.``."""
    w = _Writer(state_dict)
    w.move("pos_embed.pos_embed", "pos_embed", parts=("",))
    w.move("pos_embed.proj", "x_embedder.proj")
    w.move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    w.move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    w.move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    w.move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    w.move("context_embedder", "context_embedder")
    last = config.num_layers - 1
    for i in range(config.num_layers):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        w.fuse([f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v"], f"{x}attn.qkv")
        w.fuse([f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj"], f"{c}attn.qkv")
        for ours, theirs in [("norm_q", f"{x}attn.ln_q"), ("norm_k", f"{x}attn.ln_k"),
                             ("norm_added_q", f"{c}attn.ln_q"), ("norm_added_k", f"{c}attn.ln_k")]:
            w.move(f"{d}attn.{ours}", theirs, parts=("weight",))
        w.move(f"{d}attn.to_out.0", f"{x}attn.proj")
        w.move(f"{d}norm1.linear", f"{x}adaLN_modulation.1")
        w.move(f"{d}ff.net.0.proj", f"{x}mlp.fc1")
        w.move(f"{d}ff.net.2", f"{x}mlp.fc2")
        if i in config.dual_attention_layers:  # SD3.5's second image self-attention
            w.fuse([f"{d}attn2.to_q", f"{d}attn2.to_k", f"{d}attn2.to_v"], f"{x}attn2.qkv")
            w.move(f"{d}attn2.norm_q", f"{x}attn2.ln_q", parts=("weight",))
            w.move(f"{d}attn2.norm_k", f"{x}attn2.ln_k", parts=("weight",))
            w.move(f"{d}attn2.to_out.0", f"{x}attn2.proj")
        if i == last:  # context_pre_only: no text output projection or feed-forward; modulation order swapped
            w.move(f"{d}norm1_context.linear", f"{c}adaLN_modulation.1", fn=_swap_halves)
        else:
            w.move(f"{d}attn.to_add_out", f"{c}attn.proj")
            w.move(f"{d}norm1_context.linear", f"{c}adaLN_modulation.1")
            w.move(f"{d}ff_context.net.0.proj", f"{c}mlp.fc1")
            w.move(f"{d}ff_context.net.2", f"{c}mlp.fc2")
    w.move("proj_out", "final_layer.linear")
    w.move("norm_out.linear", "final_layer.adaLN_modulation.1", fn=_swap_halves)
    return {SD3_PREFIX + k: v for k, v in w.done().items()}


def flux_to_original(state_dict: dict, config) -> dict:
    """A FluxTransformer2DModel state dict in FLUX.1's original layout (no prefix, as BFL's files)."""
    w = _Writer(state_dict)
    embedders = {"timestep_embedder": "time_in", "text_embedder": "vector_in"}
    if config.guidance_embeds:
        embedders["guidance_embedder"] = "guidance_in"
    for ours, theirs in embedders.items():
        w.move(f"time_text_embed.{ours}.linear_1", f"{theirs}.in_layer")
        w.move(f"time_text_embed.{ours}.linear_2", f"{theirs}.out_layer")
    w.move("context_embedder", "txt_in")
    w.move("x_embedder", "img_in")
    for i in range(config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        w.move(f"{d}norm1.linear", f"{o}img_mod.lin")
        w.move(f"{d}norm1_context.linear", f"{o}txt_mod.lin")
        w.fuse([f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v"], f"{o}img_attn.qkv")
        w.fuse([f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj"], f"{o}txt_attn.qkv")
        for ours, theirs in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")]:
            w.move(f"{d}attn.{ours}.weight", f"{o}{theirs}.scale", parts=("",))
        w.move(f"{d}ff.net.0.proj", f"{o}img_mlp.0")
        w.move(f"{d}ff.net.2", f"{o}img_mlp.2")
        w.move(f"{d}ff_context.net.0.proj", f"{o}txt_mlp.0")
        w.move(f"{d}ff_context.net.2", f"{o}txt_mlp.2")
        w.move(f"{d}attn.to_out.0", f"{o}img_attn.proj")
        w.move(f"{d}attn.to_add_out", f"{o}txt_attn.proj")
    for i in range(config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        w.move(f"{d}norm.linear", f"{o}modulation.lin")
        w.fuse([f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp"], f"{o}linear1")
        w.move(f"{d}attn.norm_q.weight", f"{o}norm.query_norm.scale", parts=("",))
        w.move(f"{d}attn.norm_k.weight", f"{o}norm.key_norm.scale", parts=("",))
        w.move(f"{d}proj_out", f"{o}linear2")
    w.move("proj_out", "final_layer.linear")
    w.move("norm_out.linear", "final_layer.adaLN_modulation.1", fn=_swap_halves)
    return w.done()


TO_ORIGINAL = {"sd3": sd3_to_original, "flux": flux_to_original}
