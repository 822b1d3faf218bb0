"""What a run ran on: polypsam's version, the git commit of its source tree, the hardware; one entry per session.

Training (``train.py``, rank 0) and every evaluation (``evaluation/tasks.py``) call :func:`record`, which
appends the session to ``<folder>/provenance.json``::

    {"sessions": [{"recorded_at": "2025-01-01T12:00:00+00:00", "polypsam_version": "0.1.0",
                   "git": {"commit": "<40 hex>", "dirty": false},          # or {"commit": null, "note": ...}
                   "hardware": {"cpu": "...", "cpus": 2, "gpu": null, "gpus": 0, "platform": "...",
                                "python": "3.12.1", "torch": "2.5.1"},
                   "argv": ["..."]}]}

A resumed run gains a session, so a run continued on another machine or at another commit says so.
``git.dirty`` is true when tracked files differ from the commit: the commit alone does not reproduce the
run. A polypsam installed from a wheel is no git checkout; ``git.commit`` is then null and ``git.note``
says why. ``python -m polypsam.compare`` gathers these into ``provenance.md`` (``provenance_table.py``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import polypsam
from polypsam import __version__
from polypsam.data.io import atomic_write
from polypsam.devices import usable_cpus

PROVENANCE_NAME = "provenance.json"
PACKAGE_DIR = Path(polypsam.__file__).resolve().parent  # the package, wherever in it this module lives


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or it hung
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(package_dir: Path = PACKAGE_DIR) -> dict:
    """The commit of the checkout ``package_dir`` was imported from (``<top>/src/polypsam``), and whether
    tracked files differ from it; a note instead when it is not such a checkout (an installed wheel)."""
    top = _git(["rev-parse", "--show-toplevel"], package_dir)
    if top is None or (Path(top) / "src" / "polypsam").resolve() != package_dir.resolve():
        return {"commit": None, "dirty": None, "note": f"{package_dir} is not in a git checkout of polypsam "
                                                       "(an installed package): no commit to record"}
    commit = _git(["rev-parse", "HEAD"], package_dir)
    status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU model and usable cores, GPU name and count (CUDA), platform, Python and torch versions."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cpu": _cpu_model(), "cpus": usable_cpus(), "gpu": torch.cuda.get_device_name(0) if gpus else None,
            "gpus": gpus, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def session() -> dict:
    """This process's provenance entry."""
    return {"recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "polypsam_version": __version__, "git": git_state(), "hardware": hardware(), "argv": list(sys.argv)}


def read(folder: str | Path) -> list[dict]:
    """The sessions recorded in ``folder`` (oldest first); [] when there is no readable record."""
    try:
        doc = json.loads((Path(folder) / PROVENANCE_NAME).read_text())
    except (OSError, ValueError):
        return []
    sessions = doc.get("sessions") if isinstance(doc, dict) else None
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def record(folder: str | Path) -> dict:
    """Append this session to ``<folder>/provenance.json`` (written atomically); return the entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entry = session()
    body = json.dumps({"sessions": [*read(folder), entry]}, indent=1) + "\n"
    atomic_write(folder / PROVENANCE_NAME, lambda f: f.write(body.encode()))
    return entry
