"""Robust ESD: erase the concept from the conditioning an attacker would find, not only from the literal word.

Every ``adv_every`` iterations an attack of :mod:`esd.attack` finds conditioning that brings the concept back
from the model being trained; each ESD step then trains on it beside the literal concept. A preservation term
keeps the predictions for prompts that must not change where the frozen model had them. What is borrowed:

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

import math
import os
import re
from pathlib import Path

import pandas as pd
import psutil
import torch

from .attack.target import slot_embeddings
from .generate import read_prompt_table
from .models import FLOW_FAMILIES
from .records import error_summary
from .sampling import Conditioning, PromptConditioning, denoise, encode_prompts, sampler_scheduler
from .views import TrainedRows

# Each retain prompt is drawn once by the frozen model at the start (ddim_steps guided steps) and its
# conditioning and image stay in memory for the run: 10,000 prompts are ~3 GB at SD1's 512 px.
MAX_RETAIN_PROMPTS = 10_000
MAX_RETAIN_BYTES = 16 * 2**20
ROUND_SETTINGS = ("adv_every", "adv_steps", "adv_tokens", "adv_references", "adv_memory")  # integers >= 1


def adversarial_choices() -> tuple[str, ...]:
    """The attacks robust training can run: those of esd attack."""
    from .attack.run import ATTACKS

    return tuple(ATTACKS)


def is_robust(cfg) -> bool:
    return bool(cfg.adversarial or cfg.retain_prompts)


def read_retain_prompts(path: str, concepts: list[str]) -> list[str]:
    """The prompts of ``path``: a plain text file, one prompt a line (blank lines skipped), or a prompt CSV
    (``.csv``, a ``prompt`` column, as esd generate reads). A prompt that names an erased concept is refused:
    it would ask the model both to forget and to keep the concept."""
    where = f"--retain_prompts {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist (a text file, one prompt a line, or a prompt CSV)")
    if os.path.getsize(path) > MAX_RETAIN_BYTES:  # before reading it: a stranger's file may be huge
        raise ValueError(f"{where} is {os.path.getsize(path) / 2**20:.1f} MiB; a retain file holds at most "
                         f"{MAX_RETAIN_PROMPTS:,} prompts in {MAX_RETAIN_BYTES // 2**20} MiB")
    try:
        if path.lower().endswith(".csv"):
            table = read_prompt_table(path, "--retain_prompts")  # as esd generate reads it: every cell as written
            if "prompt" not in table.columns:
                raise ValueError(f"{where} has no 'prompt' column (columns: {', '.join(table.columns) or 'none'})")
            prompts = [p.strip() for p in table["prompt"]]
        else:
            # utf-8-sig: a byte-order mark (Notepad writes one) is not part of the first prompt
            prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{where} is not readable UTF-8 text ({error_summary(e)})") from e
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{where} holds no prompt")
    if len(prompts) > MAX_RETAIN_PROMPTS:
        raise ValueError(f"{where} holds {len(prompts):,} prompts; at most {MAX_RETAIN_PROMPTS:,} (each is encoded "
                         "and drawn once by the frozen model before training, and its image kept for the run)")
    for concept in concepts:
        pattern = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
        named = [p for p in prompts if pattern.search(p)]
        if named:
            raise ValueError(f"{where}: {len(named)} prompt(s) name the erased concept {concept!r} (first: "
                             f"{named[0]!r}); retain prompts must be ones whose images should not change")
    return prompts


def check_retain_memory(models, prompts: list[str], image_size: int, latent_shape, guidance) -> None:
    """The retain set's conditionings and x_0 images stay on the device for the run: one prompt is encoded,
    the whole set's size estimated from it and checked against the device's free memory (a million prompts
    would otherwise grow until the kernel kills the run without a word)."""
    one = encode_prompts(models, prompts[:1], image_size, guidance=guidance)
    per_prompt = one.prompt_embeds.nbytes + sum(v.nbytes for v in (one.added_cond_kwargs or {}).values())
    per_prompt += math.prod(latent_shape[1:]) * 4  # the fp32 x_0 kept per prompt
    need = per_prompt * len(prompts)
    device = next(models.unet.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if need > 0.5 * free:
        raise ValueError(f"--retain_prompts: {len(prompts):,} prompts need about {need / 2**30:.1f} GiB on "
                         f"{device.type} for their conditionings and images, more than half of the "
                         f"{free / 2**30:.1f} GiB free; use fewer prompts")


def check_retain_weight(w) -> None:
    """--retain_weight (esd train's and esd demo's): a finite number >= 0."""
    if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
        raise ValueError(f"--retain_weight must be a finite number >= 0, got {w!r}")


def check_robust_settings(cfg) -> None:
    """One line per bad robust setting, before any model loads (called by ESDConfig.validate)."""
    choices = adversarial_choices()
    if cfg.adversarial is not None and cfg.adversarial not in choices:
        raise ValueError(f"--adversarial {cfg.adversarial!r} is not one of: {', '.join(choices)}")
    for name in ROUND_SETTINGS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
    check_retain_weight(cfg.retain_weight)
    if cfg.retain_prompts is None and cfg.retain_weight != type(cfg).__dataclass_fields__["retain_weight"].default:
        raise ValueError(f"--retain_weight {cfg.retain_weight} set without --retain_prompts, whose term it weighs; "
                         "give --retain_prompts FILE (a text file, one prompt a line, or a prompt CSV)")
    if cfg.adversarial is None:
        changed = [f"--{n}" for n in ROUND_SETTINGS
                   if getattr(cfg, n) != type(cfg).__dataclass_fields__[n].default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set without --adversarial (prefix | inversion), which they tune")
    else:
        if cfg.separator is not None or cfg.erase_from is not None:
            raise ValueError("--adversarial attacks one concept erased from itself; it cannot be combined with "
                             "--separator or --erase_from")
        check_one_text_encoder(cfg, "--adversarial")
        if cfg.adversarial == "prefix" and cfg.ckpt_path is None:
            from .attack.prefix import check_prefix_fits, stored_tokenizer

            if (tokenizer := stored_tokenizer(cfg.base_model)) is not None:  # else checked once loaded
                check_prefix_fits(tokenizer, cfg.adv_tokens, cfg.words, "--adv_tokens")
    if cfg.retain_prompts is not None:
        read_retain_prompts(cfg.retain_prompts, cfg.words)


def check_one_text_encoder(cfg, flag_name: str) -> None:
    """The attacks and --train_text_encoder work through one text encoder: SDXL (two, plus pooled embeddings)
    and SD3/FLUX (CLIP and T5) are refused, naming ``flag_name``. A local folder or a single file is checked now
    (configs, tensor names); other sources once loaded (see RobustESD and ESDTrainer.setup)."""
    from .models import resolve_source

    flag, model = ("--base_model", cfg.base_model) if cfg.ckpt_path is None else ("--ckpt_path", cfg.ckpt_path)
    if cfg.family in FLOW_FAMILIES:
        raise ValueError(f"{flag_name} supports SD 1.x and 2.x models (one text encoder); {flag} {model!r} is a "
                         f"{cfg.family} transformer")
    if cfg.ckpt_path is None:
        config = Path(resolve_source(cfg.base_model)) / "unet" / "config.json"
        if config.is_file() and '"text_time"' in config.read_text():
            raise ValueError(f"{flag_name} supports SD 1.x and 2.x models (one text encoder); --base_model "
                             f"{cfg.base_model!r} is SDXL")


def check_loaded_text_encoders(models, flag_name: str) -> None:
    """Once loaded, what :func:`check_one_text_encoder` could not read before (a hub id's SDXL): one text
    encoder, or ``flag_name`` is refused in one line."""
    if len(models.text_encoders) != 1:
        raise ValueError(f"{flag_name} supports SD 1.x and 2.x models (one text encoder); {models.source} is "
                         f"{models.family} with {len(models.text_encoders)}")


def check_resume_robust(cfg, state: dict) -> None:
    """What a resumed robust run must keep beyond the flags ``resume_conflicts`` compares. A checkpoint from
    before --adv_memory trained on its last round only, which --adv_memory 1 continues. And the checkpoint's
    retain images were drawn for the prompts its --retain_prompts file held then, so a file edited since is
    refused (the flag's path alone would pass)."""
    if cfg.adversarial is not None and "adv_memory" not in state["config"] and cfg.adv_memory != 1:
        raise ValueError(f"--resume {cfg.resume!r} was trained before --adv_memory existed, on the last round's "
                         f"conditioning only; resume it with --adv_memory 1")
    then = (state.get("robust") or {}).get("retain_prompts")
    if then is None or cfg.retain_prompts is None:
        return
    now = read_retain_prompts(cfg.retain_prompts, cfg.words)
    if now != then:
        changed = next((i for i, (a, b) in enumerate(zip(now, then)) if a != b), min(len(now), len(then)))
        raise ValueError(f"--retain_prompts {cfg.retain_prompts!r} changed since checkpoint {cfg.resume!r} was "
                         f"written ({len(now)} prompts now, {len(then)} then; first difference at prompt "
                         f"{changed + 1}); resume with the file as it was, or start a new run")


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """x_t of x_0 at the engine's ``timesteps``: the UNets' q(x_t | x_0) (``noise_scheduler``, a DDPMScheduler),
    or, where it is None, the flow-matching path x_t = (1 - s) x_0 + s eps at s = timestep / 1000 (esd.flow)."""
    if noise_scheduler is not None:
        return noise_scheduler.add_noise(x0, noise, timesteps)
    s = (timesteps.float() / 1000).to(x0.device).view(-1, *[1] * (x0.dim() - 1))
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


class RobustESD:
    """The adversarial and preservation terms of one robust run, and their state (checkpointed)."""

    def __init__(self, cfg, models, prompts: PromptConditioning, latent_shape: tuple, image_size: int,
                 text_encoder=None):
        """Takes what it needs from ``models`` before the trainer drops the text encoders: the retain prompts
        encoded once, and, for ``--adversarial``, the first text encoder and tokenizer (frozen, unless
        ``text_encoder``, the run's :class:`esd.text_encoder.TrainedTextEncoder`, trains it: then the trained
        rows' conditioning is encoded anew, with gradient, at every step). ``prompts``: the trainer's encoded
        prompts; ``latent_shape``: (B, C, h, w)."""
        from diffusers import DDPMScheduler

        self.cfg, self.prompts, self.latent_shape, self.text_encoder = cfg, prompts, latent_shape, text_encoder
        self.sampler = sampler_scheduler(models.scheduler, cfg.sampler_scheduler, cfg.ddim_steps,  # its own copy
                                         latent_shape[2:], models.family == "flux")
        # the UNets' forward noising q(x_t | x_0), for the attacks and the retain term; None: flow matching's
        flow = models.family in FLOW_FAMILIES
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
        from .attack.inversion import TOKEN, inversion_prompt
        from .attack.prefix import check_prefix_fits, word_tokens
        from .attack.run import ATTACKS
        from .attack.target import Target, add_placeholders, token_ids

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
        from .attack.inversion import inversion_attack
        from .attack.prefix import prefix_attack

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
