"""The scheduler that samples x_t for each family (DDIM or the model's own; flow matching for SD3/FLUX),
and the check of a model's own scheduler before any weights load."""


import diffusers
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from esd.families.flow import flow_scheduler


def sampler_scheduler(scheduler, kind: str, steps: int, latent_size: tuple[int, int] | None = None,
                      linspace_sigmas: bool = False):
    """The scheduler that samples x_t, with ``steps`` timesteps set: ``ddim`` (the paper's sampler,
    eta 0) from the model's schedule, or ``model``, the model's own class (PNDM for SD1.4, as the
    current official code samples). Schedulers that work on sigma-scaled latents (Euler, LMS) are
    refused: their x_t is not the x_t the UNet is trained on without input scaling. Flow-matching
    models (a ``FlowMatchEulerDiscreteScheduler``) sample with :func:`esd.families.flow.flow_scheduler` for
    either kind; ``latent_size`` (h, w) sets FLUX's resolution-dependent shift, ``linspace_sigmas``
    FluxPipeline's sigmas (Family.linspace_sigmas)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return flow_scheduler(scheduler, steps, latent_size, linspace_sigmas)
    own = DDIMScheduler.from_config(scheduler.config) if kind == "ddim" else \
        type(scheduler).from_config(scheduler.config)
    own.set_timesteps(steps)
    if float(own.init_noise_sigma) != 1.0:
        raise ValueError(f"--sampler_scheduler model: {type(scheduler).__name__} samples sigma-scaled latents "
                         "(init_noise_sigma != 1), which ESD's x_t cannot be (esd_sdxl.py queries the UNet at them "
                         "unscaled); use --sampler_scheduler ddim")
    return own


def check_model_scheduler(source: str) -> None:
    """``--sampler_scheduler model`` on a model folder (or a cached hub id) whose own scheduler works on
    sigma-scaled latents (Euler, LMS: SDXL base 1.0 ships Euler) is refused from its scheduler config, before
    any weights load, with :func:`sampler_scheduler`'s message. Unreadable configs are left to that check."""
    try:
        config = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler")
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)) or \
                issubclass(cls, FlowMatchEulerDiscreteScheduler):
            return
        scheduler = cls.from_config(config)
    except Exception:  # noqa: BLE001 - a hub id not cached, a folder without a scheduler: checked once loaded
        return
    sampler_scheduler(scheduler, "model", 50)
