"""Registry of the ``esd`` subcommands beyond ``train``: each entry takes the
argparse subparsers object and adds its command."""

from .attack.cli import register as register_attack
from .eval.cli import register as register_evaluate
from .export.cli import register as register_export
from .generate import register as register_generate
from .reproduce import register as register_reproduce
from .toy.cli import register as register_toy

REGISTERED: list = [register_toy, register_generate, register_evaluate, register_reproduce, register_attack,
                    register_export]
