"""Moved to :mod:`polypsam.curation.prepare` (issue 27); only ``python -m polypsam.data.prepare`` is left here, to
name the new home. It does not forward: data/ would then import curation/, which imports data/."""
