"""The erasure as a LoRA: each trained Linear / Conv2d weight's change (erased - base), truncated by SVD.

The file uses kohya-ss naming, which diffusers' ``load_lora_weights``, AUTOMATIC1111 and ComfyUI read:
``lora_unet_<module with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. SD 1.x and 2.x
name modules as diffusers does (kohya-ss trains those on a diffusers-named UNet); SDXL uses the original
``sgm`` names (``input_blocks_4_1_...``), which diffusers maps back with the UNet config
(``_maybe_map_sgm_blocks_to_diffusers``); diffusers-style SDXL names would break on ``add_embedding``.
Convolutions use the LoCon layout: down is a conv with the layer's kernel, up a 1x1 conv.

Every layer has the same alpha A (the largest rank) and up is multiplied by rank / A, so each layer's
scale alpha / rank times its product is the change itself. alpha = rank per layer would read the same in
AUTOMATIC1111 and ComfyUI, but diffusers (0.42) misnames the alphas of attention layers in kohya files and
gives them the file's most common alpha: with ranks that differ between layers, their change came out
scaled (found with the toy model, whose blocks are 32 and 64 channels wide).

SD3 and FLUX transformers (families without ``Family.kohya`` labels) use diffusers' own transformer layout
instead, the one ``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights`` read as it is:
``transformer.<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up), diffusers module names, no alphas.
kohya names would not do: diffusers converts kohya FLUX files by the original BFL block names and SD3 files not
at all. Without alphas diffusers (0.42)
gives every layer alpha = its rank, scale 1, so up is written as the whole product's share (up @ down = the change).

Biases and norm parameters cannot be carried by a LoRA: their changes are dropped and reported.
"""

import json
from dataclasses import dataclass

import torch

from esd.families.family import Family
from esd.families.ldm_single_file import ldm_unet_key

RANK_CHOICES = ("full", "auto")  # or a positive integer


@dataclass
class LayerFactors:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1), divided by the layer's scale (see layer_scale)
    rank: int
    rel_error: float  # ||delta - (alpha / r) up @ down||_F / ||delta||_F, in the written dtype


@dataclass
class LoraExport:
    tensors: dict  # file key (kohya, or diffusers' for transformers) -> tensor
    layers: dict[str, LayerFactors]  # diffusers module name -> its factors
    dropped: dict[str, float]  # trained tensor a LoRA cannot hold -> its relative change ||delta|| / ||base||
    total_rel_error: float  # over every changed tensor, dropped ones included
    alpha: float | None  # every layer's, its scale alpha / rank; None: no alphas, every scale 1 (transformers)


def parse_rank(value: str, flag: str = "--rank") -> int | str:
    """'full', 'auto' or a positive integer; anything else is a ValueError naming the choices."""
    if value in RANK_CHOICES:
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"{flag} {value!r} is not valid; use a positive integer, 'full' or 'auto'")


def factorize(delta: torch.Tensor, rank: int | str, max_rel_error: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in float64, the truncated SVD of a weight change as (out, r) @ (r, in * kh * kw)
    (Eckart-Young: the best rank-r approximation in Frobenius norm). ``rank`` 'auto' takes the smallest
    rank whose relative error is at most ``max_rel_error``. The singular values are split evenly between
    the factors (sqrt each) so that neither overflows in fp16."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = S.square()
    tail = energy.flip(0).cumsum(0).flip(0) / energy.sum()  # tail[r]: relative squared error of rank r
    if rank == "full":
        r = len(S)
    elif rank == "auto":
        within = (tail <= max_rel_error**2).nonzero()
        r = max(int(within[0]), 1) if len(within) else len(S)
    else:
        r = min(rank, len(S))
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def layer_scale(alpha: float | None, rank: int) -> float:
    """What a loader multiplies a layer's up @ down by: alpha / rank (kohya), 1 without alphas (diffusers)."""
    return 1.0 if alpha is None else alpha / rank


def _cast(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
          dtype: torch.dtype) -> LayerFactors:
    """The factors in ``dtype`` with up divided by the layer's scale, their error measured as written, and
    the LoCon shapes for convolutions (down keeps the kernel, up is 1x1)."""
    r = down.shape[0]
    scale = layer_scale(alpha, r)
    up, down = (up / scale).to(dtype), down.to(dtype)
    matrix = delta.reshape(delta.shape[0], -1).double()
    rel_error = float((matrix - scale * up.double() @ down.double()).norm() / matrix.norm())
    if delta.ndim == 4:
        down, up = down.reshape(r, *delta.shape[1:]), up.reshape(delta.shape[0], r, 1, 1)
    return LayerFactors(down.contiguous(), up.contiguous(), r, rel_error)


def kohya_name(module: str, unet_config, family: Family) -> str:
    """``lora_unet_`` + the module's name with '.' -> '_': diffusers names for SD 1.x/2.x, original
    (sgm) names for SDXL, as kohya-ss writes them."""
    if family.kohya.sgm_names:
        module = ldm_unet_key(f"{module}.weight", unet_config).removesuffix(".weight")
    return "lora_unet_" + module.replace(".", "_")


def lora_from_erasure(base_unet: torch.nn.Module, erased: dict, family: Family, rank: int | str,
                      max_rel_error: float, dtype: torch.dtype) -> LoraExport:
    """The LoRA of the change from ``base_unet`` to the ``erased`` tensors (diffusers names; only the
    changed ones need be given)."""
    modules = dict(base_unet.named_modules())
    base = base_unet.state_dict()
    layers, dropped, factors = {}, {}, {}
    error_sq = total_sq = 0.0
    for name in sorted(erased):
        delta = erased[name].double() - base[name].double()
        norm_sq = float(delta.square().sum())
        module, _, param = name.rpartition(".")
        if not isinstance(modules.get(module), (torch.nn.Linear, torch.nn.Conv2d)) or param != "weight":
            if norm_sq > 0:
                dropped[name] = norm_sq**0.5 / max(float(base[name].double().norm()), 1e-30)
                error_sq += norm_sq
                total_sq += norm_sq
            continue
        if norm_sq == 0:  # a trained layer that did not change: nothing to write
            continue
        factors[module] = (delta, norm_sq, *factorize(delta, rank, max_rel_error))
    if not factors:
        raise ValueError("the erasure changed no Linear or Conv2d weight, so there is no LoRA to write"
                         + (f" (changed only {', '.join(sorted(dropped)[:3])}...)" if dropped else ""))
    alpha = None if family.kohya is None else float(max(down.shape[0] for *_, down in factors.values()))
    for module, (delta, norm_sq, up, down) in factors.items():
        f = _cast(delta, up, down, alpha, dtype)
        layers[module] = f
        error_sq += f.rel_error**2 * norm_sq
        total_sq += norm_sq
    tensors = lora_tensors(layers, alpha, base_unet.config, family, dtype)
    return LoraExport(tensors, layers, dropped, (error_sq / total_sq) ** 0.5, alpha)


def lora_tensors(layers: dict[str, LayerFactors], alpha: float | None, unet_config, family: Family,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: per layer ``lora_down.weight``, ``lora_up.weight`` and ``alpha``, kohya-named; for
    SD3/FLUX ``transformer.<module>.lora_A.weight`` and ``.lora_B.weight`` (``alpha`` None). Also what
    ``esd train --lora_rank`` writes, so that a trained LoRA and an exported one read alike."""
    if family.kohya is None:
        if alpha is not None:
            raise ValueError(f"a {family} LoRA has no alphas (diffusers reads every layer at scale 1)")
        return {f"transformer.{module}.lora_{part}.weight": tensor for module, f in layers.items()
                for part, tensor in (("A", f.down), ("B", f.up))}
    tensors = {}
    for module, f in layers.items():
        key = kohya_name(module, unet_config, family)
        tensors[f"{key}.lora_down.weight"] = f.down
        tensors[f"{key}.lora_up.weight"] = f.up
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def kohya_metadata(export: LoraExport, family: Family, output_name: str, base: str) -> dict[str, str]:
    """The ``ss_*`` strings kohya-ss writes and AUTOMATIC1111's Lora extension reads: it labels a LoRA SDXL by
    ``ss_base_model_version`` (``sdxl_...``), SD2 by ``ss_v2``, and SD1 otherwise, and lists only the LoRAs of
    the loaded checkpoint's version. None for SD3/FLUX (diffusers layout, no kohya names)."""
    if export.alpha is None or family.kohya is None:
        return {}
    ranks = {f.rank for f in export.layers.values()}
    return {"ss_network_module": "networks.lora", "ss_base_model_version": family.kohya.base_version,
            "ss_v2": str(family.kohya.v2), "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": f"{export.alpha:g}", "ss_output_name": output_name, "ss_sd_model_name": base}


def lora_metadata(export: LoraExport, rank: int | str, max_rel_error: float, family: Family, output_name: str,
                  base: str) -> dict[str, str]:
    """The safetensors header's strings: how the factors were made and how far they are from the erasure,
    and kohya's labels beside them."""
    kohya = export.alpha is not None
    return {"esd_lora_rank": str(rank), "esd_lora_alpha": str(export.alpha) if kohya else "",
            "esd_lora_layout": "kohya" if kohya else "diffusers (transformer.<module>.lora_A/B, scale 1)",
            "esd_lora_max_rel_error": str(max_rel_error) if rank == "auto" else "",
            "esd_lora_total_rel_error": f"{export.total_rel_error:.6g}",
            "esd_lora_layers": json.dumps({m: {"rank": f.rank, "rel_error": round(f.rel_error, 6)}
                                           for m, f in export.layers.items()}, sort_keys=True),
            "esd_lora_dropped": json.dumps({n: round(v, 6) for n, v in export.dropped.items()}, sort_keys=True),
            **kohya_metadata(export, family, output_name, base)}


@torch.no_grad()
def fuse_into(unet: torch.nn.Module, export: LoraExport) -> torch.nn.Module:
    """Add each layer's scale x up @ down to ``unet``'s weights in place: the model a loader that fuses
    the LoRA would run (dropped tensors stay the base's)."""
    modules = dict(unet.named_modules())
    for name, f in export.layers.items():
        weight = modules[name].weight
        product = layer_scale(export.alpha, f.rank) * f.up.double().flatten(1) @ f.down.double().flatten(1)
        weight += product.reshape(weight.shape).to(weight.dtype)
    return unet
