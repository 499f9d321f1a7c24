"""``python -m esd ...`` (and ``accelerate launch -m esd generate ...``) runs the ``esd`` command."""

import sys

from esd.cli import main

sys.exit(main())
