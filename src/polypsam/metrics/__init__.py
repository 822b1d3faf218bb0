"""Per-image polyp segmentation metrics at the image's original resolution.

Three families, because the field reports three incompatible things under the name "Dice":

* ``dice_iou`` - plain per-image Dice/IoU of a binary mask (our headline number);
* ``toolbox_mean_dice_iou`` and ``sod_metrics`` - the PraNet / Polyp-PVT MATLAB toolbox
  (``eval/main.m``): meanDice/meanIoU over 256 thresholds, S-measure, weighted F, E-measure, MAE;
* ``row_dice_iou_monai_compat`` - what the Polyp-SAM notebooks actually published (per-row Dice).

``score_image`` computes all of them for one image and ``summarize`` averages over a test set with
bootstrap confidence intervals. Modules: ``binary`` (inputs, ``dice_iou``), ``toolbox``
(the MATLAB toolbox's scores), ``compat`` (Polyp-SAM's per-row scores), ``summary`` (per image, per set).
"""

from polypsam.metrics.binary import EMPTY_GT_CONVENTION, dice_iou, to_uint8_map
from polypsam.metrics.compat import row_dice_iou_monai_compat
from polypsam.metrics.summary import bootstrap_ci, score_image, summarize
from polypsam.metrics.toolbox import N_THRESHOLDS, sod_metrics, toolbox_dice_iou_curves, toolbox_mean_dice_iou

__all__ = [
    "EMPTY_GT_CONVENTION",
    "N_THRESHOLDS",
    "bootstrap_ci",
    "dice_iou",
    "row_dice_iou_monai_compat",
    "score_image",
    "sod_metrics",
    "summarize",
    "to_uint8_map",
    "toolbox_dice_iou_curves",
    "toolbox_mean_dice_iou",
]
