"""Saving and loading without pickle.

``numres.save(obj, path)`` writes a ``.npz`` archive: every array is stored as a
plain ``.npy`` member, and the nesting around them (dicts, lists, numbers,
strings, None) is described by a JSON manifest stored beside them.  Loading uses
``np.load(allow_pickle=False)`` and ``json``, so a file can never run code.

Files are written atomically: into a temporary file in the target directory,
flushed to disk, then renamed over the destination.  A crash mid-write leaves the
old file intact.  The file gets the permissions a plain ``open(path, "w")`` would
give it: a new file ``0666`` less the umask (``0644`` under the usual umask 022),
a replaced file keeps its mode.

:func:`load` reads only files it can read without running code, and says what a
file is when it is not a numres file (empty, text, a single ``.npy`` array, a
PyTorch checkpoint, a damaged zip, an ``.npz`` of pickled objects).
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
import zipfile

import numpy as np

from . import backend as B
from .errors import CheckpointError
from .torch_checkpoint import load_torch_checkpoint

MANIFEST = "__numres_manifest__"
FORMAT_VERSION = 1
EXPECTED = "numres expected a NumPy .npz archive (a zip of .npy arrays) written by numres.save"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")          # a zip's first entry, or an empty zip's end record
NPY_MAGIC = b"\x93NUMPY"

__all__ = ["CheckpointError", "atomic_write", "save", "load", "load_weights", "is_torch_checkpoint"]


def _encode(obj, arrays: dict):
    """Turn ``obj`` into JSON-able data; arrays go into ``arrays`` and are referenced by name."""
    if isinstance(obj, dict):
        return {"dict": [[_encode(key, arrays), _encode(value, arrays)] for key, value in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(item, arrays) for item in obj]}
    if obj is None or isinstance(obj, (bool, str)):
        return {"value": obj}
    if isinstance(obj, (int, np.integer)):
        return {"int": int(obj)}
    if isinstance(obj, (float, np.floating)):
        return {"float": repr(float(obj))}
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        name = f"a{len(arrays)}"
        array = np.ascontiguousarray(B.to_numpy(obj)).reshape(obj.shape)   # keeps 0-d arrays 0-d
        if array.dtype == object:
            raise TypeError("numres.save cannot store object arrays")
        arrays[name] = array
        return {"array": name}
    raise TypeError(f"numres.save cannot store objects of type {type(obj).__name__}")


def _decode(node, arrays):
    (kind, payload), = node.items()
    if kind == "dict":
        return {_decode(key, arrays): _decode(value, arrays) for key, value in payload}
    if kind in ("list", "tuple"):
        items = [_decode(item, arrays) for item in payload]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return payload
    if kind == "int":
        return int(payload)
    if kind == "float":
        return float(payload)
    if kind == "array":
        return arrays[payload]
    raise CheckpointError(f"unknown entry kind {kind!r} in manifest")


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place.

    ``mkstemp`` creates the temporary file with mode 0600; before the rename it gets the mode a
    plain ``open(path, "w")`` would give (see :func:`_mode_for`), so readers see the usual 0644.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save(obj, path) -> None:
    """Write ``obj`` (a state dict, or nested dicts/lists of arrays and plain values) to ``path`` atomically.

    The file is always a NumPy ``.npz`` archive, whatever its name: read it with :func:`load`
    (or ``numpy.load``), not with ``torch.load``.  A name that does not end in ``.npz``
    (``model.pth``, say) is written as asked, with a :class:`UserWarning` that says what the
    file is; it is not refused, because the name is the caller's choice and :func:`load` and
    :func:`load_weights` recognise the file by its content, not its name.
    """
    name = os.fspath(path)
    if not name.lower().endswith(".npz"):
        warnings.warn(f"numres.save writes a NumPy .npz archive; {name!r} will hold one under a "
                      f"{os.path.splitext(name)[1] or 'suffix-less'} name (read it with numres.load, "
                      f"not torch.load); name it '.npz' to say what it is", UserWarning, stacklevel=2)
    arrays = {}
    manifest = {"format": "numres", "version": FORMAT_VERSION, "root": _encode(obj, arrays)}
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def _not_numres(path, reason) -> CheckpointError:
    return CheckpointError(f"{path} is not a numres file: {reason}; {EXPECTED}")


def _read_archive(path) -> dict:
    """Every member of the ``.npz`` at ``path`` as an array, or a CheckpointError that says what the file is."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    if not head:
        raise _not_numres(path, "it is empty (0 bytes)")
    if head.startswith(NPY_MAGIC):
        raise _not_numres(path, "it is a single NumPy .npy array (numpy.save), not an .npz archive; "
                                "read it with numpy.load")
    if not head.startswith(ZIP_MAGIC):
        kind = "text" if _looks_like_text(path) else f"data starting with bytes {head!r}"
        raise _not_numres(path, f"it holds {kind}, not a zip archive")
    try:
        if is_torch_checkpoint(path):
            raise _not_numres(path, "it is a PyTorch checkpoint (torch.save); load model weights from it with "
                                    "numres.io.load_weights or a model builder's weights= argument")
        with np.load(path, allow_pickle=False) as archive:
            others = [name for name in archive.zip.namelist() if not name.endswith(".npy")]
            if others:
                raise _not_numres(path, f"it is a zip archive with members that are not .npy arrays "
                                        f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
            arrays = {}
            for name in archive.files:
                try:
                    arrays[name] = archive[name]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    raise _not_numres(path, f"member {name!r} is an array of Python objects, stored with pickle, "
                                            f"which numres never loads (it can run code)") from None
            return arrays
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive (truncated, or cut off while being written?), "
                              f"not a readable numres file: {exc}; {EXPECTED}") from exc


def _looks_like_text(path) -> bool:
    with open(path, "rb") as stream:
        sample = stream.read(4096)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in sample


def load(path):
    """Read a file written by :func:`save` (or any pickle-free ``.npz``, returned as a dict of arrays).

    Anything else raises :class:`CheckpointError` naming what the file seems to be and what was
    expected; nothing in the file is ever unpickled.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    arrays = _read_archive(path)
    if MANIFEST not in arrays:
        return arrays
    try:
        manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: its numres manifest is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "numres" or "root" not in manifest:
        raise CheckpointError(f"{path}: its numres manifest is not one numres wrote")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: numres file version {manifest.get('version')} is newer than this numres "
                              f"reads (version {FORMAT_VERSION}); upgrade numres")
    try:
        return _decode(manifest["root"], arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: its numres manifest does not match the arrays stored with it "
                              f"({type(exc).__name__}: {exc})") from None


def is_torch_checkpoint(path) -> bool:
    """True for a ``torch.save`` zip archive (it holds a ``data.pkl`` record), False for ``.npz`` and others."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())


def load_weights(path) -> dict:
    """A model state dict from a numres ``.npz`` file, a training checkpoint or its run folder, or a PyTorch
    ``.pth`` checkpoint (no PyTorch needed)."""
    path = os.fspath(path)
    if os.path.isdir(path):             # a run folder of `numres train`: its checkpoint
        path = os.path.join(path, "checkpoint.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint.npz in the folder {os.path.dirname(path)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    # By content first: numres.save may have written an .npz under a .pth name (it warns).  A .pth/.pt
    # file that is not a zip at all is left to the PyTorch reader, which explains the legacy format.
    if is_torch_checkpoint(path) or (path.endswith((".pth", ".pt")) and not zipfile.is_zipfile(path)):
        state = load_torch_checkpoint(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state
    state = load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state
