"""The attacks that recover an erased concept by optimising text (used by ``esd attack`` and by robust ESD's
training): their names, step counts and learning rates."""

from dataclasses import dataclass


@dataclass(frozen=True)
class AttackSpec:
    steps: int  # default optimisation steps
    lr: float  # default step size, in units of the token embeddings' standard deviation
    help: str


ATTACKS = {
    "prefix": AttackSpec(40, 1.0, "UnlearnDiffAtk (Zhang et al. 2023): --tokens real vocabulary tokens before each "
                         "prompt, optimised per prompt by projected gradient (PEZ)"),
    "inversion": AttackSpec(300, 0.05, "concept inversion (Pham et al. 2023): one new token <adv> learned by "
                            "textual inversion on all references; it replaces the concept word in each prompt"),
}
