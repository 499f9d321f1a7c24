"""Every command's flags, generated in one way from its settings dataclass (see :func:`esd.core.settings.setting`):
one flag per field, with the field's default, help and option strings, and the type its annotation names."""

import argparse
from dataclasses import MISSING, fields

OPTIONAL_SWITCH = bool | None  # --flag / --no-flag; unset: None (the preset's or the model's default)
NUMBERS = {int: int, float: float, int | None: int, float | None: float}


def flag_fields(config_class) -> list:
    """The fields of ``config_class`` that are flags (not ``init=False``, not ``cli=False``)."""
    return [f for f in fields(config_class) if f.init and f.metadata.get("cli", True)]


def add_setting_flags(p: argparse.ArgumentParser, config_class, **overrides) -> None:
    """Add one flag per setting of ``config_class`` to ``p`` (fields with ``init=False`` or ``cli=False`` are
    not flags). ``overrides``: field name -> argparse keywords decided at run time (e.g. choices from a
    registry)."""
    for f in flag_fields(config_class):
        meta = {k: v for k, v in f.metadata.items() if k not in ("help", "flags", "cli")}
        meta.update(overrides.get(f.name, {}))
        names = f.metadata.get("flags") or (f"--{f.name}",)
        help_text = f.metadata.get("help", "")
        if meta.pop("positional", False) or meta.get("nargs") == "+":  # required by being positional
            meta.pop("required", None)
            p.add_argument(f.name, help=help_text, **meta)
        elif f.type is bool:  # --flag sets True
            p.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif f.type == OPTIONAL_SWITCH:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            if "type" not in meta and f.type in NUMBERS:
                meta["type"] = NUMBERS[f.type]
            default = None if f.default is MISSING or meta.get("required") else f.default
            p.add_argument(*names, dest=f.name, default=default, help=help_text, **meta)


def settings_from_args(config_class, args: argparse.Namespace, **extra):
    """``config_class`` from the parsed flags of :func:`add_setting_flags` (and ``extra`` fields)."""
    names = {f.name for f in flag_fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names}, **extra)
