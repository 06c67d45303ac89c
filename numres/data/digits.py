"""The UCI handwritten digits, shipped inside numres (no download).

1,797 grey 8x8 images of the digits 0-9, each pixel a count 0..16 of "on" pixels
in a 4x4 block of a 32x32 bitmap (E. Alpaydin and C. Kaynak, UCI Machine Learning
Repository, CC BY 4.0; the same data scikit-learn ships as ``load_digits``).
See ``DIGITS_LICENSE.md`` beside this file.

The archive ``digits.npz`` holds

* ``images``: uint8 ``(1797, 8, 8)``, values 0..16, in the order of the UCI file;
* ``labels``: uint8 ``(1797,)``;
* ``test``:   bool ``(1797,)``, the fixed test split.

**The split** is stratified: for each class ``c`` (in order 0..9) the indices of its
images are shuffled with ``numpy.random.default_rng(SPLIT_SEED + c).permutation`` and
the first ``TEST_PER_CLASS`` = 36 of them go to the test split.  That gives 360 test
images (36 of every digit) and 1,437 training images.  The mask is stored in the
archive, so the split never depends on the NumPy version; :func:`build_archive` is the
script that made the file from scikit-learn's ``digits.csv.gz``.
"""
from __future__ import annotations

import gzip
import io
import os

import numpy as np

ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
CLASSES = tuple(str(digit) for digit in range(10))
SPLIT_SEED = 0
TEST_PER_CLASS = 36
MAX_VALUE = 16          # pixel values are counts in 0..16


def load_digits(split: str = "train"):
    """``(images, labels)`` of one split: uint8 ``(N, 1, 8, 8)`` (values 0..16) and int64 ``(N,)``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}; choose 'train', 'test' or 'all'")
    with np.load(ARCHIVE, allow_pickle=False) as archive:
        images, labels, test = archive["images"], archive["labels"], archive["test"]
    keep = np.ones(len(labels), bool) if split == "all" else (test if split == "test" else ~test)
    return images[keep][:, None, :, :].copy(), labels[keep].astype(np.int64)


def stratified_test_mask(labels, per_class: int = TEST_PER_CLASS, seed: int = SPLIT_SEED) -> np.ndarray:
    """The documented split: ``per_class`` images of each class, drawn with ``default_rng(seed + class)``."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen = np.random.default_rng(seed + int(label)).permutation(members)[:per_class]
        mask[chosen] = True
    return mask


def build_archive(csv_gz_path, out_path=ARCHIVE) -> None:
    """Make ``digits.npz`` from scikit-learn's ``sklearn/datasets/data/digits.csv.gz``.

    Each CSV row is 64 pixel values (row-major 8x8) followed by the label.
    """
    with gzip.open(csv_gz_path, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",")
    if table.shape != (1797, 65):
        raise ValueError(f"{csv_gz_path}: expected 1797 rows of 65 values, got {table.shape}")
    images = table[:, :64].reshape(-1, 8, 8)
    labels = table[:, 64]
    if images.min() < 0 or images.max() > MAX_VALUE or np.any(images != np.round(images)):
        raise ValueError(f"{csv_gz_path}: pixels must be integers in 0..{MAX_VALUE}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.astype(np.uint8), labels=labels.astype(np.uint8),
                        test=stratified_test_mask(labels))
    from ..io import atomic_write
    atomic_write(out_path, lambda stream: stream.write(buffer.getvalue()))
