"""CIFAR-10 from the standard "python version" batch files, read without unpickling arbitrary objects.

The files ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``
(from ``cifar-10-python.tar.gz``) are Python 2 pickles of dicts::

    {b"data": uint8 ndarray (10000, 3072),   # per image: 1024 red, 1024 green, 1024 blue, row-major 32x32
     b"labels": [int, ...],                  # 10000 labels in 0..9
     b"filenames": [bytes, ...], b"batch_label": bytes}

A pickle can name any importable callable and call it, so ``pickle.load`` on a
file from elsewhere can run code.  :class:`RestrictedUnpickler` admits only the
four globals these files need to rebuild a NumPy array (NumPy's ``_reconstruct``,
``ndarray`` and ``dtype``, and ``_codecs.encode``, which protocol-2 pickles written
by Python 3 use for bytes) and refuses every other one before anything is called.
Every parsed batch is then checked for the layout above; a missing, truncated or
foreign file raises :class:`CifarFormatError` (or ``FileNotFoundError``) naming the file.

``data_dir`` may be the ``cifar-10-batches-py`` folder itself, a folder containing
it, or a folder holding the unextracted ``cifar-10-python.tar.gz``.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
MAX_VALUE = 255


class CifarFormatError(ValueError):
    """A CIFAR-10 batch file is truncated, foreign, or asks for objects it must not contain."""


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``str`` to ``bytes`` in latin-1 only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _plain_dtype(*args):
    """``numpy.dtype(...)`` for plain numeric dtypes; object dtypes (which hold Python objects) are refused."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing object dtype {dtype}")
    return dtype


_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]     # numpy's own array-rebuilding function

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and plain NumPy arrays; refuses every other global."""

    def find_class(self, module, name):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': a CIFAR-10 batch holds only dicts, lists, "
                f"bytes and uint8 arrays")
        return allowed


def restricted_loads(payload: bytes, source: str = "<bytes>"):
    """Unpickle ``payload`` with :class:`RestrictedUnpickler`; any failure is a :class:`CifarFormatError`."""
    try:
        return RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise CifarFormatError(f"{source}: cannot be read as a CIFAR-10 python batch ({exc})") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as exc:
        raise CifarFormatError(f"{source}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from exc


def _field(batch: dict, key: str):
    """``batch[key]``; the originals use bytes keys (Python 2 strings), re-pickled copies may use str."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def parse_batch(payload: bytes, source: str = "<bytes>"):
    """``(images, labels)`` from one batch file's bytes: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``."""
    batch = restricted_loads(payload, source)
    if not isinstance(batch, dict):
        raise CifarFormatError(f"{source}: expected a dict, found {type(batch).__name__}")
    try:
        data, labels = _field(batch, "data"), _field(batch, "labels")
    except KeyError as exc:
        raise CifarFormatError(f"{source}: not a CIFAR-10 batch, it has no {exc.args[0]!r} entry") from None
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise CifarFormatError(f"{source}: 'data' must be a uint8 array of shape (N, {size}), found {described}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data):
        raise CifarFormatError(f"{source}: 'labels' must be a list of {len(data)} integers")
    labels = np.asarray(labels)
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                        or labels.max() >= len(CLASSES)):
        raise CifarFormatError(f"{source}: labels must be integers in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


class _Source:
    """Reads the batch files from a folder or from the unextracted tarball."""

    def __init__(self, data_dir):
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"CIFAR-10 data directory not found: {data_dir}")
        self.folder = self.tarball = None
        for candidate in (data_dir, os.path.join(data_dir, FOLDER)):
            if os.path.exists(os.path.join(candidate, TEST_FILES[0])) or \
                    os.path.exists(os.path.join(candidate, TRAIN_FILES[0])):
                self.folder = candidate
                return
        if os.path.isfile(os.path.join(data_dir, TARBALL)):
            self.tarball = os.path.join(data_dir, TARBALL)
            return
        raise FileNotFoundError(
            f"no CIFAR-10 batches in {data_dir}: expected {', '.join(TRAIN_FILES + TEST_FILES)} there or in "
            f"{os.path.join(data_dir, FOLDER)}, or the archive {TARBALL} (the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html)")

    def read(self, names) -> list[tuple[bytes, str]]:
        """``[(payload, source description)]`` for each file name, in order."""
        if self.folder is not None:
            found = []
            for name in names:
                path = os.path.join(self.folder, name)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"CIFAR-10 batch file missing: {path}")
                with open(path, "rb") as stream:
                    found.append((stream.read(), path))
            return found
        payloads = {}
        try:
            with tarfile.open(self.tarball, "r:gz") as archive:     # one pass through the gzip stream
                for member in archive:
                    name = member.name.rsplit("/", 1)[-1]
                    if name in names and member.isfile():
                        payloads[name] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CifarFormatError(f"{self.tarball}: unreadable archive ({exc})") from exc
        missing = [name for name in names if name not in payloads]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 batch files missing from {self.tarball}: {', '.join(missing)}")
        return [(payloads[name], f"{self.tarball}:{FOLDER}/{name}") for name in names]


def load_cifar10(data_dir, split: str = "train"):
    """``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` for ``split`` "train" (50,000) or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose 'train' or 'test'")
    source = _Source(data_dir)
    parts = [parse_batch(*found) for found in source.read(TRAIN_FILES if split == "train" else TEST_FILES)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
