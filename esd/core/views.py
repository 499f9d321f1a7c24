"""The two views of one UNet that ESD trains with: theta (trained) and theta* (frozen).

With one device and no ``frozen_copy``, theta* is kept only for the trained parameters and
swapped in with ``torch.func.functional_call``, so the UNet lives in memory once. With
``frozen_copy`` (the original code's layout) or a second device, a whole frozen UNet is kept.

Precision policy (as diffusers' training examples): frozen weights in the low-precision dtype;
trained parameters, the target and the loss in fp32; forwards under autocast.

The model is called through ``call`` (its family's, :func:`esd.families.encode.call_unet`), so nothing here
knows which family it is.
"""

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch

from esd.core.objective import FrozenPredictions
from esd.core.sampler import Conditioning, PromptConditioning, to_epsilon

# call(model, latents (B, C, h, w), timesteps (B,), cond, params=None) -> the raw prediction, like latents;
# ``params`` replace the module's own tensors (theta* through torch.func.functional_call).
DenoiserCall = Callable[..., torch.Tensor]


@dataclass
class TrainedRows:
    """Latent rows for the trained view and the target (epsilon space; flow models: velocity) that its
    predictions there are regressed onto. A step's groups go through the trained view in one forward
    (one call is cheaper than one per group) and each adds ``weight`` x its MSE to the loss."""

    name: str  # its loss.csv column (the ESD rows themselves: "esd", whose loss is the column "loss")
    latents: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    cond: Conditioning  # B rows
    target: torch.Tensor  # fp32, like latents
    weight: float = 1.0


class FrozenUNet:
    """theta*: predictions of the UNet as it was before training."""

    def __init__(self, unet: torch.nn.Module, trained_names: list[str], dtype: torch.dtype,
                 device: torch.device | None = None, *, call: DenoiserCall):
        self.call = call
        if device is not None:  # a whole frozen copy on this device
            self.module = deepcopy(unet).to(device=device, dtype=dtype).requires_grad_(False)
            self.params = None
        else:
            self.module = unet
            params = dict(unet.named_parameters())
            self.params = {n: params[n].detach().clone().to(dtype) for n in trained_names}

    @torch.no_grad()
    def __call__(self, latents, timesteps, cond: Conditioning):
        if self.params is None:
            device = next(self.module.parameters()).device
            out = self.call(self.module, latents.to(device), timesteps.to(device), cond.to(device))
            return out.to(latents.device)
        return self.call(self.module, latents, timesteps, cond, self.params)


class UNetViews:
    """theta and theta* of ``unet``: raw predictions (the model's own type) from either, their
    conversion to epsilon, and a count of latent rows through the UNet (for benchmarks)."""

    def __init__(self, unet: torch.nn.Module, trained_names: list[str], dtype: torch.dtype, device: torch.device,
                 frozen_device: torch.device | None, alphas_cumprod: torch.Tensor | None, prediction_type: str,
                 frozen_unet=None, *, call: DenoiserCall, true_cfg: bool):
        """``frozen_unet``: theta* when the caller has a cheaper exact one (a LoRA's adapters switched off);
        ``call``: the family's call of its denoiser; ``true_cfg``: the model samples x_t with one conditional
        pass, its guidance an input (FLUX.1-dev, :attr:`esd.families.family.Family.true_cfg`)."""
        self.unet, self.dtype, self.device, self.call = unet, dtype, device, call
        self.frozen_unet = frozen_unet or FrozenUNet(unet, trained_names, dtype, frozen_device, call=call)
        trained = set(trained_names)
        for name, p in unet.named_parameters():
            if name in trained:  # fp32 even when the model was loaded in the low-precision dtype
                p.data = p.data.float()
                p.requires_grad_(True)
            else:
                p.data = p.data.to(dtype)
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.true_cfg = true_cfg
        self.evals = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def trained(self, latents, timesteps, cond: Conditioning) -> torch.Tensor:
        """eps_theta (raw prediction), with gradients to the trained parameters."""
        self.evals += latents.shape[0]
        return self.call(self.unet, latents, timesteps, cond)

    def frozen(self, latents, timesteps, cond: Conditioning) -> torch.Tensor:
        """eps_theta* (raw prediction), no gradients."""
        self.evals += latents.shape[0]
        return self.frozen_unet(latents, timesteps, cond)

    def to_eps(self, prediction, latents, timesteps) -> torch.Tensor:
        """The prediction in the space the ESD target and loss are built in: epsilon for the UNets; for
        flow models (``flow``) the velocity itself, the model's own space (see :func:`esd.core.objective.esd_loss`)."""
        if self.prediction_type == "flow":
            return prediction
        return to_epsilon(prediction, latents, timesteps, self.alphas_cumprod, self.prediction_type)

    def frozen_predictions(self, latents, timesteps, prompts: PromptConditioning,
                           concept: torch.Tensor) -> FrozenPredictions:
        """theta*'s raw predictions (fp32) at (x_t, t) for "", the concept and the erase-from prompt,
        in one batched call: rows [uncond (B), concept (B), erase_from (B)]."""
        b = latents.shape[0]
        conds = [prompts.uncond_rows(b), prompts.concept(concept)]
        if prompts.erase_from is not None:
            conds.append(prompts.source(concept))
        n = len(conds)
        with self.autocast():
            pred = self.frozen(latents.repeat(n, 1, 1, 1), timesteps.repeat(n), Conditioning.cat(conds)).float()
        return FrozenPredictions(*pred.split(b))

    def eps_of(self, predictions: FrozenPredictions, latents, timesteps) -> FrozenPredictions:
        """The same predictions in epsilon space (where the ESD target is built)."""
        e_from = predictions.erase_from
        return FrozenPredictions(self.to_eps(predictions.uncond, latents, timesteps),
                                 self.to_eps(predictions.concept, latents, timesteps),
                                 None if e_from is None else self.to_eps(e_from, latents, timesteps))
