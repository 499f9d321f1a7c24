"""What ``esd reproduce`` checks before hours of work: the metrics' packages, their networks' weights
(reachable or cached) and the base model's."""

import importlib
import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants

from esd.eval import metric_class
from esd.formats.records import error_summary
from esd.reproduce.config import ReproduceConfig


# -- what the evaluation needs, checked before any training ---------------------------------------------------
def import_problem(module: str) -> str | None:
    """None when ``module`` imports; else why not, in a few words."""
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails with RuntimeError
        return f"it does not import: {error_summary(e)}"
    return None


def unreachable(url: str) -> str | None:
    """None when ``url``'s server answers a HEAD request (an HTTP error is an answer); else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except urllib.error.HTTPError:
        return None
    except Exception as e:  # noqa: BLE001 - URLError, a timeout, a reset connection
        return error_summary(e)
    return None


def weights_problem(source: str) -> str | None:
    """None when the weights at ``source`` (a torch hub URL, or hf:REPO / a local folder) can be had: in
    the local cache, or the server answers; else why not."""
    if source.startswith("hf:"):
        repo = source[3:]
        if os.path.isdir(os.path.expanduser(repo)):
            return None
        if repo.startswith((".", "/", "~")) or repo.count("/") > 1:
            return "no such folder"

        if isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json"), str):
            return None
        if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                               "TRUE"):
            return "not in the Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)"
        why = unreachable(f"{constants.ENDPOINT}/{repo}/resolve/main/config.json")
        return why and f"not in the Hugging Face cache, and the hub cannot be reached ({why})"

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(source)
    if cached.is_file():
        return None
    why = unreachable(source)
    return why and f"not in the torch hub cache ({cached}), and {source} cannot be reached ({why})"


def check_evaluation_ready(cfg: ReproduceConfig, eval_cfgs: dict) -> None:
    """Each metric the protocol measures can run: its packages import and its networks' weights are local
    (given, or cached) or can be downloaded. Checked before training, so that a missing NudeNet or an
    offline machine is one line now, not an error after hours of training and generation."""
    first = {}
    for (_, metric), ecfg in eval_cfgs.items():
        first.setdefault(metric, ecfg)
    for metric, ecfg in first.items():
        what = f"reproduce {cfg.name} (--protocol {cfg.protocol}) measures {metric}"
        for module, install in metric_class(metric).packages(ecfg):
            if why := import_problem(module):
                raise ValueError(f"{what}, which needs the {module} package ({why}): pip install {install}; "
                                 "nothing was trained")
        for flag, name, source in metric_class(metric).downloads(ecfg):
            if why := weights_problem(source):
                local = "a local folder" if flag == "--clip_model" else "a local copy"
                raise ValueError(f"{what}, which needs {name}: {why}; offline, pass {flag} with {local}; "
                                 "nothing was trained")
