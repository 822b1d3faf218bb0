"""OpenVINO on the CPU: the exported ONNX encoder compiled at fp32 or bf16 (AMX / AVX-512 BF16).

A CPU without bf16 compiles a bf16 request at fp32, silently: ``load`` returns the precision compiled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

# OpenVINO's CPU plugin runs bf16 by default where the CPU has it: fp32 must be asked for to stay exact
_HINTS = {"fp32": "f32", "bf16": "bf16"}
_NAMES = {hint: name for name, hint in _HINTS.items()}


def version() -> str:
    import openvino

    return openvino.get_version()


def load(onnx: Path, precision: str, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function from a (1,3,S,S) float32 array to the encoder's output array, and the precision it runs at."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    compiled = core.compile_model(core.read_model(onnx), "CPU", {
        hints.inference_precision: _HINTS[precision], props.inference_num_threads: threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY})
    ran = compiled.get_property(hints.inference_precision).get_type_name()
    return (lambda x: compiled(x)[0]), _NAMES.get(ran, ran)  # outputs are copied (share_outputs=False)
