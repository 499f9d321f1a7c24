"""The toy concept world: coloured shapes on a plain background, with captions.

Every image is a scene: a value on each axis (colour, shape). The axes are data
(``AXES``), so a third one (say a "style": solid or striped) is one more entry
plus a branch in :func:`render`.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # render at 4x and downsample: anti-aliased edges like real photos of shapes
BACKGROUND = (40, 40, 40)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (235, 215, 50)}
SHAPES = ("circle", "square", "triangle")
AXES = {"colour": tuple(COLOURS), "shape": SHAPES}
# Held out of training, to measure compositional generalisation.
HELD_OUT = (("yellow", "square"), ("green", "triangle"))
CAPTION_DROP = 0.1  # unconditional share, for classifier-free guidance
# Captions vary as real ones do: each word alone, and both in several orders and contexts, so that a
# word means the same wherever it stands (as CLIP makes "Van Gogh" and "a painting by Van Gogh" close
# for Stable Diffusion) and an erasure of the bare word reaches every phrasing. One is drawn per image.
TRAINED_TEMPLATES = ("{colour}", "a {colour} shape", "a {shape}", "{shape}", "{colour} {shape}",
                     "a {colour} {shape}", "a {shape}, {colour}", "a photo of a {colour} {shape}")
# Phrasings never seen in training: quality and erasure are measured on them too.
HELD_OUT_TEMPLATES = ("{colour} shape", "a photo of a {shape}, {colour}")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Phrasing:
    """A caption and what it names (None: that axis is not named)."""

    text: str
    colour: str | None
    shape: str | None
    held_out: bool  # its template or its colour-shape combination was never trained on


def all_phrasings() -> list[Phrasing]:
    """Every caption of every template, trained ones first."""
    out = []
    for template in TRAINED_TEMPLATES + HELD_OUT_TEMPLATES:
        colours = list(COLOURS) if "{colour}" in template else [None]
        shapes = list(SHAPES) if "{shape}" in template else [None]
        for colour in colours:
            for shape in shapes:
                held_out = template in HELD_OUT_TEMPLATES or (colour, shape) in HELD_OUT
                out.append(Phrasing(template.format(colour=colour, shape=shape), colour, shape, held_out))
    return out


def all_scenes() -> list[Scene]:
    return [Scene(c, s) for c in COLOURS for s in SHAPES]


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if (s.colour, s.shape) not in HELD_OUT]


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """A 32x32 RGB image of the scene: random size and position, upright shape."""
    n = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("RGB", (n, n), BACKGROUND)
    draw = ImageDraw.Draw(img)
    size = rng.uniform(0.40, 0.62) * n  # bounding box side
    cx = rng.uniform(size / 2 + 0.06 * n, n - size / 2 - 0.06 * n)
    cy = rng.uniform(size / 2 + 0.06 * n, n - size / 2 - 0.06 * n)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], fill=colour)
    elif scene.shape == "square":
        side = size * 0.85  # a square of equal area reads larger than a circle
        draw.rectangle([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=colour)
    elif scene.shape == "triangle":  # equilateral, pointing up, centred on its centroid
        r = size * 0.62
        pts = [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
        draw.polygon(pts, fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; valid: {', '.join(SHAPES)}")
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def captions(scene: Scene) -> list[str]:
    """Ways to caption a scene; training draws one at random."""
    return [t.format(colour=scene.colour, shape=scene.shape) for t in TRAINED_TEMPLATES]


def balanced_weights(scenes: list[Scene], sweeps: int = 200) -> list[float]:
    """Sampling weights over ``scenes`` under which every colour is equally common, and every shape.

    Drawing the ten trained scenes uniformly makes red and blue (three shapes each) 30% of the data
    and green and yellow (two each, one combination held out) 20%; the shipped model's unconditional
    samples are then red 41%, and ESD's target (the unconditional prediction minus the concept's
    direction) leans toward red. Iterative proportional fitting from equal weights: alternately scale
    each colour's, then each shape's, cells to an equal share. Measured (``RecipeConfig.balanced``):
    it evens the prior only partly and is not the default; see the recipe's note.
    """
    w = [1.0] * len(scenes)
    for _ in range(sweeps):
        for axis, values in (("colour", AXES["colour"]), ("shape", AXES["shape"])):
            for value in values:
                cells = [i for i, s in enumerate(scenes) if getattr(s, axis) == value]
                total = sum(w[i] for i in cells)
                for i in cells:
                    w[i] *= (1 / len(values)) / total
    return w


def make_dataset(n: int, seed: int, balanced: bool = False) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images (n, 32, 32, 3) uint8 of training scenes with their drawn captions. ``balanced``
    draws scenes with :func:`balanced_weights`; otherwise every trained scene equally often."""
    rng = random.Random(seed)
    scenes = training_scenes()
    weights = balanced_weights(scenes) if balanced else None
    images, texts, labels = [], [], []
    for _ in range(n):
        scene = rng.choices(scenes, weights)[0] if balanced else rng.choice(scenes)
        images.append(np.asarray(render(scene, rng)))
        texts.append("" if rng.random() < CAPTION_DROP else rng.choice(captions(scene)))
        labels.append(scene)
    return np.stack(images), texts, labels


def vocabulary() -> list[str]:
    """Words the tokenizer learns as whole tokens."""
    return ["a", "shape", *COLOURS, *SHAPES, "striped", "solid", "photo", "of"]


def prompts_for(concept: str) -> tuple[list[Phrasing], list[Phrasing], str]:
    """(phrasings that name the concept, other prompts, axis of the concept)."""
    if concept in COLOURS:
        axis = "colour"
    elif concept in SHAPES:
        axis = "shape"
    else:
        raise ValueError(f"unknown toy concept {concept!r}; valid: {', '.join([*COLOURS, *SHAPES])}")
    phrasings = all_phrasings()
    erased = [p for p in phrasings if getattr(p, axis) == concept]
    others = [p for p in phrasings if getattr(p, axis) not in (concept, None)
              and (p.text == f"a {p.colour} {p.shape}" or p.text in (p.colour, f"a {p.shape}"))]
    return erased, others, axis
