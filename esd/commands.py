"""Registry of the ``esd`` subcommands beyond ``train``: each entry takes the
argparse subparsers object and adds its command."""

REGISTERED: list = []
