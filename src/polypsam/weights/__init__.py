"""The official SAM checkpoints: where they live, how to fetch them, and proof that they are intact.

A 2.5 GB download breaks often, so `download` goes through :func:`polypsam.download.download_file`: it
resumes a ``.part`` file with an HTTP Range request and only moves it into place once its sha256 matches.
Hashing 2.5 GB takes seconds, so a verified file leaves a ``<file>.sha256ok`` stamp (size, mtime,
digest) and is not hashed again until it changes.

Command line (``weights/__main__.py``)::

    python -m polypsam.weights download vit_b|vit_l|vit_h|all [--dir D] [--url URL]
    python -m polypsam.weights verify [vit_b ...] [--dir D]
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from polypsam.download import DownloadError, download_file, part_path, sha256_file
from polypsam.errors import CheckpointError

BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
ENV_VAR = "POLYPSAM_CHECKPOINT_DIR"
STAMP_SUFFIX = ".sha256ok"


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    filename: str
    sha256: str
    size: int | None
    url: str


def _spec(name: str, filename: str, sha256: str, size: int | None) -> CheckpointSpec:
    return CheckpointSpec(name, filename, sha256, size, BASE_URL + filename)


SAM_CHECKPOINTS: dict[str, CheckpointSpec] = {
    s.name: s
    for s in (
        _spec("vit_b", "sam_vit_b_01ec64.pth",
              "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", None),
        _spec("vit_l", "sam_vit_l_0b3195.pth",
              "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", None),
        _spec("vit_h", "sam_vit_h_4b8939.pth",
              "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879),
    )
}


def default_checkpoint_dir(configured: str | Path | None = None) -> Path:
    """The configured folder, else $POLYPSAM_CHECKPOINT_DIR, else ~/.cache/polypsam/checkpoints."""
    if configured is not None and str(configured) != "":
        return Path(configured).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "polypsam" / "checkpoints"


def _known(name: str) -> CheckpointSpec:
    try:
        return SAM_CHECKPOINTS[name]
    except KeyError:
        raise CheckpointError(f"unknown SAM checkpoint {name!r}; known: {', '.join(SAM_CHECKPOINTS)}") from None


def _command(name: str, directory: str | Path | None, url: str | None = None) -> str:
    cmd = f"python -m polypsam.weights download {name} --dir {shlex.quote(str(default_checkpoint_dir(directory)))}"
    if url is not None:
        cmd += f" --url {shlex.quote(url)}"
    return cmd


def fetch_command(name: str, directory: str | Path | None = None, url: str | None = None) -> str:
    """The exact command that fetches (or resumes, or replaces) checkpoint ``name`` (from ``url``: a mirror)."""
    _known(name)
    return _command(name, directory, url)


def _spec_command(spec: CheckpointSpec, directory: str | Path) -> str:
    official = SAM_CHECKPOINTS.get(spec.name)
    url = None if official is not None and official.url == spec.url else spec.url
    return _command(spec.name, directory, url)


def _verify_command(directory: str | Path) -> str:
    return f"python -m polypsam.weights verify --dir {shlex.quote(str(directory))}"


# -- verification stamp ------------------------------------------------------------------------------

def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    try:
        _stamp_path(path).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    except OSError:
        pass  # a read-only folder only costs a re-hash next time


def _stamped_digest(path: Path) -> str | None:
    """The digest recorded for this exact file (same size and mtime), if any."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
        if stamp["size"] == st.st_size and stamp["mtime_ns"] == st.st_mtime_ns:
            return str(stamp["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _check(path: Path, spec: CheckpointSpec) -> tuple[bool, str]:
    """(intact, reason) for a present file; hashes only when the stamp does not cover it."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return False, f"it is {size} bytes, expected {spec.size}"
    digest = _stamped_digest(path)
    if digest is None:
        digest = sha256_file(path)
        if digest == spec.sha256:
            _write_stamp(path, digest)
    if digest != spec.sha256:
        return False, f"its sha256 is {digest}, expected {spec.sha256}"
    return True, ""


def resolve_checkpoint(name: str, directory: str | Path | None = None, verify: bool = True) -> Path:
    """The path of checkpoint ``name``, present and (with ``verify``) proven intact."""
    spec = _known(name)
    folder = default_checkpoint_dir(directory)
    path = folder / spec.filename
    if not path.is_file():
        part = part_path(path)
        partial = f" A partial download {part} exists; the command resumes it." if part.exists() else ""
        raise CheckpointError(
            f"SAM {name} checkpoint not found: expected {path}. Fetch it from {spec.url} with: "
            f"{_command(name, folder)} (or download that URL yourself and put the file in {folder}; "
            f"set {ENV_VAR} or the checkpoint_dir setting to use another folder).{partial}")
    if verify:
        ok, reason = _check(path, spec)
        if not ok:
            raise CheckpointError(
                f"{path} is corrupt or partial ({reason}). Re-fetch it with: {_command(name, folder)} "
                f"(it resumes or replaces the file).")
    return path


def verify(directory: str | Path | None = None) -> dict[str, str]:
    """Status of each known checkpoint in ``directory``: ok, corrupt, partial or missing."""
    folder = default_checkpoint_dir(directory)
    status = {}
    for name, spec in SAM_CHECKPOINTS.items():
        path = folder / spec.filename
        if path.is_file():
            status[name] = "ok" if _check(path, spec)[0] else "corrupt"
        elif part_path(path).exists():
            status[name] = "partial"
        else:
            status[name] = "missing"
    return status


# -- download ----------------------------------------------------------------------------------------

def _fix(kind: str, spec: CheckpointSpec, folder: Path) -> str:
    """What to do after a failed download of ``spec`` (see polypsam.download.DownloadError's kinds)."""
    retry, verify_cmd = _spec_command(spec, folder), _verify_command(folder)
    return {
        "unreachable": f"if this machine is offline, download that URL in a browser or with wget on another "
                       f"machine, put {spec.filename} in {folder}, then run: {verify_cmd}",
        "http": f"check the URL or fetch the file yourself into {folder}, then run: {verify_cmd}",
        "interrupted": f"the partial file {part_path(folder / spec.filename)} is kept, resume it with: {retry}",
        "write": f"free disk space or choose another folder with --dir, then resume with: {retry}",
        "size": f"not the official file; check the URL or fetch {BASE_URL + spec.filename} yourself",
        "checksum": f"it is corrupt or not the official file and was deleted. Retry with: {retry}",
    }[kind]


def download(spec: CheckpointSpec, directory: str | Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``spec`` into ``directory`` (resuming a .part), verify it, and move it into place.

    ``timeout`` bounds the connection and any stall between reads, so an unreachable host fails fast.
    """
    folder = Path(directory).expanduser()
    final = folder / spec.filename
    if final.is_file() and _check(final, spec)[0]:
        if progress:
            Console(stderr=True).print(f"{final} is already present and verified; not downloading it again.")
        return final
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint folder {folder} ({e.strerror}); choose another "
                              f"with --dir or {ENV_VAR}") from None
    try:
        download_file(spec.url, final, sha256=spec.sha256, size=spec.size, progress=progress, timeout=timeout)
    except DownloadError as e:
        raise CheckpointError(f"{e.reason}; {_fix(e.kind, spec, folder)}") from None
    _write_stamp(final, spec.sha256)
    if progress:
        Console(stderr=True).print(f"{final}: sha256 verified.")
    return final
