"""The machine a benchmark runs on: device facts, peak rates, threads, and cases in forked processes."""

from __future__ import annotations

import gc
import os
import pickle
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.tables import fmt

# Dense tensor-core peaks in TFLOP/s (bf16; fp16 on V100, which has no bf16), from the vendors' sheets.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
                   ("V100", 125.0))


def pick_device(device: str) -> torch.device:
    """``auto``: cuda when there is one, else cpu."""
    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast's dtype of a training step: bf16 on a GPU (fp16 where bf16 is missing), none (fp32) on a CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def proc_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.MULTILINE).group(1)) / 1024


def reset_cpu_peak() -> bool:
    """Reset VmHWM (the peak resident set) through /proc/self/clear_refs; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def in_child(fn, *args):
    """``fn(*args)`` in a forked process (CPU only): a clean heap for each case, nothing left behind.

    The parent never runs torch with more than one thread, so there is no OpenMP pool to break by forking.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return "error", f"child process died (wait status {status}; out of memory?)"
    return pickle.loads(data)


def with_threads(threads: int, fn, *args):
    """``fn(*args)`` with ``threads`` torch threads (in a forked case)."""
    torch.set_num_threads(threads)
    return fn(*args)


def measure_cpu_peak_gflops(seconds: float = 1.5) -> float:
    """fp32 GEMM rate with the threads in use: the CPU's practical ceiling, for a CPU 'MFU'."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return best


def has_amx() -> bool:
    """The CPU has AMX bf16 tiles (Intel Xeon 4th generation and later)."""
    return "amx_bf16" in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for k, p in GPU_PEAK_TFLOPS if k in name), None)
        dt = amp_dtype(device)
        info.update(kind="cuda", name=name, precision=f"autocast {str(dt).replace('torch.', '')}",
                    peak_tflops=peak, peak_source="vendor dense tensor-core figure" if peak else "unknown GPU",
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        name = "unknown CPU"
        try:
            m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            name = m.group(1).strip() if m else name
        except OSError:
            pass
        info.update(kind="cpu", name=name, precision="fp32", threads=torch.get_num_threads(),
                    cores=os.cpu_count(), loadavg_start=os.getloadavg()[0])
    return info


def describe(info: dict) -> str:
    """One sentence of ``device_info``'s facts, for a table's heading."""
    if info["kind"] == "cuda":
        return (f"{info['name']} ({info['memory_gib']} GiB), {info['precision']}, peak "
                f"{fmt(info['peak_tflops'], '.0f', 'unknown')} TFLOP/s ({info['peak_source']}), torch {info['torch']}")
    return (f"{info['name']}, {info['threads']} torch threads on {info['cores']} cores, fp32, measured GEMM peak "
            f"{info['peak_gflops']:.0f} GFLOP/s, load average {info['loadavg_start']:.1f} at start and "
            f"{info.get('loadavg_end', float('nan')):.1f} at end (the cores are shared with other jobs), "
            f"torch {info['torch']}")
