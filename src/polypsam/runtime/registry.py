"""The runtimes and their choice: ``resolve_runtime`` picks one, ``build_frozen_encoder`` builds and checks it.

``auto`` takes the first installed runtime of ``AUTO_ORDER`` that offers the precision asked for (the
order is the measured speed of benchmarks/RESULTS.md). A missing package falls back to torch with one
log line naming it; a runtime that fails to export, load or match torch on a probe canvas falls back to
torch with one line naming the runtime and the model. Either way the masks are torch's, never silently
different ones, and the encoder built says so (``fallback``). A CPU without bf16 runs an OpenVINO bf16
request at fp32: the encoder is then named fp32, keyed as exact, with one line and a ``fallback`` too.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polypsam.devices import usable_cpus
from polypsam.errors import ConfigError
from polypsam.models.sam import PromptableSAM
from polypsam.runtime import onnxruntime_backend, openvino_backend
from polypsam.runtime.encoder import EXACT_PRECISION, FrozenEncoder, GraphEncoder, TorchEncoder
from polypsam.runtime.settings import RuntimeSettings
from polypsam.runtime.store import EncoderStore, eval_mode

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
# the largest relative error (Frobenius norm) of a runtime's embedding against torch's on the probe canvas
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}


@dataclass(frozen=True)
class Runtime:
    name: str
    package: str  # the module it imports, and its pip package
    precisions: tuple[str, ...]
    # (onnx file, precision, threads) -> (the encoder's function, the precision it runs at: a CPU may lack one)
    load: Callable[[Path, str, int], tuple[Callable[[np.ndarray], np.ndarray], str]]
    version: Callable[[], str]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


RUNTIMES = {r.name: r for r in (
    Runtime("openvino", "openvino", ("fp32", "bf16"), openvino_backend.load, openvino_backend.version),
    Runtime("onnxruntime", "onnxruntime", ("fp32",), onnxruntime_backend.load, onnxruntime_backend.version),
)}
AUTO_ORDER = ("openvino", "onnxruntime")  # fastest first, on the CPUs measured


def available_runtimes() -> list[str]:
    return ["torch", *(name for name, r in RUNTIMES.items() if r.installed())]


def resolve_runtime(runtime: str, precision: str, device: torch.device) -> tuple[str, str]:
    """(runtime, precision) to run: ``auto`` resolved, a missing package replaced by torch fp32 (logged)."""
    name, precision, missing = _resolve(runtime, precision, device)
    if missing:
        log.warning("%s; the frozen encoder runs in torch fp32", missing)
    return name, precision


def check_runtime(runtime: str, precision: str, device: torch.device) -> None:
    """A ConfigError for a runtime or precision that cannot run on ``device`` (a missing package is not one:
    it falls back to torch); the schema calls it before the model is built (``polypsam.schema``)."""
    _resolve(runtime, precision, device)


def _resolve(runtime: str, precision: str, device: torch.device) -> tuple[str, str, str]:
    """``resolve_runtime``'s choice, and why a runtime asked for is replaced by torch ("" when none is)."""
    if runtime not in ("auto", "torch", *RUNTIMES):
        raise ConfigError(f"model.runtime={runtime}: choose auto, torch, {', '.join(RUNTIMES)}.")
    if precision not in PRECISIONS:
        raise ConfigError(f"model.runtime_precision={precision}: choose {', '.join(PRECISIONS)}.")
    if device.type != "cpu":
        if runtime in ("auto", "torch") and precision == EXACT_PRECISION:
            return "torch", EXACT_PRECISION, ""
        raise ConfigError(f"model.runtime={runtime} model.runtime_precision={precision}: these runtimes run on the "
                          f"CPU, and this run's device is {device}; keep model.runtime=auto with fp32 (torch on a "
                          "GPU) and reduce precision there with trainer.precision=bf16-mixed or precision=bf16.")
    offers = {"torch": (EXACT_PRECISION,), **{name: r.precisions for name, r in RUNTIMES.items()}}
    offering = [name for name, r in RUNTIMES.items() if precision in r.precisions]
    if runtime != "auto" and precision not in offers[runtime]:
        raise ConfigError(f"model.runtime={runtime} does not offer model.runtime_precision={precision}; "
                          f"{', '.join(offering) or 'no runtime here'} does: set model.runtime accordingly, "
                          "or model.runtime_precision=fp32.")
    if runtime == "torch":
        return "torch", EXACT_PRECISION, ""
    names = [runtime] if runtime != "auto" else [n for n in AUTO_ORDER if precision in RUNTIMES[n].precisions]
    if not names:
        raise ConfigError(f"model.runtime_precision={precision}: no runtime offers it yet; use fp32 or bf16.")
    for name in names:
        if RUNTIMES[name].installed():
            return name, precision, ""
    packages = " or ".join(RUNTIMES[n].package for n in names)
    return "torch", EXACT_PRECISION, (f"model.runtime={runtime}: the package {packages} is not installed "
                                      f"(pip install {RUNTIMES[names[0]].package})")


def build_frozen_encoder(net: PromptableSAM, settings: RuntimeSettings, device: torch.device) -> FrozenEncoder:
    """The frozen encoder of ``net`` in the runtime ``settings`` ask for, exported once and checked against
    torch on a probe canvas once per runtime version; torch where that fails (one log line, kept as the
    encoder's ``fallback``). A prompt-free baseline (no SAM image encoder) keeps torch."""
    name, precision, missing = _resolve(settings.runtime, settings.precision, device)
    if missing:
        log.warning("%s; the frozen encoder runs in torch fp32", missing)
        return TorchEncoder(net, fallback=missing)
    if name == "torch" or not isinstance(net, PromptableSAM):
        return TorchEncoder(net)
    runtime = RUNTIMES[name]
    try:
        fingerprint = net.encoder_fingerprint()
        store = EncoderStore(settings.store, net, fingerprint)
        infer, ran = runtime.load(store.onnx_path(), precision, usable_cpus())
        lacks = "" if ran == precision else f"model.runtime_precision={precision}: {name} runs {ran} on this CPU"
        if lacks:
            log.warning("%s (no %s support); its embeddings are keyed as %s", lacks, precision, ran)
        encoder = GraphEncoder(net, infer, name, ran, fingerprint, fallback=lacks)
        check = f"{name}-{runtime.version()}-{ran}"
        error = store.checked_error(check)
        if error is None:
            error = probe_error(net, encoder)
            store.record_check(check, error)
        allowed = TOLERANCE.get(ran, TOLERANCE[precision])
        if not error <= allowed:
            raise ValueError(f"its embedding differs from torch's by {error:.2e} (relative; allowed "
                             f"{allowed:.0e} at {ran})")
    except Exception as exc:  # an exporter or runtime failure of any kind: torch gives the same masks
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        failed = (f"model.runtime={name} could not run the image encoder of model {net.spec.name} at "
                  f"{precision} ({type(exc).__name__}: {reason})")
        log.warning("%s; it runs in torch fp32", failed)
        return TorchEncoder(net, fallback=failed)
    return encoder


def probe_error(net: PromptableSAM, encoder: GraphEncoder) -> float:
    """Relative error of ``encoder`` against torch's encoder in eval mode on one seeded, partly padded canvas."""
    s = net.spec.image_size
    canvas = torch.randint(0, 256, (1, 3, s, s), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    hw = torch.tensor([[s, s * 3 // 4]])
    dev = net.pixel_mean.device
    with eval_mode(net.image_encoder):
        want = TorchEncoder(net).encode(canvas.to(dev), hw.to(dev)).cpu()
    got = encoder.encode(canvas, hw)
    return float((got - want).norm() / want.norm().clamp_min(1e-12))
