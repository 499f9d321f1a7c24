"""Robust ESD: erase the concept from the conditioning an attacker would find, not only from the literal word.

Every ``adv_every`` iterations an attack of :mod:`esd.train.attacks` (those of ``esd attack``) finds
conditioning that brings the concept back from the model being trained; each ESD step then trains on it beside
the literal concept. A preservation term keeps the predictions for prompts that must not change where the frozen
model had them. What is borrowed:

* AdvUnlearn (Zhang et al. 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure
  in Diffusion Models"): the bi-level loop. Its lower level is UnlearnDiffAtk's prefix attack on the current
  model (our ``prefix``); its upper level is the ESD loss with the adversarial prompt as the trained model's
  input and the literal concept's target, plus a retain loss ||eps_theta(x_t, c~) - eps_theta*(x_t, c~)||^2
  on prompts c~ that must not change, weighted by gamma (our ``retain_weight``).
* Receler (Huang et al. 2023, "Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via
  Lightweight Erasers"): adversarial prompt learning alternated with erasure, each attack continuing from the
  last adversarial embedding rather than starting over, so a few attack steps per round suffice.
* RECE (Gong et al. 2024, "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models"): a
  continuous embedding that regenerates the concept under the current model is derived and erased in turn,
  round after round (our ``inversion``: one learned token, concept inversion), and every embedding derived so
  far stays erased. Our ``adv_memory``: the adversarial rows are drawn from the last N rounds' conditionings.

Design: the adversarial row uses the batch's own x_t (sampled with the literal concept) and the literal
concept's ESD target e0 - eta (ep - e0) there. The attacker's conditioning is made to stand for the concept,
so the model must answer it as the erased model answers the concept; targeting theta*'s prediction for the
adversarial conditioning instead would teach nothing where theta* never drew the concept from it. The literal
row's loss is kept as in plain ESD and the adversarial and retain terms are added to it (not averaged), so
the literal erasure proceeds as in plain ESD. Costs per iteration, beyond plain ESD: batch_size trained rows
for the adversarial term; batch_size frozen and trained rows for the retain term; adv_steps x adv_references
forward and backward rows every adv_every iterations for the attack. The trained rows of both terms go
through the trained model in the same forward as the literal rows: one call of 3 x batch_size rows costs
about 40% less than three calls on the 2-core CPU's toy UNet.
"""


import torch
from diffusers import DDPMScheduler

from esd.core.sampler import Conditioning, PromptConditioning, denoise
from esd.core.views import TrainedRows
from esd.families.encode import encode_prompts
from esd.families.schedulers import sampler_scheduler
from esd.train.attacks import ATTACKS
from esd.train.attacks.inversion import TOKEN, inversion_attack, inversion_prompt
from esd.train.attacks.prefix import check_prefix_fits, prefix_attack, word_tokens
from esd.train.attacks.target import Target, add_placeholders, slot_embeddings, token_ids
from esd.train.extension import Extension
from esd.train.robust_settings import check_retain_memory, is_robust, read_retain_prompts
from esd.train.text_encoder import check_loaded_text_encoders


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """x_t of x_0 at the engine's ``timesteps``: the UNets' q(x_t | x_0) (``noise_scheduler``, a DDPMScheduler),
    or, where it is None, the flow-matching path x_t = (1 - s) x_0 + s eps at s = timestep / 1000
    (esd.families.flow)."""
    if noise_scheduler is not None:
        return noise_scheduler.add_noise(x0, noise, timesteps)
    s = (timesteps.float() / 1000).to(x0.device).view(-1, *[1] * (x0.dim() - 1))
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


class RobustESD(Extension):
    """The adversarial and preservation terms of one robust run, and their state (checkpointed)."""

    name = "robust"

    @classmethod
    def from_settings(cls, cfg, models, prompts: PromptConditioning, latent_shape: tuple, image_size: int,
                      text_encoder=None) -> "RobustESD | None":
        """The run's (see ``__init__``); None when neither --adversarial nor --retain_prompts is set."""
        return cls(cfg, models, prompts, latent_shape, image_size, text_encoder) if is_robust(cfg) else None

    def __init__(self, cfg, models, prompts: PromptConditioning, latent_shape: tuple, image_size: int,
                 text_encoder=None):
        """Takes what it needs from ``models`` before the trainer drops the text encoders: the retain prompts
        encoded once, and, for ``--adversarial``, the first text encoder and tokenizer (frozen, unless
        ``text_encoder``, the run's :class:`esd.train.text_encoder.TrainedTextEncoder`, trains it: then the trained
        rows' conditioning is encoded anew, with gradient, at every step). ``prompts``: the trainer's encoded
        prompts; ``latent_shape``: (B, C, h, w)."""
        self.cfg, self.prompts, self.latent_shape, self.text_encoder = cfg, prompts, latent_shape, text_encoder
        self.sampler = sampler_scheduler(models.scheduler, cfg.sampler_scheduler, cfg.ddim_steps,  # its own copy
                                         latent_shape[2:], models.family.linspace_sigmas)
        # the UNets' forward noising q(x_t | x_0), for the attacks and the retain term; None: flow matching's
        flow = models.family.flow
        self.noise_scheduler = None if flow else DDPMScheduler.from_config(models.scheduler.config)
        self.retain = self.retain_prompt_list = None
        if cfg.retain_prompts is not None:
            self.retain_prompt_list = read_retain_prompts(cfg.retain_prompts, cfg.words)
            check_retain_memory(models, self.retain_prompt_list, image_size, latent_shape, cfg.start_guidance)
            # encoded as the erasure's prompts are (SDXL's pooled embeddings and time ids, SD3's and FLUX's too)
            self.retain = encode_prompts(models, self.retain_prompt_list, image_size, guidance=cfg.start_guidance)
            if text_encoder is not None:
                self.retain_ids = text_encoder.ids(self.retain_prompt_list)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # the attacks' starts, timesteps and noise
        self.iteration = 0  # iterations seen: an attack runs before every adv_every-th
        self.references = self.retain_latents = None  # x_0 of the concept / of each retain prompt, made at first use
        self.start = None  # the attack's continuous state
        self.memory = []  # the slot rows each of the last adv_memory rounds found (prefix: (k, D); inversion: (1, D))
        self.adversarial = None  # the memory's conditionings, one row each (M, L, D)
        self.last = None  # the last attack round's result, for args.json
        self.target = None
        if cfg.adversarial is not None:
            self._hold_text_encoder(models)

    def _hold_text_encoder(self, models) -> None:
        check_loaded_text_encoders(models, "--adversarial")
        cfg, encoder = self.cfg, models.text_encoders[0]
        self.target = Target(models.unet, encoder, models.tokenizers[0], self.noise_scheduler, encoder.device)
        word = cfg.words[0]
        if cfg.adversarial == "prefix":
            check_prefix_fits(models.tokenizers[0], cfg.adv_tokens, [word], "--adv_tokens")  # a hub id's, here
            names = [f"<adv{i}>" for i in range(cfg.adv_tokens)]
            self.slot_ids = add_placeholders(self.target, names)
            self.prompt = " ".join(names) + " " + word  # UnlearnDiffAtk: k tokens before the prompt
            self.candidates = word_tokens(self.target)
        else:
            self.slot_ids = add_placeholders(self.target, [TOKEN])
            self.prompt = inversion_prompt(word, word)  # the token stands where the word stood
        std = self.target.embedding_table[:self.slot_ids[0]].float().std().item()  # of the vocabulary
        self.attack_lr = ATTACKS[cfg.adversarial].lr * std  # esd attack's default step, in embedding units
        self.ids = token_ids(self.target, [self.prompt])  # (1, L)

    # -- the two terms -------------------------------------------------------------------------
    def rows(self, views, batch, generator: torch.Generator) -> list[TrainedRows]:
        """This iteration's extra rows for the trained view beside ``batch`` (the literal concept's x_t, t
        and target): ``adversarial_loss`` (after an attack round when one is due) and ``retain_loss``
        (weighted). The trainer predicts them in the same forward as the batch."""
        cfg, out = self.cfg, []
        if self.references is None:
            self._sample_latents(views, generator)
        if cfg.adversarial is not None:
            if self.iteration % cfg.adv_every == 0:
                self._attack(views)
            m, b = len(self.memory), len(batch.latents)
            pick = torch.zeros(b, dtype=torch.long) if m == 1 else torch.randint(m, (b,), generator=generator)
            if self.text_encoder is None:
                cond = Conditioning(self.adversarial[pick.to(self.adversarial.device)].to(views.device))
            else:  # the trained encoder's answer to the rounds' slot vectors, with gradient
                vectors = torch.stack([self.memory[i] for i in pick.tolist()]).to(self.target.device)  # (B, k, D)
                with slot_embeddings(self.target, self.slot_ids, vectors):
                    cond = self.text_encoder(self.ids.repeat(b, 1))
            out.append(TrainedRows("adversarial_loss", batch.latents, batch.timesteps, cond, batch.target))
        if self.retain is not None:
            out.append(self._retain_rows(views, batch, generator))
        self.iteration += 1
        return out

    def _retain_rows(self, views, batch, generator) -> TrainedRows:
        """AdvUnlearn's retain loss: at x_t = q(x_t | x_0) of the frozen model's own image of a retain prompt
        (one prompt drawn per row, fresh noise, the batch's timesteps), the trained prediction for that prompt
        should stay the frozen one (MSE in the space of the ESD loss: epsilon for the UNets, velocity for the
        flow models), weighted by ``retain_weight``."""
        b = len(batch.latents)
        rows = torch.randint(len(self.retain_latents), (b,), generator=generator)
        noise = torch.randn(batch.latents.shape, generator=generator).to(views.device)
        x0 = self.retain_latents[rows].to(views.device)
        latents = forward_noise(x0, noise, batch.timesteps, self.noise_scheduler)
        cond = self.retain.take(rows).to(views.device)
        with views.autocast():
            frozen = views.frozen(latents, batch.timesteps, cond).float()
        if self.text_encoder is not None:  # theta's own encoding of the prompts; theta*'s stays the frozen one
            cond = self.text_encoder(self.retain_ids[rows.to(self.retain_ids.device)])
        return TrainedRows("retain_loss", latents, batch.timesteps, cond,
                           views.to_eps(frozen, latents, batch.timesteps), self.cfg.retain_weight)

    @torch.no_grad()
    def _sample_latents(self, views, generator) -> None:
        """x_0 of the frozen model (theta*, the trainer's guided sampler and start_guidance): adv_references
        images of the concept (the attack's references, as UnlearnDiffAtk takes them from the base model) and
        one image per retain prompt. Drawn from the trainer's generator at the first iteration, kept for the run
        (and in checkpoints)."""
        cfg, prompts, shape = self.cfg, self.prompts, self.latent_shape

        def sample(cond: Conditioning) -> torch.Tensor:
            n = cond.prompt_embeds.shape[0]
            noise = torch.randn((n, *shape[1:]), generator=generator).to(views.device)
            self.sampler.set_timesteps(cfg.ddim_steps)
            with views.autocast():  # FLUX: the guidance is in the conditioning (see XtSource)
                return denoise(views.frozen, self.sampler, noise, cond, prompts.sampler_uncond_rows(n),
                               cfg.start_guidance if views.true_cfg else None, self.sampler.timesteps).float()

        if cfg.adversarial is not None:
            self.references = sample(prompts.concept(torch.zeros(cfg.adv_references, dtype=torch.long)))
        else:
            self.references = torch.empty(0)
        if self.retain is not None:
            n = len(self.retain_prompt_list)
            self.retain_latents = torch.cat([sample(self.retain.take(torch.arange(i, min(i + cfg.batch_size, n))))
                                             for i in range(0, n, cfg.batch_size)])

    def _attack(self, views) -> None:
        """One attack round against the current trained model, continuing from the last round's state, with
        the trained parameters held still (the attack's gradient goes to the embeddings alone)."""
        cfg, target = self.cfg, self.target
        encoder = [] if self.text_encoder is None else self.text_encoder.params
        trained = [p for p in [*views.unet.parameters(), *encoder] if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        try:
            with views.autocast():
                if cfg.adversarial == "prefix":
                    found = prefix_attack(target, self.slot_ids, cfg.words[0], self.references, self.candidates,
                                          cfg.adv_steps, self.attack_lr, self.generator, self.start)
                    self.start = found.soft
                    vectors = target.embedding_table.detach()[found.token_ids]  # the real tokens' rows
                    self.last = {"prefix": found.prefix, "loss": found.losses[-1]}
                else:
                    n = len(self.references)
                    found = inversion_attack(target, self.slot_ids[0], [self.prompt] * n, self.references,
                                             cfg.adv_steps, self.attack_lr, n, self.generator, self.start)
                    self.start = vectors = found.embedding[None]
                    self.last = {"token_norm": found.embedding.norm().item(), "loss": found.losses[-1]}
        finally:
            for p in trained:
                p.requires_grad_(True)
        views.evals += cfg.adv_steps * len(self.references)
        self.memory = (self.memory + [vectors])[-cfg.adv_memory:]
        self._encode_adversarial()

    @torch.no_grad()
    def _encode_adversarial(self) -> None:
        """The memory's conditionings, encoded once per round (a frozen text encoder's; a trained one encodes
        them at every step instead, see :meth:`rows`)."""
        if self.text_encoder is not None:
            return
        rows = []
        for vectors in self.memory:
            with slot_embeddings(self.target, self.slot_ids, vectors):
                rows.append(self.target.text_encoder(self.ids)[0])
        self.adversarial = torch.cat(rows)  # (M, L, D)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "generator": self.generator.get_state(), "references": self.references,
                "retain_latents": self.retain_latents, "start": self.start, "memory": self.memory,
                "last": self.last, "retain_prompts": self.retain_prompt_list}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ValueError(f"--resume {self.cfg.resume!r} holds no robust-training state")
        self.iteration = state["iteration"]
        self.generator.set_state(state["generator"])
        self.references, self.retain_latents = state["references"], state["retain_latents"]
        self.start, self.last = state["start"], state["last"]
        if "memory" in state:
            self.memory = state["memory"]
        else:  # a checkpoint from before --adv_memory: its one last round
            self.memory = [] if state["vectors"] is None else [state["vectors"]]
        if self.memory:
            self._encode_adversarial()

    def record(self) -> dict:
        """What args.json adds about the robust terms beyond the flags."""
        out = {"attack_lr_absolute": getattr(self, "attack_lr", None), "attack_seed": self.cfg.seed + 1,
               "retain_prompt_count": len(self.retain_prompt_list or []), "last_attack": self.last}
        if self.target is not None:
            out["adversarial_prompt"] = self.prompt
        return out

    def record_entries(self) -> dict:
        return {"robust": self.record()}
