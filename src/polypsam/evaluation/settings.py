"""Evaluation settings and conventions (the keys of ``conf/eval.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from polypsam.devices import resolve_num_workers
from polypsam.prompts import PromptType, build_prompt
from polypsam.prompts.box import BoxPrompt
from polypsam.runtime import RuntimeSettings

METRICS = ("dice", "iou", "mean_dice", "mean_iou", "s_measure", "wf_measure", "mean_e_measure",
           "max_e_measure", "mae", "row_dice", "row_iou")
# An unreadable image is a total failure: the worst value of every metric (MAE's worst is 1).
FAILURE_SCORES = {**{k: 0.0 for k in METRICS}, "mae": 1.0}
UNREADABLE_CONVENTION = (
    "Unreadable images: an image file that cannot be decoded is kept in the evaluation, listed as "
    "'unreadable' and scored as a total failure on every metric (Dice = IoU = mDice = mIoU = S = wF = E = "
    "row Dice = 0, MAE = 1), so it lowers the set mean instead of silently leaving it."
)


@dataclass
class EvalSettings:
    prompt: PromptType = field(default_factory=BoxPrompt)  # derived from the ground truth of each image
    noise: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)  # robustness sweep (box noise); empty: no sweep
    compat_row_dice: bool = False  # add Polyp-SAM's MONAI per-row Dice to the tables (never the default)
    save_masks: bool = True
    figures: bool = True
    batch_size: int = 4
    num_workers: int = 0
    threshold: float = 0.5
    device: str = "auto"
    bootstrap_seed: int = 0
    # a folder of embedding caches (``data.embedding_cache.dir``): images this network's frozen encoder has
    # seen are not encoded again (fp16, as training and validation read them); None: always encode
    embedding_dir: str | None = None
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # the image encoder's (model.runtime)

    @property
    def sweep_prompt(self) -> PromptType | None:
        """The prompt the robustness sweep perturbs: the run's own, or the oracle box that ``auto`` is
        measured against; None for a type without a noise axis (clicks, no prompt)."""
        if self.prompt.from_model:
            return self.prompt.oracle
        return self.prompt if self.prompt.with_noise(0.0) is not None else None

    @property
    def noise_levels(self) -> list[float]:
        return [float(n) for n in self.noise] if self.sweep_prompt is not None else []


def _plain(x) -> dict[str, Any]:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else dict(x or {})


def settings_from_cfg(cfg, num_workers: int | None = None, prompt: PromptType | None = None) -> EvalSettings:
    """EvalSettings from conf/eval.yaml's keys (prompt, robustness, compat_row_dice, ...)."""
    rob = _plain(cfg.get("robustness"))
    if num_workers is None:
        num_workers = (cfg.get("data") or {}).get("num_workers", 0)
    num_workers = resolve_num_workers(num_workers)  # an integer, or auto: as in training
    noise = rob.get("noise")
    if prompt is None:
        prompt = build_prompt(_plain(cfg.get("prompt")) or None)
    cache = _plain((cfg.get("data") or {}).get("embedding_cache"))
    embedding_dir = cache.get("dir") if cache.get("enabled", "auto") not in (False, "false") else None
    return EvalSettings(
        prompt=prompt,
        noise=EvalSettings.noise if noise is None else tuple(float(n) for n in noise),
        compat_row_dice=bool(cfg.get("compat_row_dice", False)), save_masks=bool(cfg.get("save_masks", True)),
        figures=bool(cfg.get("figures", True)), batch_size=int(cfg.get("batch_size", 4)),
        num_workers=int(num_workers), threshold=float(cfg.get("threshold", 0.5)),
        device=str(cfg.get("device", "auto")), embedding_dir=embedding_dir, runtime=RuntimeSettings.from_cfg(cfg))
