"""Where x_t comes from. Each source hands the trainer one :class:`Batch` per iteration:
the latents, the timestep to query them at, their noise level, the concept and the ESD target.

* :class:`FreshTrajectory`: the paper's loop. Every iteration samples a new partial trajectory
  from noise to a random stopping step with the guided sampler, then asks theta* for the target.
* :class:`TrajectoryPool`: the fast path. ``pool_size`` whole trajectories are sampled at once by
  theta*; at every step the guided sampler computes e0 and ep anyway, so each (x_t, t, target)
  on them is stored and trained on once, in random order, before the pool is sampled anew.
"""

from dataclasses import dataclass

import torch

from esd.core.objective import target_of
from esd.core.sampler import PromptConditioning, classifier_free_guidance, denoise, initial_noise_sigma, repeat_timestep
from esd.core.views import UNetViews


@dataclass
class Batch:
    """One iteration's training data; every tensor has one row per latent."""

    latents: torch.Tensor  # x_t, (B, C, h, w)
    timesteps: torch.Tensor  # the timestep the models are queried at, (B,)
    xt_level: torch.Tensor  # the timestep whose noise level x_t has (the sampler's last reached), (B,); 0: clean
    ddim_index: torch.Tensor  # the stopping step drawn among the sampler's T steps (t_enc of the paper's code), (B,)
    concept: torch.Tensor  # index of the concept word, (B,)
    target: torch.Tensor  # the ESD target in epsilon space (flow models: velocity), fp32, (B, C, h, w)


def original_pairing(timesteps: torch.Tensor, stop_index: int, num_train_timesteps: int):
    """The paper's original code (CompVis ``train-esd.py`` with its DDIM sampler) for the stopping
    step k = ``t_enc``, drawn uniformly in [0, T). Its sampler drops the schedule's first timestep
    (``t_start=-1``) and breaks once it has evaluated the timestep of index k (counting up from
    the end), so it runs T - max(k, 1) steps from the second timestep (961 for T = 50); x_t ends at
    the noise level of timestep 20k - 39 (k >= 2; fully denoised for k <= 1). The models are then
    queried at a DDPM step drawn in [round(1000 k / T), round(1000 (k + 1) / T)).

    Returns (the sampler's timesteps, x_t's level (0: fully denoised), (low, high) of the query).
    """
    T = len(timesteps)
    end = 1 + T - max(stop_index, 1)
    level = int(timesteps[end]) if end < T else 0
    low = round(stop_index / T * num_train_timesteps)
    high = round((stop_index + 1) / T * num_train_timesteps)
    return timesteps[1:end], level, (low, high)


def matched_pairing(timesteps: torch.Tensor, stop_index: int):
    """The sampler runs ``stop_index`` steps from noise; x_t is at ``timesteps[stop_index]`` and is
    queried there (the current official code; for flow models, x_t at s = timestep / 1000, queried at that
    timestep). Returns (the sampler's timesteps, x_t's level: an int, or a float for flow matching)."""
    return timesteps[:stop_index], timesteps[stop_index].item()


class XtSource:
    """What both sources share: the settings, the two views, the sampler's scheduler, the encoded
    prompts, the latent shape (B, C, h, w) and the trainer's generator (all their randomness).
    ``config`` is the run's settings (an :class:`esd.train.config.ESDConfig`); the sources read its
    batch_size, pool_size, ddim_steps, words, start_guidance, negative_guidance, sampler_model and
    timestep_mode."""

    def __init__(self, config, views: UNetViews, scheduler, prompts: PromptConditioning,
                 latent_shape: tuple, generator: torch.Generator):
        self.config, self.views, self.scheduler, self.prompts = config, views, scheduler, prompts
        self.latent_shape, self.generator = latent_shape, generator

    def state_dict(self) -> dict | None:
        """State to checkpoint beyond the trainer's generator (None: none)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class FreshTrajectory(XtSource):
    """The paper's loop: for every batch, a concept and a stopping step k are drawn and x_t is
    sampled from fresh noise by the guided sampler (theta* or theta, per ``sampler_model``); the
    target comes from one batched theta* call at (x_t, t)."""

    def next_batch(self, stop_index: int | None = None) -> Batch:
        """A new batch; ``stop_index`` forces k (the draw still happens, so the random stream is the same)."""
        cfg, g, views, b = self.config, self.generator, self.views, self.config.batch_size
        concept = torch.randint(len(cfg.words), (1,), generator=g).repeat(b)
        k = int(torch.randint(cfg.ddim_steps, (1,), generator=g))
        k = k if stop_index is None else stop_index
        noise = torch.randn(self.latent_shape, generator=g).to(views.device)
        self.scheduler.set_timesteps(cfg.ddim_steps)  # also resets a multistep scheduler's history
        schedule = self.scheduler.timesteps
        if cfg.timestep_mode == "original":
            run, level, (low, high) = original_pairing(schedule, k, self.scheduler.config.num_train_timesteps)
        else:
            run, level = matched_pairing(schedule, k)
        sampler = views.frozen if cfg.sampler_model == "frozen" else views.trained
        with views.autocast():
            latents = denoise(sampler, self.scheduler, noise, self.prompts.source(concept),
                              self.prompts.sampler_uncond_rows(b), cfg.start_guidance if views.true_cfg else None, run)
        if cfg.timestep_mode == "original":
            timesteps = torch.randint(low, high, (b,), generator=g)
        else:
            timesteps = torch.full((b,), level)
        timesteps = timesteps.to(views.device)
        predictions = views.eps_of(views.frozen_predictions(latents, timesteps, self.prompts, concept),
                                   latents, timesteps)
        return Batch(latents, timesteps, torch.full((b,), level), torch.full((b,), k), concept,
                     target_of(predictions, cfg.negative_guidance))


class TrajectoryPool(XtSource):
    """Trajectory reuse: each entry trains once, so every x_t is a fresh draw from the same
    distribution as the paper's loop with the frozen sampler (x_t from theta*'s guided sampler,
    the step uniform over the schedule), at a fraction of the UNet evaluations."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pool: dict | None = None  # the current trajectories' entries, their order and a cursor

    @torch.no_grad()
    def refresh(self) -> None:
        """Sample ``pool_size`` whole trajectories with theta* and keep, at every step, (x_t, t) and
        the target from the predictions the guided sampler computed there (one batched call per step)."""
        cfg, g, views, k = self.config, self.generator, self.views, self.config.pool_size
        concept = torch.randint(len(cfg.words), (k,), generator=g)
        noise = torch.randn((k, *self.latent_shape[1:]), generator=g).to(views.device)
        self.scheduler.set_timesteps(cfg.ddim_steps)
        x = noise * initial_noise_sigma(self.scheduler)
        xs, ts, targets = [], [], []
        for t in self.scheduler.timesteps:
            timesteps = repeat_timestep(t, k, views.device)
            predictions = views.frozen_predictions(x, timesteps, self.prompts, concept)
            targets.append(target_of(views.eps_of(predictions, x, timesteps), cfg.negative_guidance))
            xs.append(x)
            ts.append(timesteps.cpu())
            # The sampler's own guided step: "" and the prompt x_t is sampled with (FLUX: that prompt's
            # prediction alone, its guidance being in the embedding or distilled away). SDXL's --sdxl_uncond
            # official samples with another unconditional prompt than e0's: its prediction is one more call.
            uncond = predictions.uncond
            if views.true_cfg and self.prompts.sampler_uncond is not None:
                with views.autocast():
                    uncond = views.frozen(x, timesteps, self.prompts.sampler_uncond_rows(k)).float()
            guided = classifier_free_guidance(uncond, predictions.source, cfg.start_guidance) \
                if views.true_cfg else predictions.source
            x = self.scheduler.step(guided, t, x).prev_sample
        steps = len(xs)
        self.pool = {"latents": torch.cat(xs), "timesteps": torch.cat(ts), "targets": torch.cat(targets),
                     "concept": concept.repeat(steps), "ddim_index": torch.arange(steps).repeat_interleave(k),
                     "order": torch.randperm(steps * k, generator=g), "cursor": torch.tensor(0)}

    def next_batch(self) -> Batch:
        """``batch_size`` unused entries of the pool; sampled anew when fewer remain."""
        b = self.config.batch_size
        if self.pool is None or int(self.pool["cursor"]) + b > len(self.pool["order"]):
            self.refresh()
        p = self.pool
        start = int(p["cursor"])
        idx = p["order"][start:start + b]
        p["cursor"] = torch.tensor(start + b)
        timesteps = p["timesteps"][idx]
        return Batch(p["latents"][idx], timesteps.to(self.views.device), timesteps, p["ddim_index"][idx],
                     p["concept"][idx], p["targets"][idx])

    def state_dict(self) -> dict | None:
        return self.pool

    def load_state_dict(self, state: dict | None) -> None:
        self.pool = state


def make_source(config, *args) -> XtSource:
    """The x_t source the config asks for (arguments as XtSource's constructor)."""
    return (TrajectoryPool if config.pool_size else FreshTrajectory)(config, *args)
