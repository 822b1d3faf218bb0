"""No checkpoint with non-finite weights or optimiser state is ever written, so ``last.ckpt`` stays good."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from polypsam.errors import TrainingDiverged


def _non_finite(tensors) -> str | None:
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _optimizer_tensors(states: list) -> list:
    out = []
    for i, st in enumerate(states or []):
        for pid, s in (st.get("state") or {}).items():
            out += [(f"optimizer {i} state {pid}.{k}", v) for k, v in s.items()]
    return out


class FaultGuard(L.Callback):
    """Refuses to write a checkpoint whose weights or optimiser state are not finite, and notes the step
    at which an exception stopped training (``exception.polypsam_step``, for
    :func:`polypsam.cli.describe_failure`)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = _non_finite(checkpoint.get("state_dict", {}).items()) or \
            _non_finite(_optimizer_tensors(checkpoint.get("optimizer_states")))
        if bad:
            where = next((Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)),
                         None)
            raise TrainingDiverged(
                f"non-finite values in {bad} after global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}); that checkpoint was not written, the last good one is kept"
                f"{f' in {where}' if where else ''}. Lower the learning rate (scratch.lr), clip gradients "
                "(trainer.gradient_clip_val=1.0) or train in trainer.precision=32 / bf16-mixed.")

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            exception.polypsam_step = trainer.global_step
        except Exception:  # some exception types refuse attributes
            pass
