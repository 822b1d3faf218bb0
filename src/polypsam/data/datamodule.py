"""PraNet-layout data for Lightning: seeded split, skipped-and-counted empty masks, test sets by name."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from polypsam.data.batch import collate
from polypsam.data.checks import PairCheck, check_pairs
from polypsam.data.dataset import PolypDataset, Record
from polypsam.data.embedding_cache import EmbeddingCache, file_digest
from polypsam.data.files import find_pairs, find_test_sets
from polypsam.data.image_cache import ImageCache
from polypsam.data.sampler import EpochShuffleSampler
from polypsam.data.splits import make_split, read_split, write_split
from polypsam.devices import processes_per_node, resolve_num_workers
from polypsam.errors import ConfigError, DataError
from polypsam.prompts import PromptType, build_prompt

log = logging.getLogger(__name__)


def folder_records(root: Path, folder: str) -> list[Record]:
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
                 eval_batch_size: int | None = None, num_workers: int | str = 2, prompt: PromptType | dict | None = None,
                 augment: list | None = None, limit_train: int | None = None, limit_val: int | None = None,
                 limit_test: int | None = None, embedding_cache: EmbeddingCache | None = None,
                 pin_memory: bool = False, resize_method: str = "pil_bilinear",
                 image_cache: ImageCache | None = None, check_cache: str | None = None,
                 speck_report: Callable[[list[Path], Path], dict] | None = None):
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
        if not isinstance(num_workers, int):  # auto: polypsam.config.resolve_num_workers
            num_workers = resolve_num_workers(num_workers, processes=processes_per_node())
        self.num_workers = num_workers
        # every train/val image is decoded before fit; what passed is remembered here (None: not remembered)
        self.check_cache = check_cache
        # masks whose literal tight box a speck stretches, in data_report.json: polypsam.curation.specks's
        # report, handed in by the composition root (polypsam.config); None leaves it out
        self.speck_report = speck_report
        self._verified: dict[str, PairCheck] = {}
        # training draws prompt noise; validation and test prompt the same type without it (PolypDataset)
        self.prompt = prompt if isinstance(prompt, PromptType) else build_prompt(prompt)
        self.augment = None
        if augment:
            import albumentations as A  # imported only to augment: it is slow to import

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
        self._train_sampler: EpochShuffleSampler | None = None  # the training order, see train_dataloader
        self._resume_position: tuple[int, int] | None = None  # (epoch, samples per rank) from a checkpoint

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
        records = [r for d in self.train_dirs for r in folder_records(self.root, d)]
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
        chosen_by_part = {part: _subsample(split[part], self.limits[part], self.split_seed + 1)
                          for part in ("train", "val")}
        self._verify([by_rel[p] for part in ("train", "val") for p in chosen_by_part[part]])
        for part in ("train", "val"):
            chosen = chosen_by_part[part]
            recs, skipped = self._checked([by_rel[p] for p in chosen])
            self.report[part] = {"images": len(chosen), "used": len(recs), "skipped_empty_mask": skipped,
                                 "masks_thresholded": dict(self._thresholded)}
            if self.output_dir is not None and self.speck_report is not None:
                self.report[part]["specks"] = self.speck_report([r.mask for r in recs], self.root)
            if skipped:
                log.warning("%d %s images have an empty mask and give no prompt: skipped (listed in "
                            "data_report.json)", len(skipped), part)
            if not recs:
                raise DataError(f"{self.root}: no usable {part} images (all {len(chosen)} masks are empty).")
            sets[part] = recs
        self.train_set = PolypDataset(sets["train"], self.image_size, self.prompt, train=True,
                                      augment=self.augment, embedding_cache=self.embedding_cache,
                                      resize_method=self.resize_method, image_cache=self.image_cache)
        self.val_set = PolypDataset(sets["val"], self.image_size, self.prompt,
                                    embedding_cache=self.embedding_cache, resize_method=self.resize_method,
                                    image_cache=self.image_cache, original_masks=True)
        self._write_report()

    def _verify(self, recs: list[Record]) -> None:
        """Decode every image and mask not yet known good (a rich progress bar on rank 0), check mask sizes.

        A bad file is a DataError naming it, raised here: before the first training step, not mid-epoch.
        """
        todo = [r for r in recs if r.relpath not in self._verified]
        if not todo:
            return
        rank0 = getattr(rank_zero_only, "rank", 0) == 0
        checks, stats = check_pairs([(r.image, r.mask) for r in todo], self.check_cache, progress=rank0)
        self._verified.update({r.relpath: c for r, c in zip(todo, checks)})
        if rank0:
            log.info("checked %d image/mask pairs in %.1f s: %d files decoded, %d known good from %s",
                     stats.pairs, stats.seconds, stats.decoded, stats.remembered, self.check_cache or "-")

    def _checked(self, recs: list[Record]) -> tuple[list[Record], list[str]]:
        """Drop empty masks (counted), report thresholded masks, key images for the cache (after _verify)."""
        keep, skipped = [], []
        self._thresholded = {}
        self._verify(recs)
        for r in recs:
            c = self._verified[r.relpath]
            if c.nonbinary:  # values other than 0/255: thresholded at 127, reported
                self._thresholded[r.relpath] = c.nonbinary
            if not c.foreground:
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
            recs = folder_records(self.root, f"TestDataset/{n}")
            chosen = {r.relpath for r in recs}
            chosen = set(_subsample(sorted(chosen), self.limits["test"], self.split_seed + 2))
            recs = [r for r in recs if r.relpath in chosen]
            if self.embedding_cache is not None or self.image_cache is not None:
                for r in recs:
                    r.key = file_digest(r.image)
            self.test_sets[n] = PolypDataset(recs, self.image_size, self.prompt,
                                             embedding_cache=self.embedding_cache, resize_method=self.resize_method,
                                             image_cache=self.image_cache, original_masks=True)

    def _write_report(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "data_report.json").write_text(json.dumps(self.report, indent=1))

    # -- loaders ------------------------------------------------------------------------------------
    def _loader(self, ds, batch_size, shuffle, sampler=None):
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        """Shuffled by an :class:`EpochShuffleSampler`: the order is a function of (``split_seed``, epoch), split
        across the trainer's ranks, and a resumed epoch continues at the batch its checkpoint was saved after
        (the position travels in :meth:`state_dict`)."""
        t = self.trainer
        world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
        self._train_sampler = EpochShuffleSampler(len(self.train_set), self.split_seed, num_replicas=world,
                                                  rank=rank)
        if self._resume_position is not None:
            self._train_sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return self._loader(self.train_set, self.batch_size, False, sampler=self._train_sampler)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self):
        return [self._loader(ds, self.eval_batch_size, False) for ds in self.test_sets.values()]

    # -- the training order's position in checkpoints (Lightning's data module hooks) -----------------
    def state_dict(self) -> dict[str, Any]:
        """Where the training order stands: Lightning stores this in every checkpoint it writes while fitting.
        Saved after the epoch's last batch, the position is the start of the next epoch."""
        t = self.trainer
        if t is None or self._train_sampler is None:
            return {}
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = t.current_epoch
        if done >= t.num_training_batches:  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {"seed": int(self.split_seed), "epoch": int(epoch), "rank_samples": int(done * self.batch_size),
                "world_size": int(t.world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores this before it asks for the training loader, whose first epoch then resumes."""
        if not state_dict:
            return
        if int(state_dict.get("seed", self.split_seed)) != int(self.split_seed):
            log.warning("resuming with seed %s, checkpoint has %s: the data order changes", self.split_seed,
                        state_dict.get("seed"))
        world = self.trainer.world_size if self.trainer is not None else 1
        if int(state_dict.get("world_size", world)) != world:
            log.warning("resuming on %s processes, the checkpoint was saved on %s: the resumed epoch's order "
                        "differs from an uninterrupted run's", world, state_dict.get("world_size"))
        self._resume_position = (int(state_dict["epoch"]), int(state_dict.get("rank_samples", 0)))
        if self._train_sampler is not None:
            self._train_sampler.resume_at(*self._resume_position)
            self._resume_position = None
