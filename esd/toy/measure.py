"""What the toy instrument measures of a model's images: each prompt's images drawn (esd.toy.quality.sample),
judged (esd.toy.judge), and kept as verdicts plus the few images a grid shows; and the base model's, cached.

The base model's images are the same every time the same settings draw them, and they are half of a demo's
images: so their verdicts are kept in a cache, one file per prompt, named by everything that decides the pixels
and the verdicts (the model folder's files, the prompt, the image count and first seed, the sampler's steps,
guidance and batch, torch's version and thread count, and the sources of the sampler, the judge and the world).
A second demo, benchmark or seed on the same machine reads them instead of drawing them again.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import esd.toy.judge
import esd.toy.quality
import esd.toy.world
from esd.core.stats import Rate
from esd.families.sources import resolve_source
from esd.formats.generation_record import folder_sha256
from esd.formats.records import OutputError, atomic_write
from esd.toy.judge import judge_batch
from esd.toy.quality import QUALITY_GUIDANCE, QUALITY_STEPS, sample
from esd.toy.world import Phrasing

GRID_COLUMNS = 8  # images per prompt a grid shows
SAMPLE_BATCH = 100  # esd.toy.quality.sample's default batch: part of what decides the pixels


def default_cache_dir() -> str:
    """``$ESD_CACHE``, else ``~/.cache/esd``: where the base model's verdicts are kept ("" turns the cache off)."""
    return os.environ.get("ESD_CACHE") or str(Path("~/.cache/esd").expanduser())


@dataclass
class Measured:
    """One prompt's images as the instrument keeps them: every image's verdict, the first few images."""

    colours: list[str]
    shapes: list[str]
    grid: np.ndarray  # (GRID_COLUMNS, H, W, 3) in [0, 1]

    def rate(self, phrasing: Phrasing, axis: str | None = None, concept: str | None = None) -> Rate:
        """With ``axis`` and ``concept``: images judged to show the concept (presence); else images judged right
        in what the phrasing names (accuracy)."""
        if axis is not None:
            hits = sum(v == concept for v in (self.colours if axis == "colour" else self.shapes))
        else:
            hits = sum((phrasing.colour is None or c == phrasing.colour)
                       and (phrasing.shape is None or s == phrasing.shape) for c, s in zip(self.colours, self.shapes))
        return Rate(hits, len(self.colours))


def measure(pipe, prompt: str, n: int, seed: int) -> Measured:
    """Draw ``n`` images of ``prompt`` (image i from seed ``seed + i``) and judge them."""
    images = sample(pipe, prompt, n, seed)
    judged = judge_batch(images)
    return Measured([j.colour for j in judged], [j.shape for j in judged], images[:GRID_COLUMNS])


def _sources_digest() -> str:
    h = hashlib.sha256()
    for module in (esd.toy.quality, esd.toy.judge, esd.toy.world):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(model_sha256: str, prompt: str, n: int, seed: int) -> dict:
    """Everything that decides a base model's images of ``prompt`` and their verdicts (``model_sha256``: the
    model folder's, esd.formats.generation_record.folder_sha256)."""
    return {"model_sha256": model_sha256, "prompt": prompt, "n": n, "seed": seed,
            "steps": QUALITY_STEPS, "guidance": QUALITY_GUIDANCE, "batch": SAMPLE_BATCH, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "sources_sha256": _sources_digest()}


class BaseCache:
    """The base model's measured prompts under ``folder``/toy-base/ (``folder`` "": no cache). Read with
    ``allow_pickle=False``: the file holds arrays only, whoever wrote it."""

    def __init__(self, folder: str, base_model: str):
        self.folder = Path(folder) / "toy-base" if folder else None
        self.model_sha256 = folder_sha256(resolve_source(base_model)) if folder else None
        self.hits = self.misses = 0

    def _path(self, prompt: str, n: int, seed: int) -> Path:
        key = json.dumps(cache_key(self.model_sha256, prompt, n, seed), sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"

    def get(self, pipe, prompt: str, n: int, seed: int) -> Measured:
        if self.folder is None:
            self.misses += 1
            return measure(pipe, prompt, n, seed)
        path = self._path(prompt, n, seed)
        try:
            with np.load(path, allow_pickle=False) as f:
                found = Measured(f["colours"].tolist(), f["shapes"].tolist(), f["grid"].astype(np.float32))
            if len(found.colours) == n:
                self.hits += 1
                return found
        except (OSError, ValueError, KeyError):  # absent, or unreadable: drawn again and rewritten
            pass
        self.misses += 1
        m = measure(pipe, prompt, n, seed)

        def write(p):
            with open(p, "wb") as f:
                np.savez(f, colours=np.array(m.colours), shapes=np.array(m.shapes), grid=m.grid.astype(np.float32))

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, write)
        except (OSError, OutputError):  # a full disk: the measurement stands, the next run draws it again
            pass
        return m
