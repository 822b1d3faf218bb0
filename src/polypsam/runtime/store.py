"""Exported encoders on disk: built once, keyed by what changes them, checked before every use.

``<store>/<fingerprint>-<size>px-v<FORMAT>/encoder.onnx`` beside ``encoder.json``, which holds the
sha256 of the ONNX file and, per runtime, precision and runtime version, the relative error of that
runtime's embedding against torch's on a probe canvas. The fingerprint digests the encoder's weights
and the preprocessing (``PromptableSAM.encoder_fingerprint``), so other weights land in another
folder. Both files are written through a temporary file and a rename; a file whose digest does not
match (a bad disk, a copy cut short, an edit) is exported again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from polypsam.data.io import atomic_write
from polypsam.models.sam import PromptableSAM

FORMAT = 1  # bump when the export changes (opset, input layout): older folders are then ignored
OPSET = 17


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (BatchNorm on its running statistics, as a frozen encoder runs), then as it was."""
    modes = [(m, m.training) for m in module.modules()]  # each submodule's own: a frozen part may be in eval
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class EncoderStore:
    """The exported image encoder of one network (its fingerprint) under ``root``."""

    def __init__(self, root: str | Path, net: PromptableSAM, fingerprint: str):
        self.net, self.fingerprint = net, fingerprint
        self.dir = Path(root).expanduser() / f"{fingerprint}-{net.spec.image_size}px-v{FORMAT}"
        self.onnx, self.sidecar = self.dir / "encoder.onnx", self.dir / "encoder.json"

    def _record(self) -> dict:
        try:
            return json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, record: dict) -> None:
        atomic_write(self.sidecar, lambda f: f.write(json.dumps(record, indent=1).encode()))

    def onnx_path(self) -> Path:
        """The checked ONNX file, exported now when it is missing or its digest does not match."""
        record = self._record()
        if self.onnx.is_file() and record.get("sha256") == file_sha256(self.onnx):
            return self.onnx
        self.dir.mkdir(parents=True, exist_ok=True)
        self._export()
        self._write_record({"sha256": file_sha256(self.onnx), "model": self.net.spec.name,
                            "torch": torch.__version__, "checked": {}})
        return self.onnx

    def _export(self) -> None:
        """``torch.onnx.export`` of the image encoder on one normalised canvas, in eval mode."""
        encoder, s = self.net.image_encoder, self.net.spec.image_size
        example = torch.zeros(1, 3, s, s, device=self.net.pixel_mean.device)
        with eval_mode(encoder), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and exporter notes on shapes fixed at batch 1
            atomic_write(self.onnx, lambda f: torch.onnx.export(
                encoder, (example,), f, input_names=["pixels"], output_names=["embedding"],
                opset_version=OPSET, dynamo=False))

    def checked_error(self, check: str) -> float | None:
        """The probe error recorded for ``check`` (runtime, precision and version), or None."""
        value = self._record().get("checked", {}).get(check)
        return None if value is None else float(value)

    def record_check(self, check: str, error: float) -> None:
        record = self._record()
        record.setdefault("checked", {})[check] = error
        self._write_record(record)
