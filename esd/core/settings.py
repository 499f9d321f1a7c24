"""Declaring a setting once: a dataclass field with its default, its help text and the option strings of its
flag, from which every command line (and any other front end) is generated (:mod:`esd.flags`)."""

from dataclasses import MISSING, field


def setting(default=MISSING, help: str = "", flags: tuple[str, ...] = (), *,  # noqa: A002 - argparse's name
            default_factory=MISSING, cli: bool = True, **argparse_kw):
    """A dataclass field that carries its flag: ``help``; ``flags``, the option strings (the first is the
    name used everywhere, the others aliases; default ``--<field name>``); ``cli`` False for a field that no
    flag sets directly; ``argparse_kw``: type, choices, required, metavar, nargs as argparse takes them, or
    positional=True (type is read from the annotation when not given: int, float, or bool for a switch)."""
    metadata = {"help": help, "flags": flags, "cli": cli, **argparse_kw}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
