"""How many threads NumPy's BLAS (OpenBLAS) uses, with or without threadpoolctl.

A GEMM split over a different number of threads may add its products in another order, so
the thread count is part of what makes a seeded run repeatable.  numres must therefore set it
the same way whether or not the optional ``threadpoolctl`` is installed: :func:`blas_threads`
uses threadpoolctl when it is there, and otherwise calls OpenBLAS's own
``openblas_set_num_threads`` (under the symbol names NumPy's bundled OpenBLAS uses) through
ctypes on the library NumPy has loaded.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import re

# (getter, setter) symbol pairs: NumPy's wheels ship scipy-openblas with prefixed names.
_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))


def _loaded_openblas() -> list:
    """Paths of the OpenBLAS libraries mapped into this process (Linux), NumPy's among them."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return []
    return sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", text)))


@functools.lru_cache(maxsize=1)
def _openblas_controls():
    """``(get, set)`` ctypes functions of the loaded OpenBLAS, or None (found once)."""
    for path in _loaded_openblas():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for getter, setter in _SYMBOLS:
            get, set_ = getattr(library, getter, None), getattr(library, setter, None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


@contextlib.contextmanager
def _ctypes_limit(count: int):
    controls = _openblas_controls()
    if controls is None:
        raise RuntimeError("cannot set the BLAS thread count: threadpoolctl is not installed and NumPy's BLAS "
                           "is not an OpenBLAS numres can find (pip install threadpoolctl)")
    get, set_ = controls
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)


def current_blas_threads():
    """How many threads NumPy's OpenBLAS uses now (one ctypes call), or None when it cannot be told."""
    controls = _openblas_controls()
    return None if controls is None else int(controls[0]())


def blas_threads(count: int):
    """A context in which NumPy's BLAS uses ``count`` threads (threadpoolctl, else OpenBLAS through ctypes)."""
    if count < 1:
        raise ValueError(f"the BLAS thread count must be at least 1, got {count}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _ctypes_limit(count)
    return threadpool_limits(count, user_api="blas")
