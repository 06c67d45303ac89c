"""Read PyTorch ``.pth`` checkpoints into NumPy arrays, without PyTorch and without trusting pickle.

Since torch 1.6, ``torch.save(obj, path)`` writes a zip archive::

    <archive>/data.pkl        the object, pickled (protocol 2); tensors are *references* to storages
    <archive>/data/<key>      one raw storage per key: numel elements, byte order given by ...
    <archive>/byteorder       "little" or "big" (absent in old files: little)
    <archive>/version, ...    format bookkeeping, not needed here

Inside ``data.pkl`` a tensor is the call ``_rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks[, metadata])``, where ``storage`` is a *persistent id*, the tuple
``("storage", <storage type>, key, location, numel)``.  The tensor is the strided view::

    tensor[i_0, ..., i_k] = storage[offset + i_0 * stride_0 + ... + i_k * stride_k]

(strides and offset count elements, not bytes).  Several tensors may share one storage.

A pickle can name any Python callable and make the loader call it, so ``pickle.load``
on a downloaded file can run arbitrary code.  :class:`_RestrictedUnpickler` therefore
resolves only the handful of global names a state dict needs, each mapped to a
harmless function of this module that builds NumPy arrays; every other name is
refused with :class:`UnsafeCheckpointError` before anything is called.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np

from .errors import CheckpointError

__all__ = ["load_torch_checkpoint", "TorchCheckpointError", "UnsafeCheckpointError"]


class TorchCheckpointError(CheckpointError):
    """The file is not a readable PyTorch zip checkpoint (truncated, legacy format, corrupt)."""


class UnsafeCheckpointError(TorchCheckpointError):
    """The checkpoint's pickle names something outside the state-dict allow-list; nothing was run."""


# --- storage types and dtypes -----------------------------------------------------------------

class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: just the element dtype of a storage."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDtype:
    """Stands in for a ``torch.<dtype>`` object (``_rebuild_tensor_v3`` passes one explicitly)."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


# bfloat16 has no NumPy dtype: its bits are read as uint16 and widened exactly to float32.
BFLOAT16 = "bfloat16"

_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": BFLOAT16,
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}

_TORCH_DTYPES = {name: _TorchDtype(name, dtype) for name, dtype in {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": BFLOAT16,
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "complex64": "complex64", "complex128": "complex128"}.items()}


class _Storage:
    """One ``data/<key>`` record: its raw bytes and the dtype its tensors read it as."""

    def __init__(self, key, raw: bytes, dtype_name: str, byteorder: str):
        self.key, self.raw, self.dtype_name, self.byteorder = key, raw, dtype_name, byteorder

    def elements(self, dtype_name: str) -> np.ndarray:
        """The storage as a read-only 1-D array of ``dtype_name`` elements (file byte order)."""
        storage_dtype = np.dtype("uint16" if dtype_name == BFLOAT16 else dtype_name)
        if self.byteorder == "big":
            storage_dtype = storage_dtype.newbyteorder(">")
        if len(self.raw) % storage_dtype.itemsize:
            raise TorchCheckpointError(f"storage {self.key!r} holds {len(self.raw)} bytes, not a whole number of "
                                       f"{dtype_name} elements")
        return np.frombuffer(self.raw, dtype=storage_dtype)


# --- the allow-listed callables ------------------------------------------------------------------

def _check_geometry(elements, storage_offset, size, stride):
    """Refuse a view that would read outside the storage (``as_strided`` does not check)."""
    for name, value in (("size", size), ("stride", stride)):
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise TorchCheckpointError(f"tensor {name} must be a tuple of non-negative integers, got {value!r}")
    if len(size) != len(stride):
        raise TorchCheckpointError(f"tensor size {tuple(size)} and stride {tuple(stride)} differ in length")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchCheckpointError(f"tensor storage offset must be a non-negative integer, got {storage_offset!r}")
    if 0 in size:
        return
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(elements):
        raise TorchCheckpointError(f"tensor of size {tuple(size)}, stride {tuple(stride)}, offset {storage_offset} "
                                   f"reads element {last} of a storage holding {len(elements)} (truncated file?)")


def _strided_copy(storage, dtype_name, storage_offset, size, stride, metadata=None) -> np.ndarray:
    """A fresh, native-byte-order array: the strided view of ``storage`` described by the arguments."""
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"a tensor's storage must be a checkpoint storage record, got {storage!r}")
    elements = storage.elements(dtype_name)
    _check_geometry(elements, storage_offset, size, stride)
    if 0 in size:
        array = np.zeros(tuple(size), dtype=elements.dtype)
    else:
        view = np.lib.stride_tricks.as_strided(
            elements[storage_offset:], shape=tuple(size),
            strides=tuple(s * elements.itemsize for s in stride), writeable=False)
        array = np.array(view, dtype=elements.dtype.newbyteorder("="), order="C")
    if dtype_name == BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    metadata = metadata or {}
    if metadata.get("neg"):
        array = np.negative(array)
    if metadata.get("conj"):
        array = np.conj(array)
    return array


def _rebuild_tensor(storage, storage_offset, size, stride):
    """``torch._utils._rebuild_tensor``: the dtype is the storage's."""
    return _strided_copy(storage, getattr(storage, "dtype_name", None), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a typed storage (``torch.FloatStorage`` ...) sets the dtype."""
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"a tensor's storage must be a checkpoint storage record, got {storage!r}")
    return _strided_copy(storage, storage.dtype_name, storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage read as ``dtype`` (uint16, uint32 ...)."""
    if not isinstance(dtype, _TorchDtype):
        raise TorchCheckpointError(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
    return _strided_copy(storage, dtype.dtype, storage_offset, size, stride, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is its data here."""
    return data


class _TensorType:
    """Stands in for ``torch.Tensor`` / ``torch.nn.Parameter`` as the type argument of ``_rebuild_from_type_v2``."""

    def __init__(self, name):
        self.name = name


def _rebuild_from_type_v2(function, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: a plain tensor (or Parameter) that carried Python attributes."""
    if not isinstance(new_type, _TensorType):
        raise UnsafeCheckpointError(f"tensor subclass {new_type!r} is not supported")
    if function not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise UnsafeCheckpointError("_rebuild_from_type_v2 may only wrap a tensor rebuild function")
    return function(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
    ("torch.storage", "UntypedStorage"): _STORAGE_TYPES["UntypedStorage"],
    **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: globals come only from :data:`_ALLOWED`; storages from the zip archive."""

    def __init__(self, stream, load_storage):
        super().__init__(stream)
        self._load_storage = load_storage

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the checkpoint's pickle refers to {module}.{name}, which is not part of a tensor state dict; "
                f"numres refuses to load it (nothing was executed). Save plain tensors, e.g. "
                f"torch.save(model.state_dict(), path)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise TorchCheckpointError(f"unexpected persistent id in checkpoint: {pid!r}")
        kind, storage_type, key, _location, _numel = pid
        kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
        if kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise TorchCheckpointError(f"unexpected persistent id in checkpoint: {pid!r}")
        return self._load_storage(key, storage_type.dtype)


# --- the archive ----------------------------------------------------------------------------------

_PICKLE_MAGIC = b"\x80"    # the PROTO opcode that starts every legacy torch.save file
_LEGACY_MESSAGE = (
    "{path} is a PyTorch checkpoint in the legacy (pre-1.6) format, which numres cannot read. "
    "Convert it once with torch >= 1.6:  torch.save(torch.load(path), new_path)  "
    "(the default zip serialization), then load new_path.")


def _archive_prefix(archive: zipfile.ZipFile, path) -> str:
    """The top-level folder name in front of ``data.pkl`` (torch uses the file's base name)."""
    candidates = [name[:-len("data.pkl")] for name in archive.namelist()
                  if name.endswith("data.pkl") and name.count("/") == 1]
    if len(candidates) != 1:
        raise TorchCheckpointError(f"{path} is a zip archive but not a torch.save checkpoint "
                                   f"(expected exactly one <name>/data.pkl record, found {len(candidates)})")
    return candidates[0]


def _read_record(archive, name, path) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise TorchCheckpointError(f"{path}: record {name!r} is missing (truncated or corrupt file?)") from None
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as exc:
        raise TorchCheckpointError(f"{path}: cannot read record {name!r} (truncated or corrupt file?): {exc}") from exc


def _byteorder(archive, prefix, path) -> str:
    if f"{prefix}byteorder" not in archive.namelist():
        return "little"
    order = _read_record(archive, f"{prefix}byteorder", path).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise TorchCheckpointError(f"{path}: unknown byte order {order!r}")
    return order


def _open_archive(path) -> zipfile.ZipFile:
    with open(path, "rb") as stream:
        head = stream.read(16)
    if not zipfile.is_zipfile(path):
        if not head:
            raise TorchCheckpointError(f"{path} is empty")
        if head.startswith(_PICKLE_MAGIC):
            raise TorchCheckpointError(_LEGACY_MESSAGE.format(path=path))
        if head.startswith(b"PK"):
            raise TorchCheckpointError(f"{path} starts like a zip archive but has no zip directory at its end: "
                                       f"the file is truncated or corrupt")
        raise TorchCheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TorchCheckpointError(f"{path} is truncated or corrupt: {exc}") from exc


def load_torch_checkpoint(path):
    """Load the object saved by ``torch.save`` at ``path``, with every tensor as a NumPy array.

    Only tensors and plain containers (dicts, OrderedDicts, lists, tuples, numbers, strings)
    can be loaded; anything else in the pickle raises :class:`UnsafeCheckpointError` and
    is never executed.  Arrays keep the tensor's dtype (bfloat16 becomes float32, exactly),
    shape and values; they are fresh C-contiguous copies, so views of a shared storage
    stay independent after loading.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    with _open_archive(path) as archive:
        prefix = _archive_prefix(archive, path)
        byteorder = _byteorder(archive, prefix, path)
        storages = {}

        def load_storage(key, dtype_name):
            if key not in storages:
                raw = _read_record(archive, f"{prefix}data/{key}", path)
                storages[key] = _Storage(key, raw, dtype_name, byteorder)
            return storages[key]

        pickled = _read_record(archive, f"{prefix}data.pkl", path)
        try:
            return _RestrictedUnpickler(io.BytesIO(pickled), load_storage).load()
        except TorchCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError,
                KeyError) as exc:
            raise TorchCheckpointError(f"{path}: data.pkl is not a valid tensor pickle: "
                                       f"{type(exc).__name__}: {exc}") from exc
