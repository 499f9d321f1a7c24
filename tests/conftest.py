import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> path of a tiny diffusers folder with that family's architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: str(tiny.build(f, root / f)) for f in FAMILIES}
