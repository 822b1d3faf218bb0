"""Resumable, verifying HTTP downloads on urllib: the SAM checkpoints and the polyp archives.

``download_file(url, dest)`` writes to ``<dest>.part``. A rerun after a broken transfer resumes that
file with an HTTP Range request, or starts over when the server cannot resume it (it ignores Range,
or the part no longer fits the file it serves). Only a complete file, and with ``sha256`` a verified
one, is moved to ``dest``; a file that fails the check is deleted. ``timeout`` bounds the connection
and every stall between reads, so an offline machine fails in seconds.

Errors are :class:`DownloadError`, whose ``kind`` tells a caller which fix to name (its own command
to resume, a manual download, ...); ``str()`` is a one-line message with a generic fix.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from polypsam import __version__
from polypsam.errors import PolypSamError

PART_SUFFIX = ".part"
CHUNK = 1 << 20


class DownloadError(PolypSamError):
    """A download that failed. ``kind`` is one of:

    ``unreachable``  no connection (offline, DNS, refused, timed out); nothing was written
    ``http``         the server answered an HTTP error; nothing was written
    ``interrupted``  the transfer broke; the ``.part`` is kept and a rerun resumes it
    ``write``        the ``.part`` (or its folder) cannot be written; it is kept, a rerun resumes it
    ``size``         the server announces another size than ``size``; nothing was fetched
    ``checksum``     the finished file has another sha256 or size; it was deleted

    ``reason`` says what happened (naming the URL or file), without the fix.
    """

    FIXES = {
        "unreachable": "if this machine is offline, download that URL on another machine and copy it to {dest}",
        "http": "check the URL",
        "interrupted": "the partial file {part} is kept; rerun to resume it",
        "write": "free disk space or choose another folder, then rerun to resume",
        "size": "check the URL",
        "checksum": "it is corrupt or not the expected file and was deleted; rerun to fetch it again",
    }

    def __init__(self, kind: str, reason: str, dest: Path):
        self.kind, self.reason, self.dest = kind, reason, dest
        fix = self.FIXES[kind].format(dest=dest, part=part_path(dest))
        super().__init__(f"{reason}; {fix}")


def part_path(dest: str | Path) -> Path:
    """Where an unfinished download of ``dest`` lives."""
    dest = Path(dest)
    return dest.with_name(dest.name + PART_SUFFIX)


def _hash_into(h, path: str | Path, chunk: int = CHUNK):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """The hex sha256 of a file, read in ``chunk``-byte blocks."""
    return _hash_into(hashlib.sha256(), path, chunk).hexdigest()


class _Restart(Exception):
    """The .part cannot be resumed (the server rejected its range) and was deleted: start over."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from ``bytes a-b/N`` or ``bytes */N``; None where absent or ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _progress_bar(name: str, total: int | None, completed: int) -> tuple[Progress, int]:
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True))
    return bar, bar.add_task(name, total=total, completed=completed)


def _transfer(url: str, dest: Path, size: int | None, progress: bool, timeout: float):
    """Bring ``dest``'s .part to the full file, resuming where it can; return the running sha256 of it."""
    part = part_path(dest)
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    hasher = _hash_into(hashlib.sha256(), part) if offset else hashlib.sha256()
    if size is not None and offset == size:
        return hasher  # an earlier run got every byte; the checksum decides

    headers = {"User-Agent": f"polypsam/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total is None or total == offset:
                return hasher  # nothing left to fetch; the checksum decides
            part.unlink()
            raise _Restart from None
        raise DownloadError("http", f"{url} answered HTTP {e.code} {e.reason}", dest) from None
    except (URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError("unreachable", f"cannot reach {url} ({getattr(e, 'reason', e)})", dest) from None

    with resp:
        if offset and resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Restart
            mode = "ab"
        else:  # 200: the server ignored the Range header and sends the whole file
            offset, hasher, mode = 0, hashlib.sha256(), "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise DownloadError("size", f"{url} serves {total} bytes but {dest.name} has {size}", dest)
        received = offset
        bar = task = None
        if progress:
            bar, task = _progress_bar(dest.name, total, offset)
            bar.start()
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise DownloadError("interrupted", f"download of {url} broke after {received} bytes ({e})",
                                            dest) from None
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as e:
                        raise DownloadError("write", f"cannot write {part} ({e.strerror})", dest) from None
                    hasher.update(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(task, completed=received)
        finally:
            if bar is not None:
                bar.stop()
    if total is not None and received < total:  # http.client returns b"" on a cut connection
        raise DownloadError("interrupted", f"download of {url} broke after {received} of {total} bytes", dest)
    return hasher


def download_file(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` through ``<dest>.part`` (resumed if present) and return ``dest``.

    ``sha256`` (hex) and ``size`` (bytes), where known, are checked before the file is moved into place;
    a file that fails them is deleted. An existing ``dest`` is replaced only by a complete, checked file;
    whether it needs fetching at all is the caller's call. ``progress`` shows a bar on stderr.
    Raises :class:`DownloadError`.
    """
    dest = Path(dest).expanduser()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError("write", f"cannot create the folder {dest.parent} ({e.strerror})", dest) from None
    try:
        hasher = _transfer(url, dest, size, progress, timeout)
    except _Restart:  # the .part is gone: a transfer from byte 0 sends no Range, so it cannot restart again
        hasher = _transfer(url, dest, size, progress, timeout)
    part = part_path(dest)
    digest, got = hasher.hexdigest(), part.stat().st_size
    if (sha256 is not None and digest != sha256.lower()) or (size is not None and got != size):
        part.unlink(missing_ok=True)
        expected = " and ".join(([f"sha256 {sha256}"] if sha256 is not None else [])
                                + ([f"{size} bytes"] if size is not None else []))
        raise DownloadError("checksum", f"{dest}: the file downloaded from {url} ({got} bytes) has sha256 {digest}, "
                            f"expected {expected}", dest)
    os.replace(part, dest)
    return dest
