"""``--download``: the archives with a plain-HTTP URL are fetched into ROOT/downloads with
polypsam.download (resumable, verified where a sha256 is known); for the others the manual steps are printed."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from polypsam.download import DownloadError, download_file, sha256_file
from polypsam.errors import DataError

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DatasetDownload:
    key: str
    name: str
    url: str
    filename: str | None  # None: not fetchable over plain HTTP, manual steps only
    sha256: str | None = None  # None: unknown; the digest obtained is recorded in the report
    size: int | None = None
    manual: str = ""


_PRANET_MANUAL = ("Google Drive answers plain HTTP clients with a confirmation page, not the file: open {url} in "
                  "a browser, save {file}, then run: python -m polypsam.curation.prepare {file} --out {root}")
DOWNLOADS: dict[str, DatasetDownload] = {
    d.key: d for d in (
        DatasetDownload("kvasir-seg", "Kvasir-SEG", "https://datasets.simula.no/downloads/kvasir-seg.zip",
                        "kvasir-seg.zip",
                        manual="download {url} in a browser or with wget on a machine with internet access, "
                               "then run: python -m polypsam.curation.prepare kvasir-seg.zip --out {root}"),
        DatasetDownload("pranet-train", "PraNet TrainDataset",
                        "https://drive.google.com/file/d/1lODorfB33jbd-im-qrtUgWnZXxB94F55/view", None,
                        manual=_PRANET_MANUAL.replace("{file}", "TrainDataset.zip")),
        DatasetDownload("pranet-test", "PraNet TestDataset",
                        "https://drive.google.com/file/d/1o8OfBvYE6K-EpDyvzsmMPndnUMwb540R/view", None,
                        manual=_PRANET_MANUAL.replace("{file}", "TestDataset.zip")),
    )
}


def _fetch(entry: DatasetDownload, url: str, directory: Path, timeout: float) -> dict:
    """Fetch one archive (a .part left by an earlier run is resumed); return its report entry."""
    final = directory / entry.filename
    manual = entry.manual.format(url=url, root=shlex.quote(str(directory.parent)))
    try:
        # Only a finished (and, with a known sha256, verified) transfer is ever moved into place.
        if not (final.is_file() and (entry.sha256 is None or sha256_file(final) == entry.sha256)):
            download_file(url, final, sha256=entry.sha256, size=entry.size, progress=True, timeout=timeout)
        digest = entry.sha256 or sha256_file(final)  # Kvasir-SEG publishes none: record the one obtained
    except DownloadError as e:
        raise DataError(f"{entry.name}: download from {url} failed ({e.reason}); rerun to retry "
                        f"(a partial download is resumed), or {manual}") from None
    except OSError as e:
        raise DataError(f"{entry.name}: cannot download {url} into {directory} ({e}); {manual}") from None
    return {"url": url, "file": f"downloads/{entry.filename}", "sha256": digest, "bytes": final.stat().st_size,
            "verified": bool(entry.sha256)}


def fetch_all(root: Path, urls: dict[str, str], console: Console) -> dict[str, dict]:
    """Fetch every archive with a URL (``urls`` overrides by key) into ROOT/downloads; key -> report entry."""
    fetched = {}
    # Manual steps first, so that they are shown even when a fetch below fails.
    for key, entry in sorted(DOWNLOADS.items(), key=lambda kv: kv[1].filename is not None):
        url = urls.get(key, entry.url)
        if entry.filename is None:
            console.print(f"[yellow]{entry.name}[/]: cannot be fetched automatically. "
                          + entry.manual.format(url=url, root=shlex.quote(str(root))), soft_wrap=True)
            continue
        console.print(f"downloading {entry.name} from {url}", soft_wrap=True)
        fetched[key] = _fetch(entry, url, root / "downloads", CONNECT_TIMEOUT_S)
    return fetched
