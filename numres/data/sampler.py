"""Which examples each rank of a data-parallel job sees: DistributedSampler and DistributedEvalSampler.

:class:`DistributedSampler` follows ``torch.utils.data.DistributedSampler``.  With ``n`` examples and
``W`` ranks, every rank gets ``num_samples`` indices::

    num_samples = ceil((n - W) / W)  if drop_last and n % W != 0     (the tail is dropped)
                  ceil(n / W)        otherwise                       (the list is padded)
    total_size  = num_samples * W

1. ``order`` is ``0 .. n-1``, or with ``shuffle`` a permutation drawn from a generator seeded with
   ``seed + epoch`` - the same on every rank, different each epoch (call :meth:`set_epoch`);
2. without ``drop_last``, ``order`` is padded to ``total_size`` by repeating it from its start;
   with ``drop_last`` it is cut to ``total_size``;
3. rank ``r`` takes ``order[r : total_size : W]``.

Steps 2 and 3 are torch's exactly; step 1 draws the permutation with NumPy's ``default_rng(seed +
epoch)`` (numres does not depend on torch), so the shuffled lists differ from torch's.

Padding repeats a few examples, which is harmless for training but wrong for evaluation metrics.
:class:`DistributedEvalSampler` therefore gives rank ``r`` the indices ``r, r + W, r + 2W, ...`` with
no padding: the ranks cover every example exactly once (their shards may differ in size by one), and
metrics summed over ranks (:func:`numres.distributed.all_reduce_sums`) are exact.

:func:`shard` turns a list of indices into an :class:`~numres.data.loader.ImageDataset` of those
examples, which a :class:`~numres.data.loader.DataLoader` (with ``shuffle=False``) then batches.

:class:`RankBatches` splits each batch of a loader instead: every rank draws the same global batch
(same seed, same plan), and rank ``r`` keeps rows ``local_part(B, r, W)``, a contiguous block of
``B / W`` rows.  ``numres train`` does this, so a run's randomness and its resume point do not depend on
the number of processes.
"""
from __future__ import annotations

import math

import numpy as np

from .. import distributed as dist


def _resolve(num_replicas, rank):
    num_replicas = dist.get_world_size() if num_replicas is None else int(num_replicas)
    rank = dist.get_rank() if rank is None else int(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")
    return num_replicas, rank


def _length(dataset) -> int:
    return int(dataset) if isinstance(dataset, (int, np.integer)) else len(dataset)


class DistributedSampler:
    """This rank's shard of ``dataset`` (anything with ``len()``, or an example count), as torch's."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=False):
        self.num_replicas, self.rank = _resolve(num_replicas, rank)
        self.dataset_size = _length(dataset)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        n, replicas = self.dataset_size, self.num_replicas
        if drop_last and n % replicas != 0:
            self.num_samples = math.ceil((n - replicas) / replicas)
        else:
            self.num_samples = math.ceil(n / replicas)
        self.total_size = self.num_samples * replicas

    def set_epoch(self, epoch: int) -> None:
        """Shuffle differently in each epoch (the same way on every rank)."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """Step 1: every index once, in this epoch's order (identical on all ranks)."""
        if self.shuffle:
            return np.random.default_rng(self.seed + self.epoch).permutation(self.dataset_size)
        return np.arange(self.dataset_size)

    def indices(self, order=None) -> np.ndarray:
        """This rank's indices for the epoch (``order`` replaces step 1, for tests)."""
        order = self.order() if order is None else np.asarray(order)
        if self.drop_last:
            order = order[:self.total_size]
        else:
            padding = self.total_size - len(order)
            if padding > 0:
                order = np.concatenate([order, np.resize(order, padding)])   # repeats order from its start
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return self.num_samples


class DistributedEvalSampler:
    """Rank ``r`` takes ``r, r + W, ...``: every example exactly once over the ranks, no padding."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas, self.rank = _resolve(num_replicas, rank)
        self.dataset_size = _length(dataset)

    def indices(self) -> np.ndarray:
        return np.arange(self.rank, self.dataset_size, self.num_replicas)

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return len(range(self.rank, self.dataset_size, self.num_replicas))


def shard(dataset, indices):
    """The examples ``indices`` of an ImageDataset, as a new ImageDataset (in that order)."""
    from .loader import ImageDataset
    indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
    return ImageDataset(dataset.images[indices], dataset.labels[indices], dataset.classes, dataset.max_value,
                        dataset.name)


def local_part(count: int, rank=None, world_size=None) -> slice:
    """Rank ``rank``'s contiguous block of ``count`` rows split over ``world_size`` ranks (sizes differ by <= 1)."""
    world_size, rank = _resolve(world_size, rank)
    return slice(rank * count // world_size, (rank + 1) * count // world_size)


class RankBatches:
    """``(x, y)`` batches of ``loader`` cut to this rank's :func:`local_part`; empty parts are skipped."""

    def __init__(self, loader, rank=None, world_size=None):
        self.loader = loader
        self.world_size, self.rank = _resolve(world_size, rank)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            part = local_part(len(y), self.rank, self.world_size)
            if part.stop > part.start:
                yield x[part], y[part]
