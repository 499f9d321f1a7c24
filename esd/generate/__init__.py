"""``esd generate``: images from a prompt CSV (:mod:`esd.generate.images`), the command in :mod:`esd.generate.cli`."""

from esd.generate.config import GenerationConfig
from esd.generate.images import generate_images

__all__ = ["GenerationConfig", "generate_images"]
