"""``python -m polypsam.data.prepare``: one line naming the command's new home, status 2."""

import sys

print("error: polypsam.data.prepare moved to polypsam.curation.prepare: run python -m polypsam.curation.prepare "
      "(or polypsam-prepare) with the same arguments.", file=sys.stderr)
sys.exit(2)
