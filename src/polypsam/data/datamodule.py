"""PraNet-layout data for Lightning: seeded split, skipped-and-counted empty masks, test sets by name."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from polypsam.data.dataset import BoxPrompt, PolypDataset, Record, collate
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs, find_test_sets
from polypsam.data.image_cache import ImageCache
from polypsam.data.io import image_size as header_size
from polypsam.data.io import read_mask_report
from polypsam.data.splits import make_split, read_split, write_split
from polypsam.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _records(root: Path, folder: str) -> list[Record]:
    d = root / folder
    pairs = find_pairs(d / "images", d / "masks")
    source = Path(folder).name
    return [Record(p.image, p.mask, p.stem, source, p.image.relative_to(root).as_posix()) for p in pairs]


def _subsample(items: list[str], limit: int | None, seed: int) -> list[str]:
    if limit is None or limit >= len(items):
        return items
    keep = np.random.default_rng(seed).permutation(len(items))[:limit]
    return sorted(items[i] for i in keep)


class PolypDataModule(L.LightningDataModule):
    """Train/val from ``train_dirs`` (80/20, seeded, written to ``split.json``), tests from ``TestDataset``."""

    def __init__(self, root: str, train_dirs: Sequence[str] = ("TrainDataset",), test_sets: Sequence[str] | None = None,
                 val_fraction: float = 0.2, split_seed: int = 42, split_file: str | None = None,
                 output_dir: str | None = None, image_size: int = 1024, batch_size: int = 4,
                 eval_batch_size: int | None = None, num_workers: int = 2, box: dict | None = None,
                 augment: list | None = None, limit_train: int | None = None, limit_val: int | None = None,
                 limit_test: int | None = None, embedding_cache: EmbeddingCache | None = None,
                 pin_memory: bool = False, resize_method: str = "pil_bilinear",
                 image_cache: ImageCache | None = None):
        super().__init__()
        self.root = Path(root).expanduser()
        self.train_dirs = list(train_dirs)
        self.test_set_names = list(test_sets) if test_sets else None
        self.val_fraction, self.split_seed, self.split_file = val_fraction, split_seed, split_file
        self.output_dir = Path(output_dir) if output_dir else None
        self.image_size = image_size
        self.resize_method = resize_method  # follows the model (ModelSpec.resize_method)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.box = BoxPrompt(**(box or {}))
        # validation and test always prompt with un-jittered boxes of the same mode
        self.eval_box = BoxPrompt(mode=self.box.mode, min_component_area=self.box.min_component_area)
        self.augment = None
        if augment:
            import albumentations as A

            self.augment = A.Compose(list(augment), seed=split_seed)
        if self.augment is not None and embedding_cache is not None:
            raise ConfigError("data.augment and the embedding cache are mutually exclusive: a cached embedding "
                              "is of the unaugmented image. Turn one off (data.augment=null or "
                              "data.embedding_cache.enabled=false).")
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.embedding_cache = embedding_cache
        self.image_cache = image_cache  # bypassed by PolypDataset for the augmented training set
        self.pin_memory = pin_memory
        self.report: dict = {}
        self.train_set = self.val_set = None
        self.test_sets: dict[str, PolypDataset] = {}

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root does not exist; set data.root to a folder in PraNet's layout "
                            "(TrainDataset/{images,masks}, TestDataset/<name>/{images,masks}).")
        if stage in ("fit", "validate", None) and self.train_set is None:
            self._setup_fit()
        if stage in ("test", "predict", None) and not self.test_sets:
            self._setup_test()

    def _setup_fit(self) -> None:
        records = [r for d in self.train_dirs for r in _records(self.root, d)]
        by_rel = {r.relpath: r for r in records}
        if self.split_file:
            split = read_split(self.split_file, set(by_rel))
        else:
            split = make_split(list(by_rel), self.val_fraction, self.split_seed)
        meta = dict(seed=self.split_seed, val_fraction=self.val_fraction, root=str(self.root.resolve()),
                    train_dirs=self.train_dirs, source=str(self.split_file) if self.split_file else "generated")
        if self.output_dir is not None:
            write_split(self.output_dir / "split.json", split, **meta)
        sets = {}
        for part in ("train", "val"):
            chosen = _subsample(split[part], self.limits[part], self.split_seed + 1)
            recs, skipped = self._checked([by_rel[p] for p in chosen])
            self.report[part] = {"images": len(chosen), "used": len(recs), "skipped_empty_mask": skipped,
                                 "masks_thresholded": dict(self._thresholded)}
            if skipped:
                log.warning("%d %s images have an empty mask and give no box prompt: skipped (listed in "
                            "data_report.json)", len(skipped), part)
            if not recs:
                raise DataError(f"{self.root}: no usable {part} images (all {len(chosen)} masks are empty).")
            sets[part] = recs
        self.train_set = PolypDataset(sets["train"], self.image_size, self.box, train=True,
                                      augment=self.augment, embedding_cache=self.embedding_cache,
                                      resize_method=self.resize_method, image_cache=self.image_cache)
        self.val_set = PolypDataset(sets["val"], self.image_size, self.eval_box,
                                    embedding_cache=self.embedding_cache, resize_method=self.resize_method,
                                    image_cache=self.image_cache)
        self._write_report()

    def _checked(self, recs: list[Record]) -> tuple[list[Record], list[str]]:
        """Check sizes from file headers, drop empty masks (counted), key images for the cache."""
        keep, skipped = [], []
        self._thresholded = {}
        for r in recs:
            rep = read_mask_report(r.mask)
            mask = rep.mask
            if rep.nonbinary_pixels:  # values other than 0/255: thresholded at 127, reported
                self._thresholded[r.relpath] = rep.nonbinary_pixels
            ih = header_size(r.image)
            if ih != mask.shape:
                raise DataError(f"{r.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {r.image} is "
                                f"{ih[1]}x{ih[0]}; masks must have their image's size.")
            if not mask.any():
                skipped.append(r.relpath)
                continue
            if self.embedding_cache is not None or self.image_cache is not None:
                r.key = file_digest(r.image)
            keep.append(r)
        return keep, skipped

    def _setup_test(self) -> None:
        found = find_test_sets(self.root)
        names = self.test_set_names or list(found)
        unknown = [n for n in names if n not in found]
        if unknown:
            raise DataError(f"{self.root / 'TestDataset'}: test sets {unknown} not found; present: {list(found)}.")
        for n in names:
            recs = _records(self.root, f"TestDataset/{n}")
            chosen = {r.relpath for r in recs}
            chosen = set(_subsample(sorted(chosen), self.limits["test"], self.split_seed + 2))
            recs = [r for r in recs if r.relpath in chosen]
            if self.embedding_cache is not None or self.image_cache is not None:
                for r in recs:
                    r.key = file_digest(r.image)
            self.test_sets[n] = PolypDataset(recs, self.image_size, self.eval_box,
                                             embedding_cache=self.embedding_cache,
                                             resize_method=self.resize_method, image_cache=self.image_cache)

    def _write_report(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "data_report.json").write_text(json.dumps(self.report, indent=1))

    # -- loaders ------------------------------------------------------------------------------------
    def _loader(self, ds, batch_size, shuffle):
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self):
        return [self._loader(ds, self.eval_batch_size, False) for ds in self.test_sets.values()]
