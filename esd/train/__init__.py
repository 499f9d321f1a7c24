"""Training an erasure: ESDConfig and its presets, the recipe (setup, loop, save), and its extensions
(robust ESD with the text attacks it trains against, text-encoder training, LoRA training) and the run's
model card. Imports esd.core, esd.families and esd.formats."""

from esd.train.config import ESDConfig
from esd.train.recipe import ESDResult, ESDTrainer, train_esd

__all__ = ["ESDConfig", "ESDResult", "ESDTrainer", "train_esd"]
