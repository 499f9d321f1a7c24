"""The ESD objective: the negatively guided target and the loss, from named frozen predictions."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FrozenPredictions:
    """theta*'s predictions at one batch of (x_t, t), each (B, C, h, w), named as in the paper: raw (the
    model's own prediction type, as the sampler steps with them) or, after ``UNetViews.eps_of``, epsilon
    (the space :func:`esd_target` needs)."""

    uncond: torch.Tensor  # e0 = eps_theta*(x_t, t): the empty prompt
    concept: torch.Tensor  # ep = eps_theta*(x_t, c, t): the concept to erase
    erase_from: torch.Tensor | None = None  # e_from = eps_theta*(x_t, c_from, t) with --erase_from

    @property
    def source(self) -> torch.Tensor:
        """The prediction for the prompt x_t is sampled with: e_from with --erase_from, else ep."""
        return self.concept if self.erase_from is None else self.erase_from


def esd_target(noise_pred_uncond: torch.Tensor, noise_pred_concept: torch.Tensor, negative_guidance: float,
               noise_pred_erase_from: torch.Tensor | None = None) -> torch.Tensor:
    """Negatively guided target of ESD, Eq. (4) of Gandikota et al., "Erasing Concepts from
    Diffusion Models" (ICCV 2023):

        eps_theta(x_t, c, t)  <-  eps_theta*(x_t, t) - eta * (eps_theta*(x_t, c, t) - eps_theta*(x_t, t))
                               =  e0 - eta (ep - e0)  =  ep - (eta + 1) (ep - e0)

    ``noise_pred_uncond`` is e0 (empty prompt), ``noise_pred_concept`` is ep and
    ``negative_guidance`` is eta. To erase an attribute from a concept only ("cowboy hat"
    from "cowboy"), the frozen prediction for that prompt, e_from, takes ep's place in the
    last form: ``e_from - (eta + 1) (ep - e0)``. Erasing c from c itself (e_from = ep) is
    the paper's target, so one rule holds for both: eta = 0 removes the concept direction
    exactly once, eta > 0 pushes past it.

    The official codes write ``e_from - eta_off (ep - e0)`` with e_from = ep when nothing
    is given: eta_off = eta + 1 in every case. The current esd_sd.py's default eta_off = 2
    is our (and the paper's) eta = 1; esd_sdxl.py's default eta_off = 1 is our eta = 0.

    All inputs must be in epsilon space (see :func:`esd.sampling.to_epsilon`).
    """
    if noise_pred_erase_from is None:
        return noise_pred_uncond - negative_guidance * (noise_pred_concept - noise_pred_uncond)
    return noise_pred_erase_from - (negative_guidance + 1) * (noise_pred_concept - noise_pred_uncond)


def target_of(predictions: FrozenPredictions, negative_guidance: float) -> torch.Tensor:
    """The ESD target from named frozen predictions (see :func:`esd_target`)."""
    return esd_target(predictions.uncond, predictions.concept, negative_guidance, predictions.erase_from)


def esd_loss(noise_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the trained model's epsilon prediction and the ESD target, in fp32.

    For v-prediction models (SD 2.x 768-v) both sides are converted to epsilon
    before the loss. The target is an affine combination (weights 1 + eta, -eta)
    of predictions at the same x_t, so building it in v space would give the same
    target mapped through v = (eps - s·x_t) / a; but the MSE there is scaled by
    1 / a² = 1 / alpha_bar_t, which over-weights noisy timesteps against the
    paper's epsilon-space loss. Converting first keeps the paper's weighting.
    """
    return F.mse_loss(noise_pred.float(), target.float())
