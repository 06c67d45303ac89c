"""Batches of images on the model's backend: seeded shuffling, augmentation, normalisation.

The images stay uint8 ``(N, C, H, W)`` and are copied to the backend once.  Each
batch is gathered there and turned into floats by

1. augmentation (training only), as torchvision's ``RandomCrop(H, padding=p)`` and
   ``RandomHorizontalFlip()`` do it: the image is padded with ``p`` zero pixels on
   every side, an ``H x W`` window at a random offset ``(dy, dx)`` in ``0..2p`` is
   kept, and with probability 1/2 its columns are reversed.  Crop and flip are one
   gather: output pixel ``(i, j)`` reads padded pixel ``(dy + i, dx + j)``, or
   ``(dy + i, dx + W - 1 - j)`` when flipped;
2. scaling to ``[0, 1]`` (divide by the dataset's largest value: 255 for CIFAR-10, 16 for the digits);
3. normalisation per channel, ``(x - mean_c) / std_c``, with the training split's mean and std.

**Randomness.**  One ``numpy.random.Generator`` (seeded) draws, at the start of every
epoch, the whole epoch's plan: the permutation and every image's crop offset and flip.
:meth:`DataLoader.get_rng_state` taken before an epoch and given back with
:meth:`DataLoader.set_rng_state` replays that epoch exactly, and ``batches(start=k)``
skips its first ``k`` batches: this is how an interrupted run resumes mid-epoch.
Only the plan (a few integers per image) is drawn on the host; pixels never leave
the backend.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from .. import backend as B


@dataclass
class ImageDataset:
    """uint8 ``images`` (N, C, H, W), int64 ``labels`` (N,), the class names and the pixel scale."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple
    max_value: float = 255.0
    name: str = ""

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"dataset images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, count: int) -> "ImageDataset":
        """The first ``count`` examples (for quick runs and tests)."""
        return ImageDataset(self.images[:count], self.labels[:count], self.classes, self.max_value, self.name)

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and (population) std of the pixels scaled to ``[0, 1]``, in float64."""
        pixels = self.images.astype(np.float64) / self.max_value
        return pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))


class BatchLoader:
    """What :class:`DataLoader` and :class:`~numres.data.ImageLoader` share: ``len()`` in batches
    (the last one partial unless ``drop_last``), the backend's array module, and iteration
    as one epoch of ``batches()``."""

    @staticmethod
    def check_sizes(dataset, batch_size, drop_last) -> None:
        """A non-empty dataset, and with ``drop_last`` at least one full batch of it."""
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if drop_last and batch_size > len(dataset):
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({len(dataset)} images)")

    @property
    def xp(self):
        return B.get_xp(self.backend)

    def __len__(self):
        count = len(self.dataset) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self):
        return self.batches()


class DataLoader(BatchLoader):
    """Iterate ``(x, y)`` batches: ``x`` float ``(B, C, H, W)`` and ``y`` int64 ``(B,)``, both on ``backend``.

    ``crop_padding`` > 0 turns on random crops, ``flip`` random horizontal flips.
    ``channels`` repeats a 1-channel dataset to that many channels (for 3-channel models).
    ``drop_last`` drops a final batch smaller than ``batch_size``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle=False, seed=0, crop_padding=0,
                 flip=False, mean=None, std=None, channels=None, drop_last=False, backend="numpy",
                 dtype="float32"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.check_sizes(dataset, batch_size, drop_last)
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if channels is not None and channels != dataset.channels and dataset.channels != 1:
            raise ValueError(f"cannot turn {dataset.channels}-channel images into {channels} channels")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.crop_padding, self.flip, self.drop_last = shuffle, crop_padding, flip, drop_last
        self.channels = channels or dataset.channels
        self.backend, self.dtype = backend, B.normalize_dtype(dtype)
        self.rng = np.random.default_rng(seed)
        xp = self.xp
        mean = np.zeros(dataset.channels) if mean is None else np.asarray(mean, np.float64)
        std = np.ones(dataset.channels) if std is None else np.asarray(std, np.float64)
        if mean.shape != (dataset.channels,) or std.shape != (dataset.channels,) or np.any(std <= 0):
            raise ValueError(f"mean and std need {dataset.channels} values each (std > 0); got {mean}, {std}")
        # x_normalised = x_uint8 * scale + shift, per channel
        self._scale = xp.asarray((1.0 / (dataset.max_value * std)).reshape(1, -1, 1, 1), dtype=self.dtype)
        self._shift = xp.asarray((-mean / std).reshape(1, -1, 1, 1), dtype=self.dtype)
        self._images = B.asarray(dataset.images, backend)
        self._labels = B.asarray(dataset.labels.astype(np.int64), backend)

    # --- randomness ---------------------------------------------------------------------------------

    def get_rng_state(self) -> dict:
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def plan_epoch(self):
        """``(order, offsets, flips)`` for one epoch: host arrays drawn from the loader's generator."""
        n = len(self.dataset)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        offsets = self.rng.integers(0, 2 * self.crop_padding + 1, size=(n, 2)) if self.crop_padding else None
        flips = self.rng.random(n) < 0.5 if self.flip else None
        return order, offsets, flips

    # --- batches ------------------------------------------------------------------------------------

    def batches(self, start: int = 0):
        """One epoch's batches, skipping the first ``start`` (the plan is drawn in full either way)."""
        order, offsets, flips = self.plan_epoch()
        for index in range(start, len(self)):
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            picked = order[rows]
            yield self.make_batch(picked, None if offsets is None else offsets[rows],
                                  None if flips is None else flips[rows])

    def make_batch(self, indices, offsets=None, flips=None):
        """Gather, augment and normalise the images ``indices`` (host integers) on the backend."""
        xp = self.xp
        picked = xp.asarray(indices)
        images = self._images[picked]
        if offsets is not None or flips is not None:
            images = self._crop_and_flip(images, offsets, flips)
        x = images.astype(self.dtype) * self._scale + self._shift
        if self.channels != x.shape[1]:
            x = xp.ascontiguousarray(xp.broadcast_to(x, (x.shape[0], self.channels) + x.shape[2:]))
        return x, self._labels[picked]

    def _crop_and_flip(self, images, offsets, flips):
        """Random crop from the zero-padded images and horizontal flip, as one gather on the backend."""
        xp = self.xp
        n, c, h, w = images.shape
        p = self.crop_padding
        if p:
            images = xp.pad(images, ((0, 0), (0, 0), (p, p), (p, p)))
        offsets = np.full((n, 2), p) if offsets is None else offsets
        rows = offsets[:, :1] + np.arange(h)                               # (n, h)
        cols = offsets[:, 1:] + np.arange(w)                               # (n, w)
        if flips is not None:
            cols = np.where(flips[:, None], cols[:, ::-1], cols)
        rows, cols = xp.asarray(rows), xp.asarray(cols)
        return images[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]
