"""The one place that knows NumPy from CuPy.

Every array routine in numres is written once against an *array module* ``xp``
(``numpy`` or ``cupy``); this file finds that module, moves arrays between
backends and checks dtypes.  Nothing else in the package imports CuPy.

Backends are named by strings:

* ``"numpy"`` - the CPU; PyTorch's device name ``"cpu"`` is accepted as an alias.
* ``"cupy"``  - an NVIDIA GPU through CuPy; ``"cuda"`` is an alias, and so is
  ``"cuda:N"`` when N is CuPy's current device (numres computes on that one GPU).
  Asking for it where CuPy is not installed, or where no GPU can be used, raises
  :class:`BackendUnavailableError` saying which of the two is missing.

Every function here that takes a backend accepts the aliases (and a ``torch.device``);
:func:`normalize_backend` turns them into the canonical name, which is what modules
store and what :func:`backend_of` returns.

Extra backends (a test double of CuPy, for instance) can be added with
:func:`register_backend`.
"""
from __future__ import annotations

import numpy as np

SUPPORTED_DTYPES = ("float32", "float64")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def _load_numpy():
    return np


def _load_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend 'cupy' needs CuPy, which is not installed: "
            "pip install 'numres[cuda12]' (or 'numres[cuda13]')") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise BackendUnavailableError(
            f"backend 'cupy': CuPy is installed but no usable GPU was found ({exc})") from exc
    if count == 0:
        raise BackendUnavailableError("backend 'cupy': CuPy is installed but no GPU is visible")
    from .cuda import register_kernels      # numres's CUDA kernels for the ops that have one
    register_kernels("cupy")
    return cupy


_LOADERS = {"numpy": _load_numpy, "cupy": _load_cupy}
_MODULES: dict[str, object] = {}


def register_backend(name: str, loader) -> None:
    """Make ``backend=name`` available; ``loader()`` returns its array module."""
    _LOADERS[name] = loader
    _MODULES.pop(name, None)


DEVICE_ALIASES = {"cpu": "numpy", "cuda": "cupy"}


def _from_torch(value):
    """``torch.device('cuda:0')`` -> ``'cuda:0'`` and ``torch.float64`` -> ``'float64'``; anything else unchanged.

    Recognised by the type's module name, so numres never imports PyTorch for it."""
    if type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return value


def is_backend_name(name) -> bool:
    """True when ``name`` names a backend or a device alias (it may still be unavailable here)."""
    name = _from_torch(name)
    return isinstance(name, str) and (name in _LOADERS or name in DEVICE_ALIASES or name.startswith("cuda:"))


def normalize_backend(backend) -> str:
    """The canonical backend name: ``"cpu"`` -> ``"numpy"``, ``"cuda"`` -> ``"cupy"``, others unchanged.

    ``"cuda:N"`` is accepted for CuPy's current device only (numres runs on one GPU, the one
    CuPy has selected), so it needs a usable CuPy; another index is a ValueError that says how
    to select that GPU instead of silently computing on a different one.
    """
    name = _from_torch(backend)
    if not isinstance(name, str):
        raise TypeError(f"a backend is named by a string such as 'numpy', 'cupy', 'cpu' or 'cuda', "
                        f"got {type(backend).__name__}")
    if name in _LOADERS:
        return name
    if name in DEVICE_ALIASES:
        return DEVICE_ALIASES[name]
    if name.startswith("cuda:"):
        index = name[len("cuda:"):]
        if not index.isdigit():
            raise ValueError(f"unknown device {name!r}; a GPU is named 'cuda' or 'cuda:N' with N a number")
        cupy = get_xp("cupy")
        current = cupy.cuda.Device().id
        if int(index) != current:
            raise ValueError(f"device {name!r}: numres computes on CuPy's current GPU, which is cuda:{current}; "
                             f"select GPU {int(index)} first with cupy.cuda.Device({int(index)}).use(), "
                             f"then use backend 'cuda'")
        return "cupy"
    choices = sorted(_LOADERS) + sorted(DEVICE_ALIASES)
    raise ValueError(f"unknown backend {name!r}; choose one of {choices} ('cpu' and 'cuda' are aliases of "
                     f"'numpy' and 'cupy')")


def get_xp(backend: str = "numpy"):
    """The array module for ``backend`` (``numpy`` or ``cupy``, or an alias such as ``cpu``/``cuda``)."""
    if backend not in _LOADERS:
        backend = normalize_backend(backend)
    if backend not in _MODULES:
        _MODULES[backend] = _LOADERS[backend]()
    return _MODULES[backend]


def is_available(backend: str) -> bool:
    """True when ``get_xp(backend)`` would succeed."""
    try:
        get_xp(backend)
    except (BackendUnavailableError, ValueError):
        return False
    return True


def backend_of(array) -> str:
    """The name of the backend that owns ``array``."""
    for name, module in _MODULES.items():
        if name != "numpy" and isinstance(array, getattr(module, "ndarray", ())):
            return name
    if isinstance(array, np.ndarray):
        return "numpy"
    raise TypeError(f"expected an array, got {type(array).__name__}")


def xp_of(array):
    """The array module that owns ``array``."""
    return get_xp(backend_of(array))


def normalize_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the NumPy dtypes, or ``torch.float32``/``torch.float64``) as a ``np.dtype``.

    Anything else is a ValueError, and so is the string ``"float"``: NumPy reads it as float64
    and PyTorch (``torch.float``) as float32, so numres asks which one was meant.
    """
    dtype = _from_torch(dtype)
    if isinstance(dtype, str) and dtype == "float":
        raise ValueError("dtype 'float' is ambiguous (NumPy reads it as float64, PyTorch as float32); "
                         "say 'float32' or 'float64'")
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; numres computes in {' or '.join(SUPPORTED_DTYPES)}")
    return resolved


def to_numpy(array) -> np.ndarray:
    """A NumPy array holding the values of ``array`` (from any backend); copies off the GPU."""
    if isinstance(array, np.ndarray):
        return array
    for name, module in _MODULES.items():
        if name != "numpy" and isinstance(array, getattr(module, "ndarray", ())):
            return array.get()       # the device-to-host copy (CuPy's spelling)
    return np.asarray(array)


def asarray(array, backend: str = "numpy", dtype=None):
    """``array`` (any array-like, from any backend) as an array of ``backend``; copies only when needed."""
    xp = get_xp(backend)
    if not isinstance(array, xp.ndarray):
        array = to_numpy(array)
    return xp.asarray(array, dtype=dtype)


def convert(array, backend: str, dtype=None):
    """Like :func:`asarray`, but keeps the memory order of a permuted array (channels-last stays so)."""
    if array.ndim < 2:
        return asarray(array, backend, dtype)
    order = sorted(range(array.ndim), key=lambda axis: -array.strides[axis])
    inverse = sorted(range(array.ndim), key=lambda axis: order[axis])
    moved = asarray(array.transpose(order), backend, dtype)
    return get_xp(backend).ascontiguousarray(moved).transpose(inverse)


def synchronize(backend: str) -> None:
    """Wait for queued device work (a no-op on the CPU); benchmarks call it before reading a clock."""
    if normalize_backend(backend) == "cupy":
        get_xp("cupy").cuda.get_current_stream().synchronize()
