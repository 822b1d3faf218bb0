"""A study: rows (trained runs and their evaluations) turned into a results report a reader can trace.

``paired.py`` compares two rows image by image, ``figures.py`` draws the study figures, ``report.py``
writes the report; ``experiments/lite_cpu.py`` is the driver that runs the rows and calls them.
"""

from polypsam.reporting.study.paired import paired_comparison, seed_mean, seed_spread, subset_means

__all__ = ["paired_comparison", "seed_mean", "seed_spread", "subset_means"]
