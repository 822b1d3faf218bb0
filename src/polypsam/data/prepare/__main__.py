"""``python -m polypsam.data.prepare``."""

import sys

from polypsam.data.prepare.cli import main

sys.exit(main())
