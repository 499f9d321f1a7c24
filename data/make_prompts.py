"""Writes the project's own prompt sets in this folder (deterministic: re-running gives the same files).

    python data/make_prompts.py

* imagenette_prompts.csv: the 10 Imagenette classes the paper erased, 50 seeded rows each.
* art_style_prompts.csv: the five modern artists of the paper's art-style study, 20 prompts each.
* toy_prompts.csv: every "a {colour} {shape}" of the toy world, 10 seeded rows each.
"""

import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).parent
IMAGENETTE = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
              "garbage truck", "gas pump", "golf ball", "parachute"]
ARTISTS = ["Kelly McKernan", "Thomas Kinkade", "Tyler Edlin", "Kilian Eng", "Ajin: Demi-Human"]
SUBJECTS = ["a lighthouse on a cliff", "a woman reading by a window", "a forest at dawn", "a city street in the rain",
            "a dragon over the mountains", "a cottage with glowing windows", "a portrait of an old sailor",
            "a field of flowers", "a spaceship above a desert", "a cat sleeping on a chair"]
TEMPLATES = ["{subject} in the style of {artist}", "a painting of {subject} by {artist}"]


def write(name, header, rows):
    with open(HERE / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main():
    rng = random.Random(2023)
    write("imagenette_prompts.csv", ["case_number", "prompt", "evaluation_seed", "class"],
          [(i * 50 + k, f"Image of {c}", rng.randrange(1, 2**31), c) for i, c in enumerate(IMAGENETTE)
           for k in range(50)])
    rows = []
    for artist in ARTISTS:
        for template in TEMPLATES:
            for subject in SUBJECTS:
                rows.append((len(rows), template.format(subject=subject, artist=artist), rng.randrange(1, 2**31),
                             artist))
    write("art_style_prompts.csv", ["case_number", "prompt", "evaluation_seed", "artist"], rows)
    from esd.toy.world import all_scenes

    write("toy_prompts.csv", ["case_number", "prompt", "evaluation_seed", "class"],
          [(i * 10 + k, s.prompt, rng.randrange(1, 2**31), f"{s.colour} {s.shape}")
           for i, s in enumerate(all_scenes()) for k in range(10)])


if __name__ == "__main__":
    main()
