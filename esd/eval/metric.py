"""The metric interface, and the helpers the metrics share (the registry is :mod:`esd.formats.summary`; the
images read are :mod:`esd.eval.images`).

A metric is a class registered by name. ``esd.eval.evaluate`` constructs it with the
EvalConfig (cheap: settings are checked, nothing is loaded), calls ``load`` once, ``score``
once per image (one row of results.csv each), ``finish`` once (set-level numbers such as
FID), then ``summarise`` on all rows. ``esd report`` uses the class methods only: the
headline, the report table's cells and the chart values of a summary.json.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from esd.eval.charts import per_group_section


@dataclass(frozen=True)
class Headline:
    """The one number a report leads with: its name, its value and which way is better after erasure."""

    name: str
    value: float | None
    better: str  # "lower" or "higher"
    why: str  # what "better" means for this number, in a few words


class Metric:
    """One measure of generated images.

    Contract: ``__init__(cfg)`` only checks settings (a bad one raises ValueError before any work);
    ``load(advance)`` loads networks and may do set-up work, calling ``advance(n)`` for the
    ``setup_steps()`` steps it announced; ``score(path, row)`` returns one image's row of scores
    (``row`` is its prompt-CSV row, or None without --prompts); ``finish()`` returns numbers of the
    whole set; ``summarise(results)`` turns every row into summary.json's numbers.
    """

    name: ClassVar[str]
    counting_settings: ClassVar[tuple[str, ...]] = ()  # summary keys that change what the number means
    columns: ClassVar[tuple[str, ...]]  # the report table's columns, after the model's name

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def packages(cls, cfg) -> list[tuple[str, str]]:
        """The packages this metric imports with ``cfg``'s settings: [(module, what to pip install)], so a
        caller (esd reproduce) can check them before hours of work."""
        return []

    @classmethod
    def downloads(cls, cfg) -> list[tuple[str, str, str]]:
        """The networks' weights this metric downloads, those ``cfg`` does not give as local files: [(the flag
        that gives a local copy, what they are, a torch hub URL or hf:REPO)]. May import :meth:`packages`."""
        return []

    def setup_steps(self) -> int:
        return 0

    def load(self, advance: Callable[[int], None]) -> None:
        """Load the networks; the default metric needs none."""

    def score(self, path: Path, row: dict | None) -> dict:
        raise NotImplementedError

    def finish(self) -> dict:
        return {}

    def summarise(self, results: pd.DataFrame) -> dict:
        raise NotImplementedError

    @classmethod
    def headline(cls, summary: dict) -> Headline:
        raise NotImplementedError

    @classmethod
    def cells(cls, summary: dict) -> list[str]:
        """The report table's cells of one summary, one per ``columns``."""
        raise NotImplementedError

    @classmethod
    def quantities(cls, summary: dict, base: bool) -> list[tuple[str, float]]:
        """The figures a paper reports from one summary, as (quantity, value), for ``esd reproduce``'s table
        beside the published ones; ``base``: the summary is the base model's. The headline by default."""
        h = cls.headline(summary)
        return [(h.name, h.value)]

    @classmethod
    def chart(cls, summary: dict) -> tuple[str, dict]:
        """(what is plotted, {group: value}) for the comparison chart; the headline by default."""
        h = cls.headline(summary)
        return h.name, {"all": h.value}

    @classmethod
    def report_section(cls, summaries: dict, out: Path, plt) -> list[str]:
        """report.md lines after the table (and the charts they show); a chart per group by default."""
        return per_group_section(cls, summaries, out, plt)


TORCHVISION = "torchvision (the build made for your torch, e.g. pip install 'esd[metrics]')"


def import_metrics_package(name: str, what: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - torchvision built for another torch fails with RuntimeError
        raise ValueError(f"{what} needs {name.split('.')[0]} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "install the metrics extra: pip install 'esd[metrics]' with a torchvision that matches "
                         "your torch") from e


def existing_file(path: str, flag: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path!r} does not exist")
    return path


def reference_dir(cfg) -> Path:
    if not cfg.reference:
        raise ValueError(f"--metric {cfg.metric} needs --reference (the folder to compare --images with)")
    if not Path(cfg.reference).is_dir():
        raise ValueError(f"--reference {cfg.reference!r} is not a folder")
    return Path(cfg.reference)


def load_weights(path: str | None, default, flag: str, what: str) -> dict:
    """A state dict from a local file (``flag``, read weights-only) or from the library's cache/download."""
    if path is not None:
        return torch.load(existing_file(path, flag), map_location="cpu", weights_only=True)
    try:
        return default()
    except Exception as e:  # noqa: BLE001 - offline, torch.hub raises URLError and friends
        raise ValueError(f"could not get {what} ({type(e).__name__}); offline, pass {flag} with a local copy") from e
