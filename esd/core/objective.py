"""The ESD objective: the negatively guided target and the loss, from named frozen predictions."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FrozenPredictions:
    """theta*'s predictions at one batch of (x_t, t), each (B, C, h, w), named as in the paper: raw (the
    model's own prediction type, as the sampler steps with them) or, after ``UNetViews.eps_of``, epsilon
    (the space :func:`esd_target` needs; the velocity itself for flow models)."""

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

    All inputs must be in epsilon space (see :func:`esd.core.sampler.to_epsilon`), or all velocities for the
    flow-matching transformers (SD3, FLUX), where the same formula holds (see :func:`esd_loss`).
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

    Flow-matching transformers (SD3/SD3.5, FLUX.1) predict the velocity v = eps - x0 at
    x_t = (1 - s) x0 + s eps. At fixed (x_t, s) the model's x0 = x_t - s v, so v = (eps - x_t) / (1 - s):
    an affine map of eps. An affine map commutes with an affine combination whose weights sum to 1,
    and the target's do (1 + eta and -eta, or 1, -(eta + 1) and eta + 1 with --erase_from), so
    v0 - eta (vp - v0) is exactly the velocity of the epsilon-space target: the same erasure, built in
    the model's own space. The MSE is taken there too, as the issue asks and as these models are
    trained (rectified-flow loss on v): in epsilon terms it weights each step by 1 / (1 - s)², so the
    noisy end (s -> 1) counts more than under the paper's epsilon loss, as it does in the models'
    own training. It is also the only informative choice at s = 1 (the schedule's first step), where
    eps = x_t + (1 - s) v = x_t whatever v is, so an epsilon-space loss would be zero there.
    """
    return F.mse_loss(noise_pred.float(), target.float())
