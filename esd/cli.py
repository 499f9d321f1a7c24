"""The ``esd`` command line: ``esd train``, and the commands added by the toy world,
generation and evaluation modules."""

import argparse
import os
import sys

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from esd import commands
from esd.core.devices import parse_devices
from esd.export.cli import add_train_export_arguments, train_export_config
from esd.flags import add_setting_flags, settings_from_args
from esd.train.config import ESDConfig
from esd.train.recipe import train_esd

# What an interrupted command leaves, whichever it is: every file is written to a temporary name and
# renamed into place (esd.formats.records.atomic_write, esd.formats.exports.write_folder), and the temporary
# one is removed on the way out, so a file is the old one or the whole new one.
INTERRUPTED = "no file was left half-written; files completed before it are kept"
# toy-train writes its model folder with diffusers' save_pretrained, file by file, into an --out it made new
INTERRUPTED_BY_COMMAND = {c: "its --out folder may be incomplete; delete it and run again"
                          for c in ("toy-train", "toy-train-dit")}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``esd train``: one per setting of ESDConfig (its own and its extensions'), generated from
    their declarations, and ``--export``/``--export_<option>``, esd export's settings. Flags that a preset sets
    default to None (= the preset's value), so an explicit flag always wins and is recorded as an override."""
    add_setting_flags(p, ESDConfig)
    add_train_export_arguments(p)


def config_from_args(args: argparse.Namespace) -> ESDConfig:
    return settings_from_args(ESDConfig, args, **train_export_config(args))


def cmd_train(args) -> int:
    parse_devices(args.devices)  # first: the settings' checks read the base model's configs (a hub id: the hub)
    result = train_esd(config_from_args(args))
    print(f"saved to {result.output_dir} ({result.seconds:.1f} s of training)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="esd", description="Erase concepts from Stable Diffusion models with ESD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("train", help="erase a concept from a model's weights")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Other modules add their subcommands here (each: a function taking the subparsers)."""
    return commands.REGISTERED


def main(argv: list[str] | None = None) -> int:
    # transformers notes at import that CLIP's image processor falls back to PIL without
    # torchvision (we never use that processor), and both libraries draw loading bars: the CLI
    # keeps its own single progress bar and its errors to one line.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input or an unwritable output: one line, no traceback
        if os.environ.get("ESD_DEBUG"):  # ESD_DEBUG=1 shows the traceback
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"esd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, 128 + 2
        if os.environ.get("ESD_DEBUG"):
            raise
        print(f"esd {args.command}: interrupted; {INTERRUPTED_BY_COMMAND.get(args.command, INTERRUPTED)}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
