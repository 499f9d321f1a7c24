"""``python -m esd ...`` (and ``accelerate launch -m esd generate ...``) runs the ``esd`` command."""

import sys

from .cli import main

sys.exit(main())
