import torch
from diffusers import DDIMScheduler

from esd.core.objective import esd_loss, esd_target
from esd.core.sampler import to_epsilon


def test_target_matches_hand_computed_values():
    e0 = torch.tensor([1.0, 2.0, -1.0])
    ep = torch.tensor([3.0, 1.0, -1.0])
    # eta = 1: e0 - (ep - e0) = [1 - 2, 2 + 1, -1 - 0]
    assert torch.equal(esd_target(e0, ep, 1.0), torch.tensor([-1.0, 3.0, -1.0]))
    # eta = 1 with an erase-from prediction e_from = [0, 0, 5]: e_from - 2 (ep - e0)
    e_from = torch.tensor([0.0, 0.0, 5.0])
    assert torch.equal(esd_target(e0, ep, 1.0, e_from), torch.tensor([-4.0, 2.0, 5.0]))
    # eta = 0 leaves the unconditional prediction: the concept maps to "nothing"
    assert torch.equal(esd_target(e0, ep, 0.0), e0)
    # one rule: erasing c from c itself (e_from = ep) is the plain target, for every eta
    for eta in (0.0, 1.0, 2.5):
        assert torch.allclose(esd_target(e0, ep, eta, ep), esd_target(e0, ep, eta))


def test_official_code_convention_maps_to_paper_eta():
    """The official codes write e_from - eta_off (ep - e0), e_from = ep without an erase-from prompt:
    eta_off = eta + 1 in both cases (esd_sd.py's default 2 is our 1, esd_sdxl.py's 1 is our 0)."""
    g = torch.Generator().manual_seed(0)
    e0, ep, e_from = torch.randn(3, 4, 8, 8, generator=g)
    for eta in (0.0, 1.0, 2.0):
        assert torch.allclose(ep - (eta + 1) * (ep - e0), esd_target(e0, ep, eta), atol=1e-6)
        assert torch.allclose(e_from - (eta + 1) * (ep - e0), esd_target(e0, ep, eta, e_from), atol=1e-6)


def _schedule_terms(t):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a_bar = sched.alphas_cumprod[t]
    return sched.alphas_cumprod, a_bar.sqrt().view(-1, 1, 1, 1), (1 - a_bar).sqrt().view(-1, 1, 1, 1)


def test_v_and_sample_predictions_convert_to_epsilon():
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([10, 500, 990])
    alphas_cumprod, a, s = _schedule_terms(t)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=g)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    assert torch.allclose(to_epsilon(v, x_t, t, alphas_cumprod, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_epsilon(x0, x_t, t, alphas_cumprod, "sample"), eps, atol=1e-4)
    assert to_epsilon(eps, x_t, t, alphas_cumprod, "epsilon") is eps


def test_v_prediction_loss_is_the_paper_loss_in_epsilon_space():
    """For a v-prediction model the loss must equal the epsilon-space ESD loss; the naive
    v-space MSE differs by the factor 1/alpha_bar_t (here checked numerically)."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([700])
    alphas_cumprod, a, s = _schedule_terms(t)
    x_t, v_trained, v0, vp = torch.randn(4, 1, 4, 8, 8, generator=g)
    # Hand computation in epsilon space: eps = a v + s x_t.
    eps_trained, e0, ep = (a * v + s * x_t for v in (v_trained, v0, vp))
    reference = ((eps_trained - (e0 - 1.0 * (ep - e0))) ** 2).mean()
    to_eps = lambda v: to_epsilon(v, x_t, t, alphas_cumprod, "v_prediction")
    loss = esd_loss(to_eps(v_trained), esd_target(to_eps(v0), to_eps(vp), 1.0))
    assert torch.allclose(loss, reference, rtol=1e-5)
    # The target is affine in the predictions, so the v-space target is the same point...
    v_target = esd_target(v0, vp, 1.0)
    assert torch.allclose(a * v_target + s * x_t, e0 - (ep - e0), atol=1e-5)
    # ...but the v-space MSE is scaled by 1 / a^2 relative to the paper's loss.
    naive = esd_loss(v_trained, v_target)
    assert torch.allclose(naive * a.squeeze() ** 2, reference, rtol=1e-4)
    assert not torch.allclose(naive, reference, rtol=1e-2)
