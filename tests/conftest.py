import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The toy instrument's cache of base-model verdicts (esd.toy.measure) goes to a temporary folder, not the user's.
os.environ.setdefault("ESD_CACHE", tempfile.mkdtemp(prefix="esd-test-cache-"))
import esd  # noqa: E402, F401 - before tiny: it quietens a bitsandbytes kernel warning before diffusers loads it

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

# pytest-xdist runs the suite in two worker processes (pyproject's addopts): one torch thread each, so that the
# two do not fight over the machine's cores, and the same in the processes a test starts (which inherit the
# environment): the thread count changes float summation order, and some tests compare a subprocess's bytes
# with this process's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The modules whose tests take minutes go first, so that neither worker starts one of them last.
SLOW_FIRST = ("tools/test_toy.py", "tools/test_reproduce.py", "train/test_robust.py", "formats/test_outputs.py",
              "tools/test_pipeline.py", "tools/test_attack.py", "tools/test_app.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        path = item.path.relative_to(Path(__file__).parent).as_posix()
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order inside each module is kept


FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> path of a tiny diffusers folder with that family's architecture (built once per session;
    tests read these folders and never write in them)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: str(tiny.build(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    """kind -> path of a tiny SD3/FLUX pipeline folder (see tiny.build_flow), built once per session."""
    root = tmp_path_factory.mktemp("flow")
    return {k: str(tiny.build_flow(k, root / k)) for k in tiny.FLOW_PIPELINES}
