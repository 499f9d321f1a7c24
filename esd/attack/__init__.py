"""Attacks on an erased model: does the concept come back under a prompt the erasure never saw?

``prefix`` (UnlearnDiffAtk) and ``inversion`` (concept inversion) learn prompts against the erased
model's own denoising loss on the base model's images of the concept; :func:`run_attack` draws and
judges the literal and attacked prompts from the same seeds."""

from .inversion import inversion_attack, inversion_prompt
from .prefix import prefix_attack
from .run import ATTACKS, AttackConfig, run_attack

__all__ = ["ATTACKS", "AttackConfig", "inversion_attack", "inversion_prompt", "prefix_attack", "run_attack"]
