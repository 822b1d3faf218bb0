"""Recognising the datasets inside a source, and which output set each one fills.

An images folder next to a masks folder is a set. Under ``TrainDataset/`` or ``TestDataset/<name>/``
it is PraNet's split and keeps that place; anywhere else it is a standalone release (Kvasir-SEG,
CVC-ClinicDB, ...) bound for ``Sources/<name>``, named from its content first (Kvasir-SEG's box file
and file names, ETIS's p<N> masks), then folder names, then the image size.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from polypsam.curation.prepare.sources import Tree, describe
from polypsam.errors import DataError

STANDALONE_NAMES = ("Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300", "ETIS-LaribPolypDB")

# Folder names seen in the releases and their common re-packagings, compared lower-case alphanumeric.
_IMAGE_DIRS = ("images", "image", "original", "originals", "imgs", "img", "frames")
_MASK_DIRS = ("masks", "mask", "groundtruth", "groundtruths", "gt", "gts", "labels", "label",
              "segmentation", "segmentations")
_NAME_HINTS = (("kvasir", "Kvasir-SEG"), ("clinicdb", "CVC-ClinicDB"), ("cvc612", "CVC-ClinicDB"),
               ("colondb", "CVC-ColonDB"), ("cvc300", "CVC-300"), ("etis", "ETIS-LaribPolypDB"))
_SIZE_HINTS = {(384, 288): "CVC-ClinicDB", (1225, 966): "ETIS-LaribPolypDB"}  # (width, height)
_KVASIR_STEM = re.compile(r"c[a-z0-9]{24}")
_ETIS_MASK = re.compile(r"p(\d+)")
_EXPECTED_LAYOUTS = ("TrainDataset/{images|image, masks|mask}, TestDataset/<name>/{images,masks}, "
                     "Kvasir-SEG/{images,masks} (+kavsir_bboxes.json), CVC-ClinicDB Original/ + Ground Truth/, "
                     "ETIS-LaribPolypDB/ + GroundTruth/p<N>.tif, or a folder named after the dataset "
                     "holding images/ + masks/")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass
class Found:
    """One recognised set: its pairs inside ``tree`` and where they go under ROOT."""

    out_rel: str  # "TrainDataset", "TestDataset/Kvasir", "Sources/Kvasir-SEG"
    kind: str  # train | test | source
    tree: Tree
    folder: PurePosixPath
    pairs: list[tuple[PurePosixPath, PurePosixPath]]
    unpaired: list[str]
    boxes_json: PurePosixPath | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.tree.display(self.folder)


def _pair(images: list[PurePosixPath], masks: list[PurePosixPath], tree: Tree):
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


def _image_size(tree: Tree, rel: PurePosixPath) -> tuple[int, int] | None:
    """(width, height), or None when undecodable: the real read reports that with the file name."""
    data = tree.read(rel)  # a corrupt archive member is an error here already
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _identify(tree: Tree, folder: PurePosixPath, images, masks, jsons) -> str | None:
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
    return _SIZE_HINTS.get(_image_size(tree, images[0]))


def _detect(tree: Tree) -> list[Found]:
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
                size = _image_size(tree, images[0])
                w_h = f", images {size[0]}x{size[1]}" if size else ""
                raise DataError(
                    f"{tree.display(parent)}: found {image_dir.name}/ + {mask_dir.name}/ ({len(pairs)} pairs{w_h}) "
                    "but cannot tell which dataset it is; put it in a folder named after one of "
                    f"{', '.join(STANDALONE_NAMES)} and pass that folder")
            out_rel, kind = f"Sources/{name}", "source"
            found.append(Found(out_rel, kind, tree, parent, pairs, unpaired, jsons[0] if jsons else None))
            continue
        found.append(Found(out_rel, kind, tree, parent, pairs, unpaired))
    return found


def _one_per_set(found: list[Found]) -> list[Found]:
    """One copy per output set. Some re-packagings of CVC-ClinicDB hold the same images twice
    (TIF/ and PNG/); the TIFF originals are kept. Copies from different sources are an error."""
    kept: dict[str, Found] = {}
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


def detect_sets(srcs: list[Path], trees: list[Tree], skipped_archives: dict[Path, list[str]]) -> list[Found]:
    """Every set in the sources, one per output set; a SRC in which none is recognised is an error."""
    found: list[Found] = []
    for src in srcs:
        src_res = Path(src).resolve()
        mine = [t for t in trees if t.path.resolve() == src_res or src_res in t.path.resolve().parents]
        got = [f for t in mine for f in _detect(t)]
        if not got:
            extra = skipped_archives.get(src) or []
            extra_txt = f"; archives it cannot open: {', '.join(extra[:5])} (unpack them first)" if extra else ""
            raise DataError(f"{src}: no polyp dataset recognised (found: {describe(mine)}"
                            f"{extra_txt}); expected one of {_EXPECTED_LAYOUTS}")
        found += got
    return _one_per_set(found)
