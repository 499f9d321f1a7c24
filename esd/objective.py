"""The ESD objective."""

import torch
import torch.nn.functional as F


def esd_target(noise_pred_base: torch.Tensor, noise_pred_uncond: torch.Tensor,
               noise_pred_concept: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """Negatively guided target of ESD, Eq. (4) of Gandikota et al., "Erasing
    Concepts from Diffusion Models" (ICCV 2023):

        eps_theta(x_t, c, t)  <-  eps_theta*(x_t, t) - eta * (eps_theta*(x_t, c, t) - eps_theta*(x_t, t))

    ``noise_pred_uncond`` is eps_theta*(x_t, t) (empty prompt), ``noise_pred_concept``
    is eps_theta*(x_t, c, t) and ``negative_guidance`` is eta. ``noise_pred_base`` is
    the first term: eps_theta*(x_t, t) itself for plain erasure, or the frozen
    prediction for the erase-from prompt when an attribute is erased from a
    concept ("cowboy hat" from "cowboy").

    Conventions: the current official ESD code writes the plain target as
    ``ep - eta_off * (ep - e0)``; that equals ``e0 - (eta_off - 1) * (ep - e0)``,
    so its eta_off = 2 default is the paper's (and our) eta = 1. With an
    erase-from prompt both codes write ``e_from - eta * (ep - e0)``: eta is the same.

    All inputs must be in epsilon space (see :func:`esd.sampling.to_epsilon`).
    """
    return noise_pred_base - negative_guidance * (noise_pred_concept - noise_pred_uncond)


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
