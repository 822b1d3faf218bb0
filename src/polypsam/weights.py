"""The official SAM checkpoints: where they live, how to fetch them, and proof that they are intact.

A 2.5 GB download breaks often, so `download` resumes a ``.part`` file with an HTTP Range request and
only moves it into place once its sha256 matches. Hashing 2.5 GB takes seconds, so a verified file
leaves a ``<file>.sha256ok`` stamp (size, mtime, digest) and is not hashed again until it changes.

Command line::

    python -m polypsam.weights download vit_b|vit_l|vit_h|all [--dir D] [--url URL]
    python -m polypsam.weights verify [vit_b ...] [--dir D]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from polypsam import __version__
from polypsam.errors import CheckpointError, PolypSamError

BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
ENV_VAR = "POLYPSAM_CHECKPOINT_DIR"
STAMP_SUFFIX = ".sha256ok"
PART_SUFFIX = ".part"


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


def fetch_command(name: str, directory: str | Path | None = None) -> str:
    """The exact command that fetches (or resumes, or replaces) checkpoint ``name``."""
    _known(name)
    return _command(name, directory)


def _spec_command(spec: CheckpointSpec, directory: str | Path) -> str:
    official = SAM_CHECKPOINTS.get(spec.name)
    url = None if official is not None and official.url == spec.url else spec.url
    return _command(spec.name, directory, url)


def _verify_command(directory: str | Path) -> str:
    return f"python -m polypsam.weights verify --dir {shlex.quote(str(directory))}"


def _hash_into(h, path: str | Path, chunk: int = 1 << 20):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    return _hash_into(hashlib.sha256(), path, chunk).hexdigest()


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
        part = path.with_name(path.name + PART_SUFFIX)
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
        elif path.with_name(path.name + PART_SUFFIX).exists():
            status[name] = "partial"
        else:
            status[name] = "missing"
    return status


# -- download ----------------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(stderr=True)


class _Restart(Exception):
    """The .part cannot be resumed (the server rejected its range): start over."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from ``bytes a-b/N`` or ``bytes */N``; None where absent or ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transfer(spec: CheckpointSpec, part: Path, directory: Path, progress: bool, timeout: float):
    """Bring ``part`` to the full file (resuming where it can); return the running sha256 of it."""
    offset = part.stat().st_size if part.exists() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    hasher = _hash_into(hashlib.sha256(), part) if offset else hashlib.sha256()
    if spec.size is not None and offset == spec.size:
        return hasher  # an earlier run got every byte; the checksum decides

    headers = {"User-Agent": f"polypsam/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    retry = _spec_command(spec, directory)
    try:
        resp = urlopen(Request(spec.url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total is None or total == offset:
                return hasher  # nothing left to fetch; the checksum decides
            part.unlink()
            raise _Restart from None
        raise CheckpointError(f"{spec.url} answered HTTP {e.code} {e.reason}; check the URL or fetch the file "
                              f"yourself into {directory}, then run: {_verify_command(directory)}") from None
    except (URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"cannot reach {spec.url} ({reason}). If this machine is offline, download that URL in a browser or "
            f"with wget on another machine, put {spec.filename} in {directory}, then run: "
            f"{_verify_command(directory)}") from None

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
        if spec.size is not None and total is not None and total != spec.size:
            raise CheckpointError(f"{spec.url} serves {total} bytes but {spec.filename} has {spec.size}: not the "
                                  f"official file; check the URL or fetch {BASE_URL + spec.filename} yourself")
        received = offset
        bar = None
        if progress:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), console=_console())
            task = bar.add_task(spec.filename, total=total, completed=offset)
            bar.start()
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(1 << 20)
                    except (OSError, http.client.HTTPException) as e:
                        raise CheckpointError(
                            f"download of {spec.url} broke after {received} bytes ({e}); the partial file {part} "
                            f"is kept, resume it with: {retry}") from None
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as e:
                        raise CheckpointError(f"cannot write {part} ({e.strerror}); free disk space or choose "
                                              f"another folder with --dir, then resume with: {retry}") from None
                    hasher.update(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(task, completed=received)
        finally:
            if bar is not None:
                bar.stop()
    if total is not None and received < total:  # http.client returns b"" on a cut connection
        raise CheckpointError(f"download of {spec.url} broke after {received} of {total} bytes; the partial "
                              f"file {part} is kept, resume it with: {retry}")
    return hasher


def download(spec: CheckpointSpec, directory: str | Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``spec`` into ``directory`` (resuming a .part), verify it, and move it into place.

    ``timeout`` bounds the connection and any stall between reads, so an unreachable host fails fast.
    """
    folder = Path(directory).expanduser()
    final = folder / spec.filename
    if final.is_file() and _check(final, spec)[0]:
        if progress:
            _console().print(f"{final} is already present and verified; not downloading it again.")
        return final
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint folder {folder} ({e.strerror}); choose another "
                              f"with --dir or {ENV_VAR}") from None
    part = final.with_name(final.name + PART_SUFFIX)
    for attempt in range(2):
        try:
            hasher = _transfer(spec, part, folder, progress, timeout)
            break
        except _Restart:
            if attempt:
                raise CheckpointError(f"{spec.url} rejects resuming {part} twice; delete it and retry with: "
                                      f"{_spec_command(spec, folder)}") from None

    digest = hasher.hexdigest()
    size = part.stat().st_size
    if digest != spec.sha256 or (spec.size is not None and size != spec.size):
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"{final}: the file downloaded from {spec.url} ({size} bytes) has sha256 {digest}, expected "
            f"{spec.sha256}; it is corrupt or not the official file and was deleted. Retry with: "
            f"{_spec_command(spec, folder)}")
    os.replace(part, final)
    _write_stamp(final, digest)
    if progress:
        _console().print(f"{final}: sha256 verified.")
    return final


# -- command line ------------------------------------------------------------------------------------

def _print_table(folder: Path, status: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {"ok": "green", "missing": "yellow", "partial": "yellow", "corrupt": "red"}
    table = Table(title=f"SAM checkpoints in {folder}")
    for col in ("name", "file", "status"):
        table.add_column(col)
    for name, state in status.items():
        table.add_row(name, SAM_CHECKPOINTS[name].filename, f"[{style[state]}]{state}[/]")
    Console().print(table)


def _source(name: str, url: str | None, many: bool) -> CheckpointSpec:
    spec = SAM_CHECKPOINTS[name]
    if url is None:
        return spec
    if url.endswith("/"):  # a mirror of the whole folder
        return CheckpointSpec(spec.name, spec.filename, spec.sha256, spec.size, url + spec.filename)
    if many:
        raise CheckpointError(f"--url {url} names one file but several checkpoints were asked for; give a "
                              f"folder URL ending in '/' or download one name at a time")
    return CheckpointSpec(spec.name, spec.filename, spec.sha256, spec.size, url)


def main(argv: list[str] | None = None) -> int:
    names = list(SAM_CHECKPOINTS)
    parser = argparse.ArgumentParser(prog="python -m polypsam.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch (or resume) checkpoints and verify their sha256")
    dl.add_argument("names", nargs="+", choices=names + ["all"], metavar="NAME",
                    help=f"one or more of {', '.join(names)}, or all")
    dl.add_argument("--dir", default=None, help=f"target folder (default: ${ENV_VAR} or ~/.cache/polypsam/checkpoints)")
    dl.add_argument("--url", default=None, help="another source: a file URL, or a mirror folder URL ending in '/'")
    dl.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    vf = sub.add_parser("verify", help="report which checkpoints are present and intact")
    # no choices= here: Python 3.11 argparse rejects an empty nargs="*" list against choices
    vf.add_argument("names", nargs="*", metavar="NAME", help=f"limit to these of {', '.join(names)} (default: all)")
    vf.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "verify" and (unknown := sorted(set(args.names) - set(names))):
        parser.error(f"unknown checkpoint {', '.join(unknown)}; known: {', '.join(names)}")

    folder = default_checkpoint_dir(args.dir)
    if args.command == "verify":
        wanted = args.names or names
        status = {n: s for n, s in verify(folder).items() if n in wanted}
        _print_table(folder, status)
        return 0 if all(s == "ok" for s in status.values()) else 1

    wanted = names if "all" in args.names else list(dict.fromkeys(args.names))
    try:
        sources = [_source(name, args.url, len(wanted) > 1) for name in wanted]
    except PolypSamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = False
    for name, spec in zip(wanted, sources):
        try:
            download(spec, folder, progress=not args.quiet, timeout=args.timeout)
        except PolypSamError as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
        except KeyboardInterrupt:
            print(f"interrupted; rerun to resume: {_command(name, folder, args.url)}", file=sys.stderr)
            return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
