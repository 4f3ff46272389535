"""Data loading for (multi-process) data-parallel training.

`create_loader` wraps a torch DataLoader: each rank reads a disjoint,
seed-determined part of the data; unusable samples are dropped inside the
workers and counted; painted experts are turned into feature maps either in
the workers (`device=None`) or after the batch reaches `device` (see
`dataset/sample.py` for why the device is the better place on a GPU).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from dataset.datasets import Skipped
from dataset.sample import paint

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Too much of the data is unreadable to train on."""


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardSampler(Sampler[int]):
    """Indices of this rank: a (seed, epoch) permutation (or the plain order
    when not shuffling) dealt round-robin, so ranks never share a sample.
    With `equal` every rank gets the same count (a few samples wait for the
    next epoch's permutation), which keeps data-parallel ranks in step; with
    `pad` every rank gets the same count by repeating the first samples (for
    evaluation in lockstep, e.g. sharded models; results are de-duplicated).
    `start` (see set_epoch) leaves out the first indices of the order: a resume."""

    def __init__(self, n: int, rank: int, world_size: int, shuffle: bool, seed: int, equal: bool, pad: bool = False):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.equal, self.pad = shuffle, seed, equal, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, 0
        if not 0 <= start <= len(self):
            raise ValueError(f"cannot start at sample {start} of rank {self.rank}'s {len(self)}")
        self.start = start

    def _stop(self) -> int:
        return self.n // self.world_size * self.world_size if self.equal else self.n

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed << 32) | self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and not self.equal:
            order += order[: -self.n % self.world_size]
            return iter(order[self.rank :: self.world_size][self.start :])
        return iter(order[self.rank : self._stop() : self.world_size][self.start :])

    def __len__(self) -> int:
        if self.pad and not self.equal:
            return -(-self.n // self.world_size) - self.start
        return len(range(self.rank, self._stop(), self.world_size)) - self.start


class _Collate:
    """Runs in the worker: drops `Skipped` samples (keeping their reasons),
    collates the rest, and paints there when no device is given."""

    def __init__(self, collate_fn, paint_here: bool):
        self.collate_fn = collate_fn
        self.paint_here = paint_here

    def __call__(self, samples):
        good = [s for s in samples if not isinstance(s, Skipped)]
        reasons = [s.reason for s in samples if isinstance(s, Skipped)]
        batch = self.collate_fn(good) if good else None
        if batch is not None and self.paint_here:
            batch = (paint(batch[0]), *batch[1:])
        return batch, len(samples), reasons


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class Loader:
    """Iterates batches whose first element is the experts dict, painted.
    Batches can be smaller than `batch_size` when samples were skipped.
    `images_per_s` is the rate this epoch so far; `skipped`/`seen` count the
    epoch's unusable and total samples of this rank (read in this run).
    `position` counts the DataLoader batches of the epoch consumed so far,
    those before a resume's start included: where a resume must start. A batch
    whose samples were all unusable counts, though nothing is yielded for it."""

    def __init__(
        self,
        dataset,
        batch_size,
        num_workers,
        train,
        collate_fn,
        seed,
        rank,
        world_size,
        device,
        max_bad_fraction,
        pad=False,
    ):
        self.dataset = dataset
        self.rank, self.world_size = dist_info(rank, world_size)
        self.device = torch.device(device) if device is not None else None
        self.max_bad_fraction = max_bad_fraction
        self.epoch, self.start_batch = 0, 0
        self.sampler = None
        if isinstance(dataset, IterableDataset):
            dataset.shard(self.rank, self.world_size)
        else:
            self.sampler = ShardSampler(len(dataset), self.rank, self.world_size, train, seed, equal=train, pad=pad)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_Collate(collate_fn or dataset.collate, paint_here=self.device is None),
            drop_last=train,
            pin_memory=self.device is not None and self.device.type == "cuda",
            persistent_workers=False,  # so each epoch's workers see set_epoch
            # Its own generator: starting an epoch must not draw from the global
            # RNG, or a resumed run's dropout would differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )
        self._reset()

    def _reset(self):
        self.seen, self.skipped, self.images, self.reasons = 0, 0, 0, []
        self.position = self.start_batch
        self._start = time.perf_counter()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterating then yields the epoch's batches from DataLoader batch
        `start_batch` on, exactly as the whole epoch would (a resume): the
        batches before are skipped where samples are chosen (the sampler's
        order, the stream's units), so none of their files is read."""
        self.epoch, self.start_batch = epoch, start_batch
        self.dataset.set_epoch(epoch)
        batch_size = self.loader.batch_size
        if self.sampler is not None:
            # Every batch before the last is full, so the start is exact.
            self.sampler.set_epoch(epoch, start_batch * batch_size)
        else:
            self.dataset.set_start(start_batch, batch_size, self.loader.num_workers, self.loader.drop_last)

    def __len__(self) -> int:
        """The whole epoch's batches, those before the start included."""
        return self.start_batch + len(self.loader)

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self._start, 1e-9)

    def _check(self, final: bool) -> None:
        """Stop once more than the allowed fraction is unreadable: mid-epoch
        as soon as that is certain (the epoch's size is known), else at its end."""
        if final:
            total = self.seen
        elif self.sampler is not None:
            total = len(self.sampler)
        else:
            return
        if self.skipped > self.max_bad_fraction * total:
            raise DataError(
                f"{self.skipped} of the {self.seen} samples read so far are unreadable, more than "
                f"{self.max_bad_fraction:.0%} of {total} (rank {self.rank}); e.g. {'; '.join(self.reasons[:3])}"
            )

    def __iter__(self):
        self._reset()
        for batch, n, reasons in self.loader:
            self.position += 1
            self.seen += n
            self.skipped += len(reasons)
            self.reasons += reasons[: max(0, 20 - len(self.reasons))]
            self._check(final=False)
            if batch is None:
                continue
            if self.device is not None:
                batch = (paint(_to(batch[0], self.device)), *batch[1:])
            self.images += batch[0]["rgb"].shape[0]
            yield batch
        self._check(final=True)
        if self.skipped:
            logger.warning(
                "epoch %d rank %d: skipped %d of %d unreadable samples, e.g. %s",
                self.epoch,
                self.rank,
                self.skipped,
                self.seen,
                "; ".join(self.reasons[:3]),
            )


def create_loader(
    dataset,
    batch_size,
    num_workers,
    train,
    collate_fn=None,
    *,
    seed: int | None = None,
    rank=None,
    world_size=None,
    device=None,
    max_bad_fraction: float | None = None,
    pad: bool = False,
) -> Loader:
    """The official signature plus sharding, seeding, painting placement and
    the unreadable-data limit (`seed` and `max_bad_fraction` default to the
    dataset config's, else 0 and 0.5). `collate_fn` receives only readable samples.
    `pad`: every rank the same number of samples (see ShardSampler)."""
    seed = dataset.seed if seed is None else seed
    if max_bad_fraction is None:
        max_bad_fraction = dataset.max_bad_fraction
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    return Loader(
        dataset, batch_size, num_workers, train, collate_fn, seed, rank, world_size, device, max_bad_fraction, pad
    )
