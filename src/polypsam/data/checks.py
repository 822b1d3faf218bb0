"""Every training and validation pair checked before the first step, and the result remembered.

A truncated JPEG passes a header check (its size is in the first bytes) and fails only when a loader
worker decodes it, mid-epoch. ``check_pairs`` decodes every image and mask fully, in threads, with a
progress bar, checks that each mask has its image's size, and records what it learnt per file in a small
JSON file keyed by (path, size, mtime): the next run decodes only files that are new or changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from polypsam.data.io import MASK_THRESHOLD, atomic_write, decoded_size, read_mask_report, size_mismatch
from polypsam.devices import usable_cpus
from polypsam.errors import DataError
from polypsam.progress import count_bar

log = logging.getLogger(__name__)

CHECKS_VERSION = 2  # bump when what is checked changes: every entry is then checked again
# 2: a mask whose values are all 2..127 is an error (io.read_mask_report), no longer an empty mask


@dataclass(frozen=True)
class PairCheck:
    image_hw: tuple[int, int]
    mask_hw: tuple[int, int]
    foreground: bool  # the mask has a polyp pixel (an empty mask gives no prompt)
    nonbinary: int  # mask pixels that were neither 0 nor the maximum (thresholded, reported)


@dataclass
class CheckStats:
    pairs: int = 0
    decoded: int = 0  # files decoded this time
    remembered: int = 0  # files known good from the cache
    seconds: float = 0.0


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


class CheckCache:
    """``{"version", "mask_threshold", "files": {path: {size, mtime_ns, hw[, foreground, nonbinary]}}}``.

    Only successful checks are stored. Writers (DDP ranks, sweep jobs) merge with what is on disk and
    replace the file atomically; a lost update costs a decode next time, never a wrong answer.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path).expanduser() if path else None
        self.files: dict[str, dict] = self._load()
        self.new: dict[str, dict] = {}

    def _header(self) -> dict:
        return {"version": CHECKS_VERSION, "mask_threshold": MASK_THRESHOLD}

    def _load(self) -> dict[str, dict]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            log.warning("%s: unreadable image-check cache, checking every image again", self.path)
            return {}
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self._header().items()):
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def get(self, key: tuple[str, int, int]) -> dict | None:
        entry = self.files.get(key[0])
        if isinstance(entry, dict) and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]:
            return entry
        return None

    def put(self, key: tuple[str, int, int], **info) -> None:
        entry = {"size": key[1], "mtime_ns": key[2], **info}
        self.files[key[0]] = self.new[key[0]] = entry

    def save(self) -> None:
        if self.path is None or not self.new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._load(), **self.new}
        body = json.dumps({**self._header(), "files": merged}, separators=(",", ":")).encode()
        atomic_write(self.path, lambda f: f.write(body))
        self.new = {}


def _check_one(image: Path, mask: Path, cache: CheckCache) -> tuple[PairCheck, int]:
    """The pair's facts and how many of its two files had to be decoded."""
    decoded = 0
    ikey = _stat_key(image) if image.exists() else None
    hit = cache.get(ikey) if ikey else None
    if hit is None:
        image_hw = decoded_size(image)  # a DataError naming the file when it does not decode
        cache.put(_stat_key(image), hw=list(image_hw))
        decoded += 1
    else:
        image_hw = tuple(hit["hw"])
    mkey = _stat_key(mask) if mask.exists() else None
    hit = cache.get(mkey) if mkey else None
    if hit is None or "foreground" not in hit:
        rep = read_mask_report(mask)
        mask_hw, foreground, nonbinary = tuple(rep.mask.shape), bool(rep.mask.any()), rep.nonbinary_pixels
        cache.put(_stat_key(mask), hw=list(mask_hw), foreground=foreground, nonbinary=nonbinary)
        decoded += 1
    else:
        mask_hw, foreground, nonbinary = tuple(hit["hw"]), bool(hit["foreground"]), int(hit["nonbinary"])
    if image_hw != mask_hw:
        raise size_mismatch(mask, mask_hw, image, image_hw)
    return PairCheck(image_hw, mask_hw, foreground, nonbinary), decoded


def _progress_bar(total: int) -> tuple[Callable[[], None], Callable[[], None]]:
    bar = count_bar()
    task = bar.add_task("checking images", total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar.stop


def check_pairs(pairs: Sequence[tuple[Path, Path]], cache_file: str | Path | None = None, progress: bool = True,
                threads: int | None = None) -> tuple[list[PairCheck], CheckStats]:
    """Decode every image and mask of ``pairs`` (those the cache does not know), in order.

    Raises one :class:`DataError` for the pairs that cannot be used (unreadable or truncated image or mask,
    a mask of another size), naming the first file and the fix and counting the others; the pairs that
    passed are remembered even then, so fixing one file does not cost a full check.
    """
    t0 = time.perf_counter()
    cache = CheckCache(cache_file)
    stats = CheckStats(pairs=len(pairs))
    todo = sum(1 for im, mk in pairs for p in (im, mk)
               if not p.exists() or cache.get(_stat_key(p)) is None)
    advance, stop = _progress_bar(len(pairs)) if progress and todo else ((lambda: None), (lambda: None))
    results: list[PairCheck | None] = [None] * len(pairs)
    errors: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            results[i], n = _check_one(Path(pairs[i][0]), Path(pairs[i][1]), cache)
            with lock:
                stats.decoded += n
                stats.remembered += 2 - n
        except DataError as exc:
            with lock:
                errors.append((i, str(exc)))
        finally:
            with lock:
                advance()

    if threads is None:
        threads = usable_cpus()
    try:
        if todo and threads > 1:  # Pillow and numpy release the GIL while decoding
            with ThreadPoolExecutor(max_workers=min(threads, 8)) as pool:
                list(pool.map(run, range(len(pairs))))
        else:
            for i in range(len(pairs)):
                run(i)
    finally:
        stop()
        cache.save()
    stats.seconds = time.perf_counter() - t0
    if errors:
        errors.sort()
        first = errors[0][1]
        if len(errors) > 1:
            others = ", ".join(Path(pairs[i][0]).name for i, _ in errors[1:6])
            first += (f" {len(errors) - 1} more pair(s) cannot be used either ({others}"
                      f"{' ...' if len(errors) > 6 else ''}); fix or remove them before training.")
        raise DataError(first)
    return [r for r in results if r is not None], stats
