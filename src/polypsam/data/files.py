"""Pairing images with masks by file stem, PraNet layout discovery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polypsam.data.io import IMAGE_EXTENSIONS
from polypsam.errors import DataError

# The paper orders its tables this way; other folders under TestDataset follow alphabetically.
STANDARD_TEST_SETS = ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300", "ETIS-LaribPolypDB")


@dataclass(frozen=True)
class ImageMaskPair:
    image: Path
    mask: Path

    @property
    def stem(self) -> str:
        return self.image.stem


def _by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    dupes: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in files:
            dupes.append(f"{files[p.stem].name} / {p.name}")
            continue
        files[p.stem] = p
    if dupes:
        raise DataError(f"{folder}: several files share a stem, so the pairing is ambiguous: "
                        f"{', '.join(dupes[:10])}{' ...' if len(dupes) > 10 else ''}. Keep one file per stem.")
    return files


def find_pairs(images_dir: str | Path, masks_dir: str | Path) -> list[ImageMaskPair]:
    """Every image with its mask, sorted by stem; unpaired files are an error that lists them."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not d.is_dir():
            raise DataError(f"{d}: the {what} folder does not exist. Expected PraNet's layout "
                            "<root>/TrainDataset/{images,masks} and <root>/TestDataset/<name>/{images,masks}; "
                            "set data.root to such a folder (python -m polypsam.curation.prepare builds one).")
    images, masks = _by_stem(images_dir), _by_stem(masks_dir)
    if not images:
        raise DataError(f"{images_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        lines = [f"{images_dir.parent}: unpaired files (images and masks pair by file stem):"]
        if lonely_images:
            lines.append(f"images without a mask in {masks_dir}: "
                         + ", ".join(images[s].name for s in lonely_images[:20])
                         + (f" ... ({len(lonely_images)} in all)" if len(lonely_images) > 20 else ""))
        if lonely_masks:
            lines.append(f"masks without an image in {images_dir}: "
                         + ", ".join(masks[s].name for s in lonely_masks[:20])
                         + (f" ... ({len(lonely_masks)} in all)" if len(lonely_masks) > 20 else ""))
        lines.append("Add the missing partners or remove the extra files.")
        raise DataError(" ".join(lines))
    return [ImageMaskPair(images[s], masks[s]) for s in sorted(images)]


def find_test_sets(root: str | Path) -> dict[str, Path]:
    """TestDataset/<name> folders, the paper's five first in the paper's order."""
    test_root = Path(root) / "TestDataset"
    if not test_root.is_dir():
        return {}
    found = {p.name: p for p in test_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ordered = [n for n in STANDARD_TEST_SETS if n in found]
    ordered += sorted(n for n in found if n not in STANDARD_TEST_SETS)
    return {n: found[n] for n in ordered}
