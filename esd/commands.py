"""Registry of the ``esd`` subcommands beyond ``train``: each entry takes the
argparse subparsers object and adds its command."""

from esd.app.cli import register as register_app
from esd.attack.cli import register as register_attack
from esd.eval.cli import register as register_evaluate
from esd.export.cli import register as register_export
from esd.generate.cli import register as register_generate
from esd.reproduce.cli import register as register_reproduce
from esd.toy.cli import register as register_toy

REGISTERED: list = [register_toy, register_generate, register_evaluate, register_reproduce, register_attack,
                    register_export, register_app]
