"""Turn the official polyp archives (or their extracted folders) into the layout polypsam reads.

    python -m polypsam.data.prepare SRC [SRC ...] --out ROOT [--download] [--force] [--url KEY=URL]

Where things go:

    ROOT/TrainDataset/{images,masks}              PraNet's training split (900 Kvasir + 550 ClinicDB)
    ROOT/TestDataset/<name>/{images,masks}        PraNet's five test sets, used for the paper tables
    ROOT/Sources/<name>/{images,masks}            a full standalone dataset (Kvasir-SEG, CVC-ClinicDB,
                                                  ...) as published, for the cross-dataset splits
    ROOT/Sources/Kvasir-SEG/boxes.json            stem -> [[x0, y0, x1, y1], ...] from kavsir_bboxes.json
    ROOT/MANIFEST.sha256.csv                      path, sha256, bytes, width, height of every file
    ROOT/prepare_report.json                      counts, thresholded pixels, box checks, warnings
    ROOT/downloads/                               archives fetched by --download

PraNet's zips fill TrainDataset/TestDataset; standalone archives go to Sources/ and never into
TestDataset, because PraNet's test copies are the ones every published number was measured on.

Each SRC is a .zip or a folder (a folder may also hold several archives). What it is comes from
what it contains (folder pairs like images/+masks/, Original/+Ground Truth/, ETIS's p<N> mask names,
Kvasir-SEG's box file and file names, the image size), with folder names only as a fallback.

Why these formats: JPEG images are copied byte for byte (re-encoding would add a second loss);
TIFF/BMP images become PNG (lossless); PNG images are copied. Masks are always 8-bit PNG 0/255,
thresholded at > 127; Kvasir-SEG's masks are JPEGs whose artefacts this threshold decides, and the
number of pixels it had to decide is reported per set.

Runs are idempotent: a file whose bytes would not change is not rewritten (so its mtime stays);
``--force`` rewrites everything. Sources are only read.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from polypsam.data.files import STANDARD_TEST_SETS, find_pairs
from polypsam.data.io import IMAGE_EXTENSIONS, image_size, read_image, read_mask_report
from polypsam.errors import CheckpointError, DataError, PolypSamError

MANIFEST_NAME = "MANIFEST.sha256.csv"
REPORT_NAME = "prepare_report.json"
BOXES_NAME = "boxes.json"
BOX_TOLERANCE_PX = 2
CONNECT_TIMEOUT_S = 10.0

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
STANDALONE_NAMES = ("Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300", "ETIS-LaribPolypDB")


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
                  "a browser, save {file}, then run: python -m polypsam.data.prepare {file} --out {root}")
DOWNLOADS: dict[str, DatasetDownload] = {
    d.key: d for d in (
        DatasetDownload("kvasir-seg", "Kvasir-SEG", "https://datasets.simula.no/downloads/kvasir-seg.zip",
                        "kvasir-seg.zip",
                        manual="download {url} in a browser or with wget on a machine with internet access, "
                               "then run: python -m polypsam.data.prepare kvasir-seg.zip --out {root}"),
        DatasetDownload("pranet-train", "PraNet TrainDataset",
                        "https://drive.google.com/file/d/1lODorfB33jbd-im-qrtUgWnZXxB94F55/view", None,
                        manual=_PRANET_MANUAL.replace("{file}", "TrainDataset.zip")),
        DatasetDownload("pranet-test", "PraNet TestDataset",
                        "https://drive.google.com/file/d/1o8OfBvYE6K-EpDyvzsmMPndnUMwb540R/view", None,
                        manual=_PRANET_MANUAL.replace("{file}", "TestDataset.zip")),
    )
}

# Folder names seen in the releases and their common re-packagings, compared lower-case alphanumeric.
_IMAGE_DIRS = ("images", "image", "original", "originals", "imgs", "img", "frames")
_MASK_DIRS = ("masks", "mask", "groundtruth", "groundtruths", "gt", "gts", "labels", "label",
              "segmentation", "segmentations")
_NAME_HINTS = (("kvasir", "Kvasir-SEG"), ("clinicdb", "CVC-ClinicDB"), ("cvc612", "CVC-ClinicDB"),
               ("colondb", "CVC-ColonDB"), ("cvc300", "CVC-300"), ("etis", "ETIS-LaribPolypDB"))
_SIZE_HINTS = {(384, 288): "CVC-ClinicDB", (1225, 966): "ETIS-LaribPolypDB"}  # (width, height)
_KVASIR_STEM = re.compile(r"c[a-z0-9]{24}")
_ETIS_MASK = re.compile(r"p(\d+)")
_OTHER_ARCHIVES = (".rar", ".7z", ".tar", ".gz", ".tgz", ".bz2", ".xz")
_EXPECTED_LAYOUTS = ("TrainDataset/{images|image, masks|mask}, TestDataset/<name>/{images,masks}, "
                     "Kvasir-SEG/{images,masks} (+kavsir_bboxes.json), CVC-ClinicDB Original/ + Ground Truth/, "
                     "ETIS-LaribPolypDB/ + GroundTruth/p<N>.tif, or a folder named after the dataset "
                     "holding images/ + masks/")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- sources: a folder or a zip seen as a list of relative paths --------------------------------------

class _Tree:
    """Read-only view of one source; ``local`` gives a path that polypsam.data.io can open."""

    def __init__(self, path: Path, files: list[PurePosixPath], base_parts: tuple[str, ...]):
        self.path = path
        self.files = files
        self.base_parts = base_parts  # names above the tree root, for PraNet's TestDataset/<name> and hints
        self._zip: zipfile.ZipFile | None = None
        self._tmp: Path | None = None
        self._names: dict[PurePosixPath, str] = {}

    @classmethod
    def folder(cls, path: Path, files: list[PurePosixPath]) -> _Tree:
        return cls(path, files, tuple(p for p in path.resolve().parts[-2:] if p not in ("/", "")))

    @classmethod
    def archive(cls, path: Path, tmp: Path) -> _Tree:
        try:
            zf = zipfile.ZipFile(path)
            names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable zip archive ({e}); it is corrupt or truncated, "
                            "download it again") from None
        files = []
        for name in names:
            rel = PurePosixPath(name.replace("\\", "/"))
            if name.endswith("/") or _skip_name(rel):
                continue
            if rel.suffix.lower() in IMAGE_EXTENSIONS or rel.suffix.lower() == ".json":
                files.append(rel)
        tree = cls(path, sorted(files), (path.stem,))
        tree._zip, tree._tmp = zf, tmp
        tree._names = {PurePosixPath(n.replace("\\", "/")): n for n in names}
        return tree

    def display(self, rel: PurePosixPath | str) -> str:
        rel = str(rel)
        if self._zip is not None:
            return f"{self.path}:{rel}" if rel not in ("", ".") else str(self.path)
        return str(self.path / rel)

    def read(self, rel: PurePosixPath) -> bytes:
        if self._zip is None:
            return (self.path / rel).read_bytes()
        try:
            return self._zip.read(self._names[rel])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise DataError(f"{self.path}: corrupt zip archive, member {rel} cannot be read ({e}); "
                            "download the archive again") from None

    def local(self, rel: PurePosixPath, role: str) -> tuple[bytes, Path]:
        """The bytes and a readable path (zip members are written to a private temporary folder)."""
        data = self.read(rel)
        if self._zip is None:
            return data, self.path / rel
        dest = self._tmp / role / rel.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return data, dest

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _skip_name(rel: PurePosixPath) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)


def _looks_like_zip(path: Path) -> bool:
    """A .zip name or zip's leading signature: such a file that does not open is a corrupt download."""
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _open_sources(srcs: list[Path], root: Path, tmp: Path) -> tuple[list[_Tree], dict[Path, list[str]]]:
    """Trees for every SRC; folders are walked for data and for archives (told apart by content)."""
    trees: list[_Tree] = []
    others: dict[Path, list[str]] = {}
    root_res = root.resolve()
    for src in srcs:
        src = Path(src).expanduser()
        if not src.exists():
            raise DataError(f"{src}: no such file or folder; pass a dataset archive (.zip) or folder")
        res = src.resolve()
        for out in (root_res, root_res / "TrainDataset", root_res / "TestDataset", root_res / "Sources"):
            if res == out or (out != root_res and out in res.parents):
                raise DataError(f"{src}: this source is inside the output folder {root}; pass the original "
                                "archives or folders, or choose another --out")
        if src.is_file():
            if not zipfile.is_zipfile(src) and not _looks_like_zip(src):
                hint = " (unpack it first and pass the folder)" if src.suffix.lower() in _OTHER_ARCHIVES else ""
                raise DataError(f"{src}: not a zip archive{hint}; pass a dataset .zip or an extracted folder")
            trees.append(_Tree.archive(src, tmp / f"src{len(trees)}"))
            continue
        files: list[PurePosixPath] = []
        archives: list[Path] = []
        skipped: list[str] = []
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"
                                 and (here / d).resolve() != root_res)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = here / name
                suffix = p.suffix.lower()
                if suffix in IMAGE_EXTENSIONS or suffix == ".json":
                    files.append(PurePosixPath(p.relative_to(src).as_posix()))
                elif suffix == ".zip" or zipfile.is_zipfile(p) or _looks_like_zip(p):
                    archives.append(p)  # one that does not open is reported as corrupt
                elif suffix in _OTHER_ARCHIVES:
                    skipped.append(str(p.relative_to(src)))
        if files:
            trees.append(_Tree.folder(src, files))
        for a in archives:
            trees.append(_Tree.archive(a, tmp / f"src{len(trees)}"))
        others[src] = skipped
    return trees, others


# -- recognising datasets inside a tree ---------------------------------------------------------------

@dataclass
class _Found:
    out_rel: str  # "TrainDataset", "TestDataset/Kvasir", "Sources/Kvasir-SEG"
    kind: str  # train | test | source
    tree: _Tree
    folder: PurePosixPath
    pairs: list[tuple[PurePosixPath, PurePosixPath]]
    unpaired: list[str]
    boxes_json: PurePosixPath | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.tree.display(self.folder)


def _pair(images: list[PurePosixPath], masks: list[PurePosixPath], tree: _Tree):
    """Pairs by stem, also ETIS's p<N> and the ``_mask`` suffix some re-packagings add."""
    by_stem: dict[str, PurePosixPath] = {}
    for img in images:
        if img.stem in by_stem:
            raise DataError(f"{tree.display(img.parent)}: {by_stem[img.stem].name} and {img.name} share a stem, so "
                            "the pairing with masks is ambiguous; keep one of them")
        by_stem[img.stem] = img
    pairs: dict[str, tuple[PurePosixPath, PurePosixPath]] = {}
    lonely_masks = []
    for m in masks:
        s = m.stem
        candidates = [s, s[1:] if _ETIS_MASK.fullmatch(s) else None]
        candidates += [s[: -len(suf)] for suf in ("_mask", "-mask", "_gt", "_segmentation") if s.endswith(suf)]
        key = next((c for c in candidates if c and c in by_stem and c not in pairs), None)
        if key is None:
            lonely_masks.append(m.name)
        else:
            pairs[key] = (by_stem[key], m)
    lonely_images = [by_stem[s].name for s in sorted(set(by_stem) - set(pairs))]
    return [pairs[s] for s in sorted(pairs)], lonely_images + lonely_masks


def _identify(tree: _Tree, folder: PurePosixPath, images, masks, jsons) -> str | None:
    """A standalone set's name from its content first, then folder names, then the image size."""
    if jsons:
        return "Kvasir-SEG"
    if masks and sum(bool(_ETIS_MASK.fullmatch(m.stem)) for m in masks) > len(masks) / 2 \
            and not any(_ETIS_MASK.fullmatch(i.stem) for i in images):
        return "ETIS-LaribPolypDB"
    for part in reversed(tree.base_parts[-1:] + folder.parts):
        for key, name in _NAME_HINTS:
            if key in _norm(part):
                return name
    if sum(bool(_KVASIR_STEM.fullmatch(i.stem)) for i in images) > len(images) / 2:
        return "Kvasir-SEG"
    data = tree.read(images[0])
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _SIZE_HINTS.get(im.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # unreadable: the real read reports it with the file name


def _detect(tree: _Tree) -> list[_Found]:
    images_in: dict[PurePosixPath, list[PurePosixPath]] = {}
    jsons_in: dict[PurePosixPath, list[PurePosixPath]] = {}
    for rel in tree.files:
        target = jsons_in if rel.suffix.lower() == ".json" else images_in
        target.setdefault(rel.parent, []).append(rel)
    found = []
    for mask_dir in sorted(images_in):
        if _norm(mask_dir.name) not in _MASK_DIRS:
            continue
        parent = mask_dir.parent
        siblings = [d for d in images_in if d.parent == parent and d != mask_dir
                    and _norm(d.name) not in _MASK_DIRS]
        named = [d for d in siblings if _norm(d.name) in _IMAGE_DIRS]
        candidates = named or (siblings if len(siblings) == 1 else [])
        if not candidates:
            continue
        masks = images_in[mask_dir]
        mask_keys = {m.stem for m in masks} | {m.stem[1:] for m in masks}
        image_dir = max(candidates, key=lambda d: sum(i.stem in mask_keys for i in images_in[d]))
        images = images_in[image_dir]
        pairs, unpaired = _pair(images, masks, tree)
        if not pairs:
            raise DataError(f"{tree.display(parent)}: {image_dir.name}/ and {mask_dir.name}/ share no file names "
                            f"(e.g. {images[0].name} vs {masks[0].name}); images and masks pair by file stem "
                            "(ETIS: <N> with p<N>), rename them to match")
        full = tree.base_parts + parent.parts  # PurePosixPath(".").parts is ()
        here = full[-1] if full else ""
        if _norm(here) == "traindataset":
            out_rel, kind = "TrainDataset", "train"
        elif len(full) >= 2 and _norm(full[-2]) == "testdataset":
            out_rel, kind = f"TestDataset/{here}", "test"
        else:
            jsons = [j for j in jsons_in.get(parent, []) if "bbox" in j.name.lower()]
            name = _identify(tree, parent, images, masks, jsons)
            if name is None:
                w_h = ""
                try:
                    with Image.open(io.BytesIO(tree.read(images[0]))) as im:
                        w_h = f", images {im.size[0]}x{im.size[1]}"
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    w_h = ""
                raise DataError(
                    f"{tree.display(parent)}: found {image_dir.name}/ + {mask_dir.name}/ ({len(pairs)} pairs{w_h}) "
                    "but cannot tell which dataset it is; put it in a folder named after one of "
                    f"{', '.join(STANDALONE_NAMES)} and pass that folder")
            out_rel, kind = f"Sources/{name}", "source"
            found.append(_Found(out_rel, kind, tree, parent, pairs, unpaired, jsons[0] if jsons else None))
            continue
        found.append(_Found(out_rel, kind, tree, parent, pairs, unpaired))
    return found


def _describe(trees: list[_Tree]) -> str:
    dirs: dict[str, int] = {}
    for t in trees:
        for rel in t.files:
            key = t.display(rel.parent)
            dirs[key] = dirs.get(key, 0) + 1
    if not dirs:
        return "no image files"
    shown = [f"{d} ({n} files)" for d, n in sorted(dirs.items())[:8]]
    return "; ".join(shown) + (f"; ... ({len(dirs)} folders)" if len(dirs) > 8 else "")


def _one_per_set(found: list[_Found]) -> list[_Found]:
    """One copy per output set. Some re-packagings of CVC-ClinicDB hold the same images twice
    (TIF/ and PNG/); the TIFF originals are kept. Copies from different sources are an error."""
    kept: dict[str, _Found] = {}
    for f in found:
        other = kept.get(f.out_rel)
        if other is None:
            kept[f.out_rel] = f
            continue
        same = other.tree is f.tree and {i.stem for i, _ in other.pairs} == {i.stem for i, _ in f.pairs}
        if not same:
            raise DataError(f"{f.out_rel} found twice, in {other.origin} and {f.origin}; pass only one of them")
        first, second = sorted((other, f), key=lambda x: ("tif" not in _norm(str(x.folder)), str(x.folder)))
        first.notes.append(f"{f.out_rel}: the same images are also in {second.origin}; used {first.origin}")
        kept[f.out_rel] = first
    return list(kept.values())


# -- writing ------------------------------------------------------------------------------------------

@dataclass
class _Counts:
    written: int = 0
    removed: int = 0
    unchanged: int = 0


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _put(dest: Path, data: bytes, force: bool, counts: _Counts) -> str:
    """Write ``data`` unless ``dest`` already holds exactly these bytes; return their sha256."""
    digest = _sha256(data)
    if not force and dest.is_file() and dest.stat().st_size == len(data) and _sha256_file(dest) == digest:
        counts.unchanged += 1
        return digest
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"{dest}: cannot write ({e.strerror}); free disk space or choose another --out") from None
    counts.written += 1
    return digest


def _decode(fn, tree: _Tree, rel: PurePosixPath, path: Path):
    """polypsam.data.io's readers, with the temporary path replaced by the archive member's name."""
    try:
        return fn(path)
    except DataError as e:
        msg = str(e).replace(str(path), tree.display(rel))
        if tree._zip is not None:
            msg += " (inside the archive: download it again)"
        raise DataError(msg) from None


def _tight_box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


@dataclass
class _SetResult:
    out_rel: str
    kind: str
    origin: str
    thresholded: int = 0
    warnings: list[str] = field(default_factory=list)
    boxes: dict | None = None
    digests: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of what is on disk


def _write_set(found: _Found, root: Path, force: bool, counts: _Counts, progress) -> _SetResult:
    tree = found.tree
    out = root / found.out_rel
    res = _SetResult(found.out_rel, found.kind, found.origin, warnings=list(found.notes))
    if found.unpaired:
        res.warnings.append(f"{found.out_rel}: skipped {len(found.unpaired)} unpaired file(s) in {found.origin}: "
                            + ", ".join(found.unpaired[:10]) + (" ..." if len(found.unpaired) > 10 else ""))
    json_boxes: dict[str, list[list[float]]] | None = None
    json_sizes: dict[str, tuple[int, int]] = {}
    if found.boxes_json is not None:
        try:
            obj = json.loads(tree.read(found.boxes_json))
        except ValueError as e:
            raise DataError(f"{tree.display(found.boxes_json)}: not valid JSON ({e}); download the dataset again") \
                from None
        json_boxes, json_sizes = _parse_boxes(obj, tree.display(found.boxes_json))
    tight: dict[str, list[int] | None] = {}
    sizes: dict[str, tuple[int, int]] = {}
    wanted: dict[str, set[str]] = {"images": set(), "masks": set()}
    task = progress.add_task(found.out_rel, total=len(found.pairs))
    for img_rel, mask_rel in found.pairs:
        stem = img_rel.stem
        data, path = tree.local(img_rel, "image")
        rgb = _decode(read_image, tree, img_rel, path)
        with Image.open(path) as im:
            fmt = im.format
        if fmt == "JPEG":
            name, payload = stem + ".jpg", data
        elif fmt == "PNG":
            name, payload = stem + ".png", data
        else:
            name, payload = stem + ".png", _png(rgb)
        _, mpath = tree.local(mask_rel, "mask")
        mr = _decode(read_mask_report, tree, mask_rel, mpath)
        if mr.mask.shape != rgb.shape[:2]:
            raise DataError(f"{tree.display(mask_rel)}: mask is {mr.mask.shape[1]}x{mr.mask.shape[0]} but its image "
                            f"{tree.display(img_rel)} is {rgb.shape[1]}x{rgb.shape[0]}; fix or remove the pair")
        res.thresholded += mr.nonbinary_pixels
        res.digests[f"{found.out_rel}/images/{name}"] = _put(out / "images" / name, payload, force, counts)
        res.digests[f"{found.out_rel}/masks/{stem}.png"] = _put(
            out / "masks" / f"{stem}.png", _png(mr.mask.astype(np.uint8) * 255), force, counts)
        wanted["images"].add(name)
        wanted["masks"].add(stem + ".png")
        if json_boxes is not None:
            tight[stem] = _tight_box(mr.mask)
            sizes[stem] = rgb.shape[:2]
        progress.advance(task)
    # Files this run did not produce: another format of the same stem would break pairing, so it goes;
    # anything else is only removed with --force (it may be the user's own addition).
    for sub in ("images", "masks"):
        folder = out / sub
        if not folder.is_dir():
            continue
        stems = {Path(n).stem for n in wanted[sub]}
        stale = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file() or p.name in wanted[sub]:
                continue
            if p.stem in stems or force:
                p.unlink()
                counts.removed += 1
            else:
                stale.append(p.name)
        if stale:
            res.warnings.append(f"{found.out_rel}/{sub}: {len(stale)} file(s) not in {found.origin} left in place ("
                                + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
                                + "); remove them or rerun with --force")
    if json_boxes is not None:
        res.boxes = _box_stats(json_boxes, json_sizes, tight, sizes)
        kept = {s: [[_num(v) for v in b] for b in json_boxes[s]] for s in sorted(json_boxes) if s in tight}
        text = "{\n" + ",\n".join(f"{json.dumps(s)}: {json.dumps(b)}" for s, b in kept.items()) + "\n}\n"
        res.digests[f"{found.out_rel}/{BOXES_NAME}"] = _put(out / BOXES_NAME, text.encode(), force, counts)
    return res


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


# -- Kvasir-SEG boxes ---------------------------------------------------------------------------------

def _parse_boxes(obj, where: str) -> tuple[dict[str, list[list[float]]], dict[str, tuple[int, int]]]:
    """Boxes from either Kvasir-SEG's kavsir_bboxes.json or our boxes.json, plus the json's (h, w)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object mapping image stem to boxes")
    boxes: dict[str, list[list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for stem, entry in obj.items():
        try:
            if isinstance(entry, dict):
                raw = [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in entry.get("bbox", [])]
                if "height" in entry and "width" in entry:
                    sizes[stem] = (int(entry["height"]), int(entry["width"]))
            else:
                raw = list(entry)
            boxes[stem] = [[float(v) for v in b] for b in raw]
            if any(len(b) != 4 for b in boxes[stem]):
                raise ValueError("a box needs 4 numbers")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: entry {stem!r} is not a list of boxes ({e}); expected "
                            '{"<stem>": {"bbox": [{"xmin":..,"ymin":..,"xmax":..,"ymax":..}]}} or '
                            '{"<stem>": [[x0, y0, x1, y1], ...]}') from None
    return boxes, sizes


def load_kvasir_boxes(path: str | Path) -> dict[str, list[list[float]]]:
    """stem -> [[x0, y0, x1, y1], ...] in original-image pixels, from boxes.json or kavsir_bboxes.json."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; run python -m polypsam.data.prepare on the Kvasir-SEG zip") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); rerun python -m polypsam.data.prepare") from None
    return _parse_boxes(obj, str(path))[0]


def _box_stats(json_boxes, json_sizes, tight, sizes) -> dict:
    """How far the published boxes are from the tight box around all of each mask's foreground."""
    compared, differ, multi, empty, missing, size_mismatch = 0, [], [], [], [], []
    for stem in sorted(tight):
        boxes = json_boxes.get(stem)
        if not boxes:
            missing.append(stem)
            continue
        if len(boxes) > 1:
            multi.append(stem)
        if stem in json_sizes and json_sizes[stem] != sizes[stem]:
            size_mismatch.append(stem)
        t = tight[stem]
        if t is None:
            empty.append(stem)
            continue
        union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                 max(b[3] for b in boxes)]
        compared += 1
        worst = max(abs(a - b) for a, b in zip(union, t))
        if worst > BOX_TOLERANCE_PX:
            differ.append({"stem": stem, "json": [_num(v) for v in union], "mask": t, "max_diff_px": _num(worst)})
    return {
        "tolerance_px": BOX_TOLERANCE_PX,
        "compared": compared,
        "differ": len(differ),
        "differ_fraction": round(len(differ) / compared, 4) if compared else None,
        "multi_box": len(multi),
        "multi_box_stems": multi,
        "empty_masks": empty,
        "missing_in_json": missing,
        "json_size_mismatch": size_mismatch,
        "differing": differ,
    }


# -- checks, manifest, report -------------------------------------------------------------------------

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


def _check_set(root: Path, rel: str) -> tuple[int, list[str]]:
    """(pairs, problems) for one output set: pairing, equal sizes, masks strictly 0/255."""
    folder = root / rel
    try:
        pairs = find_pairs(folder / "images", folder / "masks")
    except DataError as e:
        return 0, [_one_line(e)]
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
            problems.append(_one_line(e))
    return len(pairs), problems


def _manifest(root: Path, rels: list[str], known: dict[str, str]) -> bytes:
    rows = []
    for rel in rels:
        for p in sorted((root / rel).rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            r = p.relative_to(root).as_posix()
            digest = known.get(r) or _sha256_file(p)
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


def _load_report(root: Path) -> dict:
    try:
        obj = json.loads((root / REPORT_NAME).read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


# -- download -----------------------------------------------------------------------------------------

def _first_clause(message: str) -> str:
    cut = [i for i in (message.find("; "), message.find(". ")) if i >= 0]
    return message[: min(cut)] if cut else message


def _fetch(entry: DatasetDownload, url: str, directory: Path, timeout: float) -> dict:
    """Fetch one archive with polypsam.weights' resumable transfer (``.part`` + HTTP Range)."""
    from polypsam import weights

    final = directory / entry.filename
    manual = entry.manual.format(url=url, root=shlex.quote(str(directory.parent)))
    spec = weights.CheckpointSpec(entry.key, entry.filename, entry.sha256 or "", entry.size, url)
    try:
        if entry.sha256:
            weights.download(spec, directory, progress=True, timeout=timeout)
            digest = entry.sha256
        elif final.is_file():  # only a finished transfer is moved into place
            digest = _sha256_file(final)
        else:
            # weights.download insists on a known sha256; Kvasir-SEG publishes none, so the same transfer
            # is used and the digest obtained is recorded instead of checked.
            directory.mkdir(parents=True, exist_ok=True)
            part = final.with_name(final.name + weights.PART_SUFFIX)
            for attempt in range(2):
                try:
                    hasher = weights._transfer(spec, part, directory, True, timeout)
                    break
                except weights._Restart:
                    if attempt:
                        raise DataError(f"{url} refuses to resume {part}; delete it and rerun") from None
            if entry.size is not None and part.stat().st_size != entry.size:
                part.unlink()
                raise DataError(f"{url}: got a file of the wrong size (expected {entry.size} bytes) and deleted it; "
                                f"rerun, or {manual}")
            digest = hasher.hexdigest()
            os.replace(part, final)
    except CheckpointError as e:
        raise DataError(f"{entry.name}: download from {url} failed ({_first_clause(str(e))}); rerun to retry "
                        f"(a partial download is resumed), or {manual}") from None
    except OSError as e:
        raise DataError(f"{entry.name}: cannot download {url} into {directory} ({e}); {manual}") from None
    return {"url": url, "file": f"downloads/{entry.filename}", "sha256": digest, "bytes": final.stat().st_size,
            "verified": bool(entry.sha256)}


# -- the whole run ------------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    report: dict
    written: int  # data files, manifest, report and boxes written this run
    removed: int
    ok: bool  # every set passed the checks (count differences are only warnings)


def prepare(sources: list[str | Path], root: str | Path, *, download: bool = False, force: bool = False,
            urls: dict[str, str] | None = None, console=None) -> PrepareResult:
    """Build ROOT from ``sources``; see the module docstring. Raises DataError on unusable input."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

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
    previous = _load_report(root)
    downloads = dict(previous.get("downloads") or {})
    if download:
        # Manual steps first, so that they are shown even when a fetch below fails.
        for key, entry in sorted(DOWNLOADS.items(), key=lambda kv: kv[1].filename is not None):
            url = urls.get(key, entry.url)
            if entry.filename is None:
                console.print(f"[yellow]{entry.name}[/]: cannot be fetched automatically. "
                              + entry.manual.format(url=url, root=shlex.quote(str(root))), soft_wrap=True)
                continue
            console.print(f"downloading {entry.name} from {url}", soft_wrap=True)
            downloads[key] = _fetch(entry, url, root / "downloads", CONNECT_TIMEOUT_S)
            srcs.append(root / downloads[key]["file"])
    if not srcs:
        raise DataError("no SRC given; pass dataset archives or folders (or --download)")

    counts = _Counts()
    results: dict[str, _SetResult] = {}
    with tempfile.TemporaryDirectory(prefix="polypsam-prepare-") as tmp:
        trees, skipped_archives = _open_sources(srcs, root, Path(tmp))
        try:
            found: list[_Found] = []
            for src in srcs:
                src_res = Path(src).resolve()
                mine = [t for t in trees if t.path.resolve() == src_res or src_res in t.path.resolve().parents]
                got = [f for t in mine for f in _detect(t)]
                if not got:
                    extra = skipped_archives.get(src) or []
                    extra_txt = f"; archives it cannot open: {', '.join(extra[:5])} (unpack them first)" if extra else ""
                    raise DataError(f"{src}: no polyp dataset recognised (found: {_describe(mine)}"
                                    f"{extra_txt}); expected one of {_EXPECTED_LAYOUTS}")
                found += got
            found = _one_per_set(found)
            root.mkdir(parents=True, exist_ok=True)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=console, transient=True) as progress:
                for f in found:
                    results[f.out_rel] = _write_set(f, root, force, counts, progress)
        finally:
            for t in trees:
                t.close()

    # Report the whole ROOT, not only what this run touched: earlier runs' sets keep their entries.
    old_sets = previous.get("sets") if isinstance(previous.get("sets"), dict) else {}
    sets: dict[str, dict] = {}
    known_digests: dict[str, str] = {}
    warnings: list[str] = []
    ok = True
    rels = _sets_on_disk(root)
    for rel in rels:
        res = results.get(rel)
        old = old_sets.get(rel) if isinstance(old_sets.get(rel), dict) else {}
        n, problems = _check_set(root, rel)
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
        if res and res.boxes is not None:
            entry["kvasir_boxes"] = res.boxes
        elif not res and "kvasir_boxes" in old:
            entry["kvasir_boxes"] = old["kvasir_boxes"]
        sets[rel] = entry
        warnings += set_warnings + [f"{rel}: {p}" for p in problems[:5]]
        if res:
            known_digests.update(res.digests)

    manifest = _manifest(root, rels, known_digests)
    _put(root / MANIFEST_NAME, manifest, force, counts)
    report = {
        "layout": {"train": "TrainDataset", "test": "TestDataset/<name>", "sources": "Sources/<name>"},
        "mask_threshold": "> 127",
        "sets": sets,
        "downloads": downloads,
        "warnings": warnings,
        "manifest": MANIFEST_NAME,
        "manifest_sha256": _sha256(manifest),
    }
    _put(root / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode(), force, counts)

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
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    changes = counts.written + counts.removed
    console.print("nothing changed" if changes == 0 else
                  f"{counts.written} file(s) written, {counts.removed} removed, {counts.unchanged} unchanged",
                  soft_wrap=True)
    return PrepareResult(report, counts.written, counts.removed, ok)


def _parse_url(value: str) -> tuple[str, str]:
    key, sep, url = value.partition("=")
    if not sep or not url:
        raise argparse.ArgumentTypeError(f"expected KEY=URL with KEY one of {', '.join(DOWNLOADS)}")
    return key, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polypsam.data.prepare",
        description="Turn the official polyp archives or folders into polypsam's PraNet layout.")
    parser.add_argument("sources", nargs="*", metavar="SRC", help="dataset .zip archives or folders")
    parser.add_argument("--out", required=True, metavar="ROOT", help="output folder (the data root)")
    parser.add_argument("--download", action="store_true",
                        help="fetch the archives with a known URL into ROOT/downloads (resumable); "
                             "print the manual steps for the others")
    parser.add_argument("--force", action="store_true", help="rewrite every file, and remove files not from SRC")
    parser.add_argument("--url", action="append", type=_parse_url, default=[], metavar="KEY=URL",
                        help=f"another address for a download ({', '.join(DOWNLOADS)}), e.g. a mirror")
    args = parser.parse_args(argv)
    try:
        result = prepare(args.sources, args.out, download=args.download, force=args.force, urls=dict(args.url))
    except PolypSamError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (finished files are kept)", file=sys.stderr)
        return 130
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
