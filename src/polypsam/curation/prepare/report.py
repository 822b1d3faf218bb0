"""Checking every set in ROOT, and writing MANIFEST.sha256.csv, prepare_report.json and the summary table.

The report covers the whole ROOT, not only what this run touched: earlier runs' sets keep their entries.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from polypsam.curation.prepare.write import Counts, SetResult, put
from polypsam.curation.specks import speck_report
from polypsam.data.files import STANDARD_TEST_SETS, ImageMaskPair, find_pairs
from polypsam.data.io import IMAGE_EXTENSIONS, image_size
from polypsam.download import sha256_file
from polypsam.errors import DataError

MANIFEST_NAME = "MANIFEST.sha256.csv"
REPORT_NAME = "prepare_report.json"

# Pairs in the official releases; a different count is a warning (partial copies are common).
EXPECTED_COUNTS: dict[str, int] = {
    "TrainDataset": 1450,
    "TestDataset/Kvasir": 100,
    "TestDataset/CVC-ClinicDB": 62,
    "TestDataset/CVC-ColonDB": 380,
    "TestDataset/CVC-300": 60,
    "TestDataset/ETIS-LaribPolypDB": 196,
    "Sources/Kvasir-SEG": 1000,
    "Sources/CVC-ClinicDB": 612,
    "Sources/CVC-ColonDB": 380,
    "Sources/CVC-300": 60,
    "Sources/ETIS-LaribPolypDB": 196,
}


def load_report(root: Path) -> dict:
    """The previous run's report, or {} when there is none (or it is unreadable)."""
    try:
        obj = json.loads((root / REPORT_NAME).read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _sets_on_disk(root: Path) -> list[str]:
    rels = []
    if (root / "TrainDataset").is_dir():
        rels.append("TrainDataset")
    for top in ("TestDataset", "Sources"):
        if (root / top).is_dir():
            names = sorted(p.name for p in (root / top).iterdir() if p.is_dir() and not p.name.startswith("."))
            if top == "TestDataset":
                names = [n for n in STANDARD_TEST_SETS if n in names] + [n for n in names if n not in STANDARD_TEST_SETS]
            rels += [f"{top}/{n}" for n in names]
    return rels


def _check_set(root: Path, rel: str) -> tuple[list[ImageMaskPair], list[str]]:
    """(pairs, problems) for one output set: pairing, equal sizes, masks strictly 0/255."""
    folder = root / rel
    try:
        pairs = find_pairs(folder / "images", folder / "masks")
    except DataError as e:
        return [], [" ".join(str(e).split())]
    problems = []
    for p in pairs:
        try:
            if image_size(p.image) != image_size(p.mask):
                problems.append(f"{p.mask}: size differs from {p.image.name}")
                continue
            with Image.open(p.mask) as m:
                values = np.unique(np.asarray(m))
                if m.mode != "L" or not set(values.tolist()) <= {0, 255}:
                    problems.append(f"{p.mask}: not an 8-bit 0/255 mask (mode {m.mode}, values {values[:6].tolist()})")
        except (DataError, OSError) as e:
            problems.append(" ".join(str(e).split()))
    return pairs, problems


def _manifest(root: Path, rels: list[str], known: dict[str, str]) -> bytes:
    rows = []
    for rel in rels:
        for p in sorted((root / rel).rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            r = p.relative_to(root).as_posix()
            digest = known.get(r) or sha256_file(p)
            w = h = ""
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                hh, ww = image_size(p)
                w, h = str(ww), str(hh)
            rows.append((r, digest, str(p.stat().st_size), w, h))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "sha256", "bytes", "width", "height"))
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_report(root: Path, results: dict[str, SetResult], previous: dict, downloads: dict, force: bool,
                 counts: Counts) -> tuple[dict, bool]:
    """Check every set in ROOT, write the manifest and the report; return (report, every set passed)."""
    old_sets = previous.get("sets") if isinstance(previous.get("sets"), dict) else {}
    sets: dict[str, dict] = {}
    known_digests: dict[str, str] = {}
    warnings: list[str] = []
    ok = True
    rels = _sets_on_disk(root)
    for rel in rels:
        res = results.get(rel)
        old = old_sets.get(rel) if isinstance(old_sets.get(rel), dict) else {}
        pairs, problems = _check_set(root, rel)
        n = len(pairs)
        expected = EXPECTED_COUNTS.get(rel)
        set_warnings = list(res.warnings) if res else []
        if problems:
            status, ok = "error", False
        elif expected is not None and n != expected:
            status = "count differs"
            set_warnings.append(f"{rel}: expected {expected} pairs, found {n}")
        else:
            status = "ok" if expected is not None else "ok (no known count)"
        entry = {
            "kind": res.kind if res else old.get("kind", rel.split("/")[0]),
            "source": res.origin if res else old.get("source"),
            "pairs": n,
            "expected": expected,
            "thresholded_pixels": res.thresholded if res else old.get("thresholded_pixels"),
            "status": status,
            "problems": problems[:20],
            "warnings": set_warnings,
        }
        if not problems:  # masks whose literal tight box a speck stretches, named (polypsam.curation.specks)
            entry["specks"] = speck_report([p.mask for p in pairs], root)
        if res and res.boxes is not None:
            entry["kvasir_boxes"] = res.boxes
        elif not res and "kvasir_boxes" in old:
            entry["kvasir_boxes"] = old["kvasir_boxes"]
        sets[rel] = entry
        warnings += set_warnings + [f"{rel}: {p}" for p in problems[:5]]
        if res:
            known_digests.update(res.digests)

    manifest = _manifest(root, rels, known_digests)
    put(root / MANIFEST_NAME, manifest, force, counts)
    report = {
        "layout": {"train": "TrainDataset", "test": "TestDataset/<name>", "sources": "Sources/<name>"},
        "mask_threshold": "> 127",
        "sets": sets,
        "downloads": downloads,
        "warnings": warnings,
        "manifest": MANIFEST_NAME,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    put(root / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode(), force, counts)
    return report, ok


def print_summary(console: Console, root: Path, report: dict, counts: Counts) -> None:
    """The sets table, the Kvasir-SEG box check, every warning and what changed on disk."""
    sets = report["sets"]
    table = Table(title=f"polyp data in {root}")
    for col, just in (("set", "left"), ("source", "left"), ("pairs", "right"), ("expected", "right"),
                      ("thresholded px", "right"), ("status", "left")):
        table.add_column(col, justify=just)
    style = {"ok": "green", "count differs": "yellow", "error": "red"}
    for rel, e in sets.items():
        src = Path(str(e["source"])).name if e["source"] else "(earlier run)"
        table.add_row(rel, src, str(e["pairs"]), "-" if e["expected"] is None else str(e["expected"]),
                      "-" if e["thresholded_pixels"] is None else str(e["thresholded_pixels"]),
                      f"[{style.get(e['status'], 'green')}]{e['status']}[/]")
    console.print(table)
    for rel, e in sets.items():
        b = e.get("kvasir_boxes")
        if b:
            frac = f"{100 * b['differ_fraction']:.1f}%" if b["differ_fraction"] is not None else "-"
            console.print(f"{rel} boxes: {b['differ']} of {b['compared']} ({frac}) differ by more than "
                          f"{b['tolerance_px']} px from the mask's tight box; {b['multi_box']} image(s) have "
                          "several boxes", soft_wrap=True)
        s = e.get("specks")
        if s and s["stretched"]:
            console.print(f"{rel}: {s['stretched']} of {s['masks']} masks have a speck that stretches the literal "
                          f"tight box by more than {s['growth_above']:.0%} (components under {s['min_area']} px; "
                          f"named in {REPORT_NAME})", soft_wrap=True)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    changes = counts.written + counts.removed
    console.print("nothing changed" if changes == 0 else
                  f"{counts.written} file(s) written, {counts.removed} removed, {counts.unchanged} unchanged",
                  soft_wrap=True)
