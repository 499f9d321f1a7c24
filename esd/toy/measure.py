"""What the toy instrument measures of a model's images: each prompt's images drawn (esd.toy.quality.sample),
judged (esd.toy.judge), and kept as verdicts plus the few images a grid shows; and the base model's, cached.

The base model's images are the same every time the same settings draw them, and they are half of a demo's
images: so their verdicts are kept in a cache, one file per prompt, named by everything that decides the pixels
and the verdicts (the model folder's files, the prompt, the image count and first seed, the sampler's steps,
guidance and batch, torch's version and thread count, and the sources of the sampler, the judge and the world).
A second demo, benchmark or seed on the same machine reads them instead of drawing them again.
"""

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import esd.families.flow
import esd.toy.dit
import esd.toy.judge
import esd.toy.quality
import esd.toy.world
from esd.core.stats import Rate
from esd.families.sources import resolve_source
from esd.formats.generation_record import folder_sha256
from esd.formats.records import OutputError, atomic_write
from esd.toy.judge import NONE, judge_batch
from esd.toy.quality import QUALITY_GUIDANCE, QUALITY_STEPS, sample
from esd.toy.world import COLOURS, SHAPES, Phrasing

GRID_COLUMNS = 8  # images per prompt a grid shows
SAMPLE_BATCH = 100  # esd.toy.quality.sample's default batch: part of what decides the pixels


def default_cache_dir() -> str:
    """``$ESD_CACHE`` (set but empty: no cache), else ``~/.cache/esd``: where the base model's verdicts are kept."""
    found = os.environ.get("ESD_CACHE")
    return found if found is not None else str(Path("~/.cache/esd").expanduser())


@dataclass
class Measured:
    """One prompt's images as the instrument keeps them: every image's verdict, the first few images."""

    colours: list[str]
    shapes: list[str]
    grid: np.ndarray  # (GRID_COLUMNS, H, W, 3) in [0, 1]

    def rate(self, phrasing: Phrasing, axis: str | None = None, concept: str | None = None) -> Rate:
        """With ``axis`` and ``concept``: images judged to show the concept (presence); else images judged right
        in what the phrasing names (accuracy)."""
        verdicts = zip(self.colours, self.shapes)
        if axis is not None:
            return Rate(sum(shows(c, s, axis, concept) for c, s in verdicts), len(self.colours))
        return Rate(sum(right(c, s, phrasing) for c, s in verdicts), len(self.colours))


def shows(colour: str, shape: str, axis: str, concept: str) -> bool:
    """Whether a verdict (colour, shape) shows ``concept`` on ``axis`` ("colour" or "shape"): presence."""
    return (colour if axis == "colour" else shape) == concept


def right(colour: str, shape: str, phrasing: Phrasing) -> bool:
    """Whether a verdict is right in what the phrasing names: accuracy."""
    return ((phrasing.colour is None or colour == phrasing.colour)
            and (phrasing.shape is None or shape == phrasing.shape))


def measure(pipe, prompt: str, n: int, seed: int) -> Measured:
    """Draw ``n`` images of ``prompt`` (image i from seed ``seed + i``) and judge them."""
    images = sample(pipe, prompt, n, seed)
    judged = judge_batch(images)
    return Measured([j.colour for j in judged], [j.shape for j in judged], images[:GRID_COLUMNS])


def _sources_digest() -> str:
    """The code that draws and judges: the sampler, the judge, the world, and the flow toy's token merge."""
    h = hashlib.sha256()
    for module in (esd.toy.quality, esd.toy.judge, esd.toy.world, esd.toy.dit, esd.families.flow):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _versions() -> dict:
    """The libraries whose code draws (diffusers' pipelines and schedulers, transformers' CLIP, torch) and judges
    (numpy, PIL)."""
    return {name: importlib.metadata.version(name) for name in ("torch", "diffusers", "transformers", "numpy",
                                                                 "pillow")}


def drawing_key(model_sha256: str) -> dict:
    """What decides every prompt's images and verdicts alike (``model_sha256``: the model folder's,
    esd.formats.generation_record.folder_sha256): read once per cache."""
    return {"model_sha256": model_sha256, "steps": QUALITY_STEPS, "guidance": QUALITY_GUIDANCE,
            "batch": SAMPLE_BATCH, "versions": _versions(), "threads": torch.get_num_threads(),
            "sources_sha256": _sources_digest()}


def cache_key(drawing: dict, prompt: str, n: int, seed: int) -> dict:
    """Everything that decides a base model's images of ``prompt`` and their verdicts."""
    return {**drawing, "prompt": prompt, "n": n, "seed": seed}


class BaseCache:
    """The base model's measured prompts under ``folder``/toy-base/ (``folder`` "": no cache). Read with
    ``allow_pickle=False`` (the file holds arrays only, whoever wrote it) and checked for shape and vocabulary;
    the cache is the user's own folder: whoever can write in it decides what a later demo reads as the base
    model's verdicts, as with any cache of results."""

    def __init__(self, folder: str, base_model: str):
        self.folder = Path(folder) / "toy-base" if folder else None
        self.drawing = drawing_key(folder_sha256(resolve_source(base_model))) if folder else None
        self.hits = self.misses = 0

    def _path(self, prompt: str, n: int, seed: int) -> Path:
        key = json.dumps(cache_key(self.drawing, prompt, n, seed), sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"

    @staticmethod
    def _well_formed(m: Measured, n: int) -> bool:
        """n verdicts, each a colour and a shape of the world (or none), and the grid's images of 32 px RGB."""
        colours, shapes = set(COLOURS) | {NONE}, set(SHAPES) | {NONE}
        return (len(m.colours) == len(m.shapes) == n and set(m.colours) <= colours and set(m.shapes) <= shapes
                and m.grid.ndim == 4 and len(m.grid) == min(n, GRID_COLUMNS) and m.grid.shape[-1] == 3
                and bool(np.isfinite(m.grid).all()))

    def get(self, pipe, prompt: str, n: int, seed: int) -> Measured:
        if self.folder is None:
            self.misses += 1
            return measure(pipe, prompt, n, seed)
        path = self._path(prompt, n, seed)
        try:
            with np.load(path, allow_pickle=False) as f:
                found = Measured(f["colours"].tolist(), f["shapes"].tolist(), f["grid"].astype(np.float32))
            if self._well_formed(found, n):
                self.hits += 1
                return found
        except Exception:  # noqa: BLE001 - absent, truncated, not an npz: drawn again and rewritten
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
