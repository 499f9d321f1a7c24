"""Train methods: which UNet or transformer parameters ESD fine-tunes.

One table, ``TRAIN_METHODS``, feeds the CLI choices, the README and the tests. Each method
names the parameter layouts its names are written for (``unet``: diffusers' UNet2DConditionModel; ``mmdit``:
the joint blocks of diffusers' SD3/FLUX transformers; ``mmdit-single``: FLUX's single-stream blocks). Parameter
names mean different things in different layouts (SD3.5's ``attn2`` is a second *image* self-attention, not the
UNet's cross-attention), so each model family says which layouts its denoiser has
(``esd.families.family.Family.layouts``) and a method of another is refused there, naming the valid ones.

Parameter names are diffusers ``UNet2DConditionModel`` names. The paper's code
selected by CompVis ``ldm`` names; the correspondences are:

* CompVis ``attn1`` / ``attn2`` -> diffusers ``attn1`` (self-attention) /
  ``attn2`` (cross-attention): the same names inside ``BasicTransformerBlock``.
* CompVis ``time_embed.*`` -> diffusers ``time_embedding.*``; SDXL's extra
  conditioning embedding (CompVis ``label_emb``, diffusers ``add_embedding``) is
  added to the time embedding, so it belongs to the same group.
* CompVis ``out.0`` / ``out.2`` (the output norm and conv) -> diffusers
  ``conv_norm_out`` / ``conv_out``.
* CompVis ``input_blocks.N`` / ``output_blocks.N`` (used by ``xlayer`` and
  ``selflayer``) -> see :func:`compvis_block_to_diffusers`.

The current official code (``esd_sd.py``) selects modules, not parameter names: only
``Linear`` and ``Conv2d`` layers (so never a norm layer), then ``esd-u`` = those not in
``attn2`` (time embedding, ``conv_in`` and ``conv_out`` included) and ``esd-all`` = all of
them. These differ from the paper code's ``noxattn`` and ``full``, so they are methods of
their own; ``esd-x`` and ``esd-x-strict`` select what ``xattn`` and ``xattn-strict`` do.

The official SDXL code (``esd_sdxl.py``) selects its ``esd-u`` and ``esd-all`` otherwise: of those
``Linear``/``Conv2d`` layers, only the ones whose module name holds ``block`` and not ``emb``, which on
the SDXL UNet are the layers of ``down_blocks``, ``mid_block`` and ``up_blocks`` less the resnets'
``time_emb_proj``: no ``time_embedding``, ``add_embedding``, ``conv_in`` or ``conv_out``. On a family that
asks for it (``Family.blocks_only_official``: SDXL) ``esd-u`` and ``esd-all`` select that
(``blocks_only_selects``). The paper code's names keep their rule there: the paper never ran SDXL, and
``noxattn``/``full`` are its rules on diffusers names, whatever the UNet.

Transformers (diffusers ``SD3Transformer2DModel``, ``FluxTransformer2DModel``) have no
cross-attention. Their joint (MMDiT) blocks, ``transformer_blocks.N``, keep a text stream and an
image stream with separate weights and run one attention over both: image tokens get keys and
values from ``attn.to_k`` / ``attn.to_v``, text tokens from ``attn.add_k_proj`` /
``attn.add_v_proj``, and the two are concatenated after projection. So the weights through which
the text reaches the image, the analogue of ESD-x's ``attn2.to_k`` / ``attn2.to_v``, are
``add_k_proj`` / ``add_v_proj`` (``mmdit-x``). FLUX's single-stream blocks,
``single_transformer_blocks.N``, project text and image tokens with the same ``attn.to_k`` /
``attn.to_v``: training them changes the image's keys and values too, so they are not in
``mmdit-x`` but in a method of their own (``mmdit-x-single``). ``mmdit-u`` follows ``noxattn``:
everything but ``mmdit-x``, the conditioning embedding (``time_text_embed``: timestep, FLUX's
guidance and the pooled text embedding, as ``noxattn`` leaves out the time embedding and SDXL's
``add_embedding``) and the output layer (``norm_out``, ``proj_out``, as ``noxattn`` leaves out
``conv_norm_out`` / ``conv_out``). The patch embedding (``pos_embed`` / ``x_embedder``) trains, as
``conv_in`` does in ``noxattn``, and so does the rest of the text stream (``context_embedder``,
``add_q_proj``, ``to_add_out``, ``ff_context``), as everything outside ``attn2`` does in ``noxattn``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

_TIME_EMBEDDING = ("time_embedding.", "add_embedding.")
_OUTPUT_LAYER = ("conv_norm_out.", "conv_out.")
# Transformer counterparts: the conditioning embedding and the output layer.
_TEXT_TIME_EMBEDDING = ("time_text_embed.",)
_TRANSFORMER_OUTPUT_LAYER = ("norm_out.", "proj_out.")

def compvis_block_to_diffusers(kind: str, index: int, layers_per_block: int = 2) -> str:
    """Map a CompVis ``input_blocks.N`` / ``output_blocks.N`` index to the
    diffusers prefix of the transformer (attention) module in that block.

    CompVis numbers blocks flat. ``input_blocks.0`` is ``conv_in``; then each
    down stage has ``layers_per_block`` (resnet, attention) blocks followed by
    one downsampler, so ``input_blocks.N`` (N not a downsampler) is
    ``down_blocks[(N-1) // (L+1)].attentions[(N-1) % (L+1)]``. Each up stage has
    ``L+1`` blocks, so ``output_blocks.N`` is
    ``up_blocks[N // (L+1)].attentions[N % (L+1)]``.
    For SD1.x (L=2): ``input_blocks.4`` -> ``down_blocks.1.attentions.0``,
    ``input_blocks.7`` -> ``down_blocks.2.attentions.0``,
    ``output_blocks.6`` -> ``up_blocks.2.attentions.0``,
    ``output_blocks.8`` -> ``up_blocks.2.attentions.2``.
    """
    stride = layers_per_block + 1
    if kind == "input":
        if index == 0 or index % stride == 0:
            raise ValueError(f"input_blocks.{index} holds no attention (conv_in or a downsampler)")
        return f"down_blocks.{(index - 1) // stride}.attentions.{(index - 1) % stride}."
    if kind == "output":
        return f"up_blocks.{index // stride}.attentions.{index % stride}."
    raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")


@dataclass(frozen=True)
class TrainMethod:
    name: str
    description: str
    # (parameter name, the module holding it, layers_per_block) -> trained?
    selects: Callable[[str, torch.nn.Module, int], bool]
    layouts: tuple[str, ...] = ("unet",)  # the parameter layouts whose names `selects` understands
    # esd_sdxl.py's rule, on a family that asks for it (Family.blocks_only_official); None: `selects`
    blocks_only_selects: Callable[[str, torch.nn.Module, int], bool] | None = None


def _xlayer(name: str, module: torch.nn.Module, lpb: int) -> bool:
    # The paper's code: attn2 of output_blocks.6 and output_blocks.8.
    prefixes = tuple(compvis_block_to_diffusers("output", i, lpb) for i in (6, 8))
    return "attn2" in name and name.startswith(prefixes)


def _selflayer(name: str, module: torch.nn.Module, lpb: int) -> bool:
    # The paper's code: attn1 of input_blocks.4 and input_blocks.7.
    prefixes = tuple(compvis_block_to_diffusers("input", i, lpb) for i in (4, 7))
    return "attn1" in name and name.startswith(prefixes)


def _joint_text_kv(name: str) -> bool:
    # Text keys and values of the joint blocks; `add_` keeps FLUX's single-stream `attn.to_k` out.
    return name.startswith("transformer_blocks.") and (".attn.add_k_proj." in name or ".attn.add_v_proj." in name)


def _single_stream_kv(name: str) -> bool:
    return name.startswith("single_transformer_blocks.") and (".attn.to_k." in name or ".attn.to_v." in name)


def _linear_or_conv(module: torch.nn.Module) -> bool:
    # The official code's filter (class names Linear, Conv2d and their LoRACompatible subclasses).
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


def _blocks_only(name: str, module: torch.nn.Module) -> bool:
    # esd_sdxl.py's esd-all: Linear/Conv2d layers of the down, mid and up blocks, less the resnets' time_emb_proj.
    return _linear_or_conv(module) and name.startswith(_UNET_BLOCKS) and ".time_emb_proj." not in name


TRAIN_METHODS: dict[str, TrainMethod] = {
    m.name: m
    for m in [
        TrainMethod("xattn", "ESD-x: cross-attention (attn2) only; for styles and artists",
                    lambda n, m, _: "attn2" in n),
        TrainMethod("noxattn", "ESD-u: everything but cross-attention, time embedding and output layer; "
                    "for nudity and objects",
                    lambda n, m, _: not ("attn2" in n or n.startswith(_TIME_EMBEDDING + _OUTPUT_LAYER))),
        TrainMethod("selfattn", "self-attention (attn1) only", lambda n, m, _: "attn1" in n),
        TrainMethod("full", "every parameter of the UNet or transformer", lambda n, m, _: True,
                    ("unet", "mmdit")),
        TrainMethod("notime", "everything but time embedding and output layer",
                    lambda n, m, _: not n.startswith(_TIME_EMBEDDING + _OUTPUT_LAYER)),
        TrainMethod("xlayer", "cross-attention of CompVis output_blocks.6 and .8 (up_blocks.2.attentions.0 "
                    "and .2 in SD1.x)", _xlayer),
        TrainMethod("selflayer", "self-attention of CompVis input_blocks.4 and .7 (down_blocks.1.attentions.0 "
                    "and down_blocks.2.attentions.0 in SD1.x)", _selflayer),
        TrainMethod("xattn-strict", "cross-attention keys and values only (attn2.to_k, attn2.to_v)",
                    lambda n, m, _: "attn2.to_k." in n or "attn2.to_v." in n),
        TrainMethod("esd-u", "the official code's ESD-u: every Linear/Conv2d layer but cross-attention (time embedding "
                    "and output conv included, norm layers not); on SDXL esd_sdxl.py's: only those in the down/mid/up "
                    "blocks, less the resnets' time_emb_proj",
                    lambda n, m, _: _linear_or_conv(m) and "attn2" not in n,
                    blocks_only_selects=lambda n, m, _: _blocks_only(n, m) and "attn2" not in n),
        TrainMethod("esd-all", "the official code's ESD-all: every Linear/Conv2d layer (norm layers not); on SDXL "
                    "esd_sdxl.py's: only those in the down/mid/up blocks, less the resnets' time_emb_proj",
                    lambda n, m, _: _linear_or_conv(m),
                    blocks_only_selects=lambda n, m, _: _blocks_only(n, m)),
        TrainMethod("mmdit-x", "SD3/FLUX transformer, the ESD-x analogue: text keys and values of the joint "
                    "blocks (attn.add_k_proj, attn.add_v_proj); for styles and artists",
                    lambda n, m, _: _joint_text_kv(n), ("mmdit",)),
        TrainMethod("mmdit-u", "SD3/FLUX transformer, the ESD-u analogue: everything but mmdit-x, the "
                    "timestep/guidance/pooled-text embedding and the output layer; for nudity and objects",
                    lambda n, m, _: not (_joint_text_kv(n)
                                         or n.startswith(_TEXT_TIME_EMBEDDING + _TRANSFORMER_OUTPUT_LAYER)),
                    ("mmdit",)),
        TrainMethod("mmdit-x-single", "FLUX transformer: mmdit-x plus the single-stream blocks' attn.to_k and "
                    "attn.to_v, which project text and image tokens alike",
                    lambda n, m, _: _joint_text_kv(n) or _single_stream_kv(n), ("mmdit-single",)),
    ]
}

# Names of the current official ESD code that select the same parameters as ours.
ALIASES = {"esd-x": "xattn", "esd-x-strict": "xattn-strict"}
METHOD_CHOICES = list(TRAIN_METHODS) + list(ALIASES)


def resolve_method(name: str) -> TrainMethod:
    """The train method called ``name`` (aliases accepted); esd.families.registry.check_method also checks it
    against a model family."""
    key = ALIASES.get(name, name)
    if key not in TRAIN_METHODS:
        raise ValueError(f"unknown train method {name!r}; valid: {', '.join(METHOD_CHOICES)}")
    return TRAIN_METHODS[key]


def select_by(model: torch.nn.Module, method: TrainMethod, blocks_only: bool = False) -> list[str]:
    """Names of the parameters of ``model`` that ``method`` trains (never empty); ``blocks_only``: its
    ``blocks_only_selects`` where it has one (esd.families.registry.select_parameters says when)."""
    selects = method.blocks_only_selects if blocks_only and method.blocks_only_selects is not None \
        else method.selects
    lpb = getattr(getattr(model, "config", None), "layers_per_block", 2)
    if not isinstance(lpb, int):  # a per-block list in some configs; the paper's mapping assumes one value
        lpb = lpb[0]
    owner = {f"{prefix}.{p}" if prefix else p: module for prefix, module in model.named_modules()
             for p, _ in module.named_parameters(recurse=False)}
    names = [n for n, _ in model.named_parameters() if selects(n, owner[n], lpb)]
    if not names:
        raise ValueError(f"train method {method.name!r} selects no parameters in this {type(model).__name__} "
                         f"(it has {len(list(model.parameters()))} parameter tensors)")
    return names


def methods_help() -> str:
    """Every train method and alias in one line, for --train_method's help."""
    lines = [f"{name}: {m.description}" for name, m in TRAIN_METHODS.items()]
    lines.append("aliases: " + ", ".join(f"{a}={n}" for a, n in ALIASES.items()))
    return "; ".join(lines)
