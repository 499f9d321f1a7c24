"""``python app.py``: the web app of the ESD paper's README (the same as ``esd app``; its flags too)."""

import sys

from esd.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
