"""``esd export``: the command (:mod:`esd.export.cli`) on the writers of :mod:`esd.formats.exports`."""

from esd.formats.exports import ExportSettings, run_export

__all__ = ["ExportSettings", "run_export"]
