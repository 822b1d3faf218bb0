"""ONNX Runtime on the CPU: the exported ONNX encoder in an ``InferenceSession`` (fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def load(onnx: Path, precision: str, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function from a (1,3,S,S) float32 array to the encoder's output array, and the precision it runs at."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: no notes on initializers at session start
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), precision
