"""Attacks on an erased model: does the concept come back under a prompt the erasure never saw?

``prefix`` (UnlearnDiffAtk) and ``inversion`` (concept inversion) learn prompts against the erased
model's own denoising loss on the base model's images of the concept; :func:`run_attack` draws and
judges the literal and attacked prompts from the same seeds."""

from esd.attack.config import AttackConfig
from esd.attack.run import run_attack
from esd.train.attacks import ATTACKS
from esd.train.attacks.inversion import inversion_attack, inversion_prompt
from esd.train.attacks.prefix import prefix_attack

__all__ = ["ATTACKS", "AttackConfig", "inversion_attack", "inversion_prompt", "prefix_attack", "run_attack"]
