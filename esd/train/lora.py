"""Training the erasure directly as a LoRA (``esd train --lora_rank r``), with peft, as diffusers'
``train_text_to_image_lora.py`` does: the UNet's own weights stay frozen and only low-rank factors train,
W' = W + (alpha / r) B A, with A (r, in[, kh, kw]) and B (out, r[, 1, 1]).

* **Which layers.** The Linear and Conv2d layers whose ``weight`` the train method selects get an adapter
  (``LoraConfig(target_modules=<their exact names>)``). A LoRA cannot hold a bias or a norm's scale: the
  biases and norm parameters the method also selects (``to_out.0.bias`` in ESD-x, the group norms in
  ESD-u) stay the base model's. This is said when training starts and recorded (``lora_excluded`` in
  args.json). A method that selects no Linear or Conv2d weight at all is refused before the weights load.
* **theta*.** The same UNet with its adapters switched off: exactly the base model's forward, at no extra
  memory and without computing the LoRA branch. A whole frozen copy (``--frozen_copy`` or a second device)
  is taken before training, when B = 0, so it computes the base model's outputs too.
* **Start.** peft's ``gaussian`` initialisation, as diffusers' example: A ~ N(0, 1/r), B = 0, so training
  starts at the base model. A is drawn from ``seed`` without touching the global RNG, so seeded runs are
  bit-identical.
* **Outputs.** ``lora-NAME.safetensors``: the factors in the layout that ``esd export --format lora``
  writes (UNets: kohya, ``lora_down`` = A, ``lora_up`` = B, ``alpha``; SD3/FLUX: diffusers'
  ``transformer.<module>.lora_A`` = A, ``lora_B`` = (alpha / r) B, no alpha); and the merged weights
  W + (alpha / r) B A of the adapted layers in the run's usual files, so that everything that reads a run
  (``esd generate``, ``esd export``, the model card) works unchanged.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from esd.core.methods import TRAIN_METHODS, resolve_method
from esd.core.sampler import Conditioning
from esd.core.settings import setting
from esd.families.encode import call_unet
from esd.families.family import Family
from esd.families.models import denoiser_class
from esd.families.registry import applies, detect_family, select_parameters
from esd.families.sources import resolve_source
from esd.formats.exports import header_metadata, write_safetensors
from esd.formats.lora import LayerFactors, LoraExport, lora_metadata, lora_tensors
from esd.formats.records import environment_record

ADAPTER = "default"  # peft's adapter name
LORA_INIT = "gaussian"  # diffusers' train_text_to_image_lora.py: A ~ N(0, 1/r), B = 0


@dataclass
class LoraSettings:
    """LoRA training (``--lora_rank``) and the exports written after training (``--export``)."""

    lora_rank: int | None = setting(None, "train the erasure as a LoRA of this rank (peft) on the Linear/Conv2d "
                                    "layers the train method selects; the biases and norms it selects stay the base "
                                    "model's. Writes lora-NAME.safetensors (kohya layout; SD3/FLUX: diffusers' "
                                    "transformer layout) beside the merged weights")
    lora_alpha: float | None = setting(None, "the LoRA's alpha; its update is (alpha / rank) B A (default: the rank, "
                                       "as diffusers' LoRA examples)")
    export: list[str] = setting(default_factory=list, cli=False,
                                help="esd export formats written to RUN/export/ after training (--export)")
    export_options: dict = setting(default_factory=dict, cli=False,
                                   help="their ExportSettings fields (rank, max_rel_error, dtype): --export_<option>")


def _lora_able(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def lora_targets(unet: torch.nn.Module, method: str) -> tuple[list[str], list[str]]:
    """(the Linear/Conv2d modules whose weight ``method`` selects, the selected parameters a LoRA cannot
    hold). A method with no such module is a ValueError naming the methods that have some in this model."""
    modules = dict(unet.named_modules())
    targets, excluded = [], []
    for name in select_parameters(unet, method):
        module, _, param = name.rpartition(".")
        if param == "weight" and _lora_able(modules[module]):
            targets.append(module)
        else:
            excluded.append(name)
    if not targets:
        raise ValueError(f"--lora_rank: train method {method!r} selects no Linear or Conv2d weight (only "
                         f"{len(excluded)} biases/norm parameters, which a LoRA cannot hold); methods with LoRA "
                         f"layers in this model: {', '.join(_methods_with_lora_layers(unet))}")
    return targets, excluded


def _methods_with_lora_layers(unet: torch.nn.Module) -> list[str]:
    modules, family = dict(unet.named_modules()), detect_family(unet)
    found = []
    for name, spec in TRAIN_METHODS.items():
        try:
            selected = select_parameters(unet, name) if applies(spec, family) else []
        except ValueError:  # selects nothing in this model
            continue
        if any(n.endswith(".weight") and _lora_able(modules[n.rpartition(".")[0]]) for n in selected):
            found.append(name)
    return found


def check_lora_method(config, models=None) -> None:
    """Refuse a method without LoRA layers before any weights load: the UNet (or SD3/FLUX transformer) is built
    from its config on the meta device (no memory). A single-file base model is checked once loaded, by
    ``LoraTraining.attach``. Without --lora_rank there is nothing to check."""
    if not config.lora_rank:
        return
    if models is not None:
        lora_targets(models.unet, config.train_method)
    elif config.ckpt_path is None:
        cls, subfolder = denoiser_class(config.base_model)
        with torch.device("meta"):
            lora_targets(cls.from_config(cls.load_config(resolve_source(config.base_model), subfolder=subfolder)),
                         config.train_method)


class MethodTensors:
    """theta as the paper trains it: the train method's own tensors of the denoiser, saved as they are. The
    other kind is :class:`LoraTraining`; :func:`trained_tensors_of` picks one from the settings. Both answer
    the recipe and the run folder the same questions, so neither holds a branch for LoRA."""

    needs_full_state = False  # writing the erasure needs the whole base state dict (LoRA merges into it)

    def __init__(self, method: str):
        self.method = method

    def names(self, unet: torch.nn.Module) -> list[str]:
        return select_parameters(unet, self.method)

    def frozen(self, unet: torch.nn.Module):
        """theta* when there is a cheaper exact one than a copy of the trained tensors; None: the copy."""
        return None

    def describe(self) -> str | None:
        return None

    def erasure(self, unet: torch.nn.Module, trained: dict, base: dict | None) -> dict:
        """The tensors the run's weights files hold for the erasure: the trained ones themselves."""
        return trained

    def write_own(self, trained: dict, path, config, unet_config, family: Family, dtype: torch.dtype) -> None:
        """A file of its own beside the run's weights: none."""

    def saved_numel(self, unet: torch.nn.Module, trained: int) -> tuple[int, int]:
        """(elements of the erasure in the run's weights files, elements of its own file)."""
        return trained, 0

    def record(self) -> dict:
        return {}


def trained_tensors_of(cfg, unet: torch.nn.Module) -> "MethodTensors | LoraTraining":
    """What trains: LoRA adapters (attached to ``unet`` now) under --lora_rank, else the method's tensors."""
    if cfg.lora_rank:
        return LoraTraining.attach(unet, cfg.train_method, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    return MethodTensors(cfg.train_method)


@dataclass
class LoraTraining:
    """The adapters attached to a UNet for training, and what they produce."""

    modules: list[str]  # adapted Linear/Conv2d modules (diffusers names)
    excluded: list[str]  # selected parameters a LoRA cannot hold: kept frozen at the base model's values
    rank: int
    alpha: float

    @classmethod
    def attach(cls, unet: torch.nn.Module, method: str, rank: int, alpha: float, seed: int) -> "LoraTraining":
        modules, excluded = lora_targets(unet, method)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=LORA_INIT, target_modules=modules)
        with torch.random.fork_rng(devices=[]):  # A's draw is the seed's, and the global RNG is left as it was
            torch.manual_seed(seed)
            unet.add_adapter(config)
        return cls(modules, excluded, rank, alpha)

    @staticmethod
    def factor_names(unet: torch.nn.Module) -> list[str]:
        """The trained tensors: every layer's A and B (peft's ``lora_A`` / ``lora_B``)."""
        return [n for n, _ in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    needs_full_state = True  # the merged weights W + (alpha / r) B A are written beside the factors

    def names(self, unet: torch.nn.Module) -> list[str]:
        return self.factor_names(unet)

    def frozen(self, unet: torch.nn.Module) -> "AdaptersOff":
        return AdaptersOff(unet)

    def erasure(self, unet: torch.nn.Module, trained: dict, base: dict) -> dict:
        """The run's weights files hold the merged weights; the factors go to their own file (:meth:`write`)."""
        return self.merged(unet, base)

    def write_own(self, trained: dict, path, config, unet_config, family: Family, dtype: torch.dtype) -> None:
        self.write(trained, path, config, unet_config, family, dtype)

    def saved_numel(self, unet: torch.nn.Module, trained: int) -> tuple[int, int]:
        return self.merged_numel(unet), trained

    def merged_numel(self, unet: torch.nn.Module) -> int:
        """Elements of the merged weights written beside the factors."""
        modules = dict(unet.named_modules())
        return sum(modules[m].base_layer.weight.numel() for m in self.modules)

    @torch.no_grad()
    def merged(self, unet: torch.nn.Module, base: dict) -> dict[str, torch.Tensor]:
        """The adapted layers' erased weights W + (alpha / r) B A (fp32, CPU), W from ``base`` (full
        precision, diffusers names); the product is peft's own (``get_delta_weight``)."""
        modules = dict(unet.named_modules())
        return {f"{m}.weight": base[f"{m}.weight"].float()
                + modules[m].get_delta_weight(ADAPTER).float().cpu() for m in self.modules}

    def export(self, factors: dict, unet_config, family: Family, dtype: torch.dtype):
        """The trained ``factors`` as ``esd export --format lora`` holds a LoRA (kohya names, one alpha; for
        SD3/FLUX diffusers' names and no alpha, so B carries the scale alpha / r): a
        :class:`esd.formats.lora.LoraExport` whose error is zero, since the factors are the erasure itself."""
        alpha = None if family.kohya is None else self.alpha
        up_factor = 1.0 if alpha is not None else self.alpha / self.rank
        layers = {m: LayerFactors(factors[f"{m}.lora_A.{ADAPTER}.weight"].to(dtype).contiguous(),
                                  (factors[f"{m}.lora_B.{ADAPTER}.weight"].float() * up_factor).to(dtype).contiguous(),
                                  self.rank, 0.0)
                  for m in self.modules}
        return LoraExport(lora_tensors(layers, alpha, unet_config, family, dtype), layers, {}, 0.0, alpha)

    def write(self, factors: dict, path, config, unet_config, family: Family, dtype: torch.dtype) -> None:
        """``lora-NAME.safetensors``: the factors in the family's layout, with the header ``esd export`` writes
        (base model, concept, method, rank, alpha) and the run's settings and versions."""
        export = self.export(factors, unet_config, family, dtype)
        record = {"source": "esd train --lora_rank (the trained factors)",
                  "base_model": config.ckpt_path or config.base_model, "concept": config.prompt,
                  "train_method": resolve_method(config.train_method).name, "erasure": config.record(),
                  "excluded": self.excluded, "environment": environment_record()}
        write_safetensors(export.tensors, {**header_metadata(record), **lora_metadata(export, self.rank, 0.0, family,
                                                                                Path(path).stem,
                                                                                str(record["base_model"]))}, path)

    def record(self) -> dict:
        """What args.json adds about the adapters."""
        return {"lora_layers": len(self.modules), "lora_excluded": self.excluded}

    def describe(self) -> str:
        left = (f"; {len(self.excluded)} biases/norm parameters the method selects stay the base model's "
                "(a LoRA cannot hold them)") if self.excluded else ""
        return f"  LoRA rank {self.rank}, alpha {self.alpha:g} on {len(self.modules)} Linear/Conv2d layers{left}"


def plain_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict under diffusers' own names, without adapters (peft renames an adapted layer's
    weight ``<module>.base_layer.weight``)."""
    return {k.replace(".base_layer.", "."): v.detach().cpu() for k, v in unet.state_dict().items()
            if ".lora_" not in k}


class AdaptersOff:
    """theta* of a LoRA-trained UNet: the same module with its adapters switched off, which peft runs as
    the base layer alone (the base model's forward, exactly). The adapted layers are found once."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

    @contextmanager
    def off(self):
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:  # back on, trainable again (peft's enable_adapters sets requires_grad)
                layer.enable_adapters(True)

    @torch.no_grad()
    def __call__(self, latents, timesteps, cond: Conditioning):
        with self.off():
            return call_unet(self.unet, latents, timesteps, cond)
