"""One prepare run: fetch (with --download), open the sources, recognise the sets, write them, report."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from polypsam.curation.prepare.detect import detect_sets
from polypsam.curation.prepare.fetch import DOWNLOADS, fetch_all
from polypsam.curation.prepare.report import load_report, print_summary, write_report
from polypsam.curation.prepare.sources import open_sources
from polypsam.curation.prepare.write import Counts, SetResult, check_masks, write_set
from polypsam.errors import DataError
from polypsam.progress import count_bar


@dataclass
class PrepareResult:
    report: dict
    written: int  # data files, manifest, report and boxes written this run
    removed: int
    ok: bool  # every set passed the checks (count differences are only warnings)


def prepare(sources: list[str | Path], root: str | Path, *, download: bool = False, force: bool = False,
            urls: dict[str, str] | None = None, console: Console | None = None) -> PrepareResult:
    """Build ROOT from ``sources``; see polypsam.curation.prepare's docstring. Raises DataError on unusable input."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: rich's 80 columns would cut the set names
            console = Console(width=120)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: --out must be a folder, and this is a file; choose another path")
    urls = dict(urls or {})
    for key in urls:
        if key not in DOWNLOADS:
            raise DataError(f"--url {key}=...: unknown download; known: {', '.join(DOWNLOADS)}")
    srcs = [Path(s) for s in sources]
    previous = load_report(root)
    downloads = dict(previous.get("downloads") or {})
    if download:
        fetched = fetch_all(root, urls, console)
        downloads.update(fetched)
        srcs += [root / entry["file"] for entry in fetched.values()]
    if not srcs:
        raise DataError("no SRC given; pass dataset archives or folders (or --download)")

    counts = Counts()
    results: dict[str, SetResult] = {}
    with tempfile.TemporaryDirectory(prefix="polypsam-prepare-") as tmp:
        trees, skipped_archives = open_sources(srcs, root, Path(tmp))
        try:
            found = detect_sets(srcs, trees, skipped_archives)
            for f in found:
                check_masks(f)
            root.mkdir(parents=True, exist_ok=True)
            with count_bar(console=console, transient=True) as progress:
                for f in found:
                    results[f.out_rel] = write_set(f, root, force, counts, progress)
        finally:
            for t in trees:
                t.close()

    report, ok = write_report(root, results, previous, downloads, force, counts)
    print_summary(console, root, report, counts)
    return PrepareResult(report, counts.written, counts.removed, ok)
