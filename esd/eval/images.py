"""The images under evaluation: the file names esd generate writes, the suffixes read, and one safe reader."""

import re

from PIL import Image, UnidentifiedImageError

from esd.formats.records import error_summary

FILE_PATTERN = re.compile(r"^(?P<case>.+)_(?P<index>\d+)\.png$")  # <case>_<i>.png, as esd generate writes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- shared by the metrics ------------------------------------------------------------------------------------------
def load_rgb(path) -> Image.Image:
    """``path`` as an RGB image. Every image evaluation reads comes through here, so a truncated or
    non-image file is a one-line error naming it rather than a decoder traceback."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL reports a broken PNG as SyntaxError
        raise ValueError(f"image {str(path)!r} is unreadable ({error_summary(e)})") from e
