"""``esd reproduce NAME``: one command per result of the ESD paper (:mod:`esd.reproduce.run`)."""

from esd.reproduce.config import EXPERIMENTS, ReproduceConfig
from esd.reproduce.run import reproduce

__all__ = ["EXPERIMENTS", "ReproduceConfig", "reproduce"]
