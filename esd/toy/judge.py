"""The toy world's judge: colour and shape of a 32x32 image by measurement, not
by a learned classifier (which would learn the training set's correlations).

* Foreground: pixels far from the background colour.
* Colour: mean foreground RGB, nearest palette colour.
* Shape: compactness = area / (max distance from the centroid)^2, which is
  pi (3.14) for a disc, 2 for a square and 3*sqrt(3)/4 (1.30) for an
  equilateral triangle; pixelisation lowers each a little.
"""

from dataclasses import dataclass

import numpy as np

from esd.toy.world import BACKGROUND, COLOURS

NONE = "none"  # no recognisable object
FOREGROUND_DISTANCE = 60  # max |RGB - background| over channels
MIN_AREA = 12  # pixels; fewer is no object
MAX_COLOUR_DISTANCE = 110  # mean foreground farther than this from every palette colour: no colour
# Compactness thresholds, midway between the measured class ranges (see the model card).
SHAPE_BOUNDS = (("triangle", 0.9, 1.7), ("square", 1.7, 2.45), ("circle", 2.45, 3.6))


@dataclass(frozen=True)
class Judgement:
    colour: str
    shape: str
    area: int
    compactness: float


def judge(image: np.ndarray) -> Judgement:
    """Judge one image: (32, 32, 3) uint8 or float in [0, 1]."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    pixels = img.astype(np.float32)
    mask = np.abs(pixels - np.array(BACKGROUND, np.float32)).max(-1) > FOREGROUND_DISTANCE
    area = int(mask.sum())
    if area < MIN_AREA:
        return Judgement(NONE, NONE, area, 0.0)
    mean = pixels[mask].mean(0)
    names = list(COLOURS)
    dists = [np.linalg.norm(mean - np.array(COLOURS[c], np.float32)) for c in names]
    colour = names[int(np.argmin(dists))] if min(dists) < MAX_COLOUR_DISTANCE else NONE
    ys, xs = np.nonzero(mask)
    # Pixel centres; +0.5 px on the radius counts each pixel's extent, as area counts whole pixels.
    r = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5
    compactness = area / r**2
    shape = next((s for s, lo, hi in SHAPE_BOUNDS if lo <= compactness < hi), NONE)
    return Judgement(colour, shape, area, float(compactness))


def judge_batch(images) -> list[Judgement]:
    return [judge(im) for im in images]
