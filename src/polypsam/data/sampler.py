"""The training order: a shuffle that is a function of (seed, epoch), split across ranks, resumable mid-epoch.

torch's ``RandomSampler`` draws its permutation from the global RNG, whose state a checkpoint does not
hold, so a resumed run would see another order. :class:`EpochShuffleSampler` does not; the data module
(:meth:`polypsam.data.datamodule.PolypDataModule.train_dataloader`) uses it and keeps its position in the
checkpoint, so a run killed after k batches of epoch e resumes at batch k of the same permutation.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), split across ranks, with a one-off skip for a
    resumed epoch.

    Each rank takes every ``num_replicas``-th index of the padded permutation, as torch's
    DistributedSampler does; being one, it is used as it is under DDP (Lightning would otherwise wrap it,
    and the wrapper cannot skip). On one process it is a plain shuffle.
    """

    def __init__(self, dataset_len: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(int(dataset_len)), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=int(seed), drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already trained on)

    def resume_at(self, epoch: int, rank_samples_done: int) -> None:
        """The next iteration of ``epoch`` skips the first ``rank_samples_done`` indices of this rank."""
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(rank_samples_done))

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``: every num_replicas-th of the permutation padded to equal shares."""
        n = len(self.dataset)
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n).tolist()
        while len(perm) < self.total_size:
            perm += perm[: self.total_size - len(perm)]
        return perm[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(self.order(self.epoch)[skip:])

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:  # Lightning sets the resumed epoch again: keep its pending skip
            self._resume = None
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples  # Lightning counts a resumed epoch's batches from where it stopped
