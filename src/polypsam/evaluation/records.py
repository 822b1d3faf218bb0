"""The test images an evaluation scores, found as a training run's data module lists them and checked before
any model work: mask sizes, unreadable images, sets whose masks are all empty."""

from __future__ import annotations

from pathlib import Path

from polypsam.data.datamodule import PolypDataModule
from polypsam.data.dataset import Record
from polypsam.data.demo import generate_demo_dataset
from polypsam.data.io import image_size as header_size
from polypsam.data.io import require_foreground, size_mismatch
from polypsam.errors import DataError


def collect_records(root: str | Path, test_sets, limit_test, split_seed: int, generate_demo: bool = False
                    ) -> dict[str, list[Record]]:
    """Every TestDataset folder (paper order first), a seeded subset with ``limit_test``: the same records
    that a training run's data module lists."""
    if generate_demo:
        generate_demo_dataset(root)
    dm = PolypDataModule(root=str(root), test_sets=list(test_sets) if test_sets else None,
                         limit_test=limit_test, split_seed=split_seed, num_workers=0)
    dm.setup("test")
    if not dm.test_sets:
        raise DataError(f"{Path(root) / 'TestDataset'}: no test sets found; expected "
                        "TestDataset/<name>/{images,masks} under data.root (python -m polypsam.curation.prepare "
                        "builds this layout).")
    return {name: ds.records for name, ds in dm.test_sets.items()}


def checked_test_records(root: str | Path, test_sets=None, limit_test: int | None = None, split_seed: int = 42,
                         generate_demo: bool = False) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """The test records (:func:`collect_records`) and the images known unreadable, once the checks that need
    no model passed: mask sizes, and a set whose masks are all empty (``require_foreground``, about one
    decode per set). Run before any number is computed, and by training before it fits."""
    record_sets = collect_records(root, test_sets, limit_test, split_seed, generate_demo)
    unreadable: dict[str, str] = {}
    for name, recs in record_sets.items():
        unreadable.update(check_sizes(recs))
        require_foreground(f"test set {name}", [r.mask for r in recs])
    return record_sets, unreadable


def check_sizes(records: list[Record]) -> dict[str, str]:
    """Header check before any model work: a mask of another size is an error, an unreadable image noted."""
    unreadable = {}
    for r in records:
        mh = header_size(r.mask)  # an unreadable mask is an error: without ground truth nothing is scored
        try:
            ih = header_size(r.image)
        except DataError as exc:
            unreadable[str(r.image)] = str(exc)
            continue
        if ih != mh:
            raise size_mismatch(r.mask, mh, r.image, ih)
    return unreadable
