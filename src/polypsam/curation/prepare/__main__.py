"""``python -m polypsam.curation.prepare``."""

import sys

from polypsam.curation.prepare.cli import main

sys.exit(main())
