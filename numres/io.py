"""Saving and loading without pickle.

``numres.save(obj, path)`` writes a ``.npz`` archive: every array is stored as a
plain ``.npy`` member, and the nesting around them (dicts, lists, numbers,
strings, None) is described by a JSON manifest stored beside them.  Loading uses
``np.load(allow_pickle=False)`` and ``json``, so a file can never run code.

Files are written atomically: into a temporary file in the target directory,
flushed to disk, then renamed over the destination.  A crash mid-write leaves the
old file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

from . import backend as B

MANIFEST = "__numres_manifest__"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is missing, truncated, or not in the expected format."""


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


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save(obj, path) -> None:
    """Write ``obj`` (a state dict, or nested dicts/lists of arrays and plain values) to ``path`` atomically."""
    arrays = {}
    manifest = {"format": "numres", "version": FORMAT_VERSION, "root": _encode(obj, arrays)}
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda stream: np.savez(stream, **arrays))


def load(path):
    """Read a file written by :func:`save` (or any pickle-free ``.npz``, returned as a dict of arrays)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable .npz file (truncated or another format?): {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path} holds data that needs pickle, which numres refuses to load: {exc}") from exc
    if MANIFEST not in arrays:
        return arrays
    manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode("utf-8"))
    if manifest.get("format") != "numres" or manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported numres file version {manifest.get('version')}")
    return _decode(manifest["root"], arrays)


def is_torch_checkpoint(path) -> bool:
    """True for a ``torch.save`` zip archive (it holds a ``data.pkl`` record), False for ``.npz`` and others."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())


def load_weights(path) -> dict:
    """A model state dict from a numres ``.npz`` file or a PyTorch ``.pth`` checkpoint (no PyTorch needed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    if is_torch_checkpoint(path) or path.endswith((".pth", ".pt")):
        from .torch_checkpoint import load_torch_checkpoint
        state = load_torch_checkpoint(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state
    state = load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state
