"""Is NumPy's BLAS using this CPU's vector units?  A slow, generic GEMM kernel named, with the fix.

OpenBLAS picks its kernel for the CPU when it is loaded (``DYNAMIC_ARCH``).  An OpenBLAS older
than the CPU does not recognise it and falls back to a generic kernel: NumPy 1.26's OpenBLAS runs
its SSE3 "Prescott" kernel on recent Xeons, about 4x slower than the AVX-512 one (47 against
200 GFLOP/s measured on a 2-core AVX-512 Xeon).  Every convolution in numres is a GEMM, so a
training run is then several times slower than it need be, and nothing else says why.

:func:`slow_blas_warning` compares the kernel the loaded OpenBLAS reports (``openblas_get_corename``,
read through threadpoolctl when it is installed, else through ctypes) with the CPU's own flags
(``/proc/cpuinfo``), and returns one line naming both and the two fixes: a newer NumPy, or
``OPENBLAS_CORETYPE`` set before NumPy is loaded.  ``numres train`` prints it first; the
benchmarks can record it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re

import numpy

__all__ = ["cpu_flags", "vector_extension", "blas_kernel", "slow_blas_warning", "GENERIC_KERNELS"]

# OpenBLAS core names whose kernels use neither AVX2 nor AVX-512 (lower case).
GENERIC_KERNELS = frozenset({"generic", "katmai", "coppermine", "northwood", "prescott", "banias", "core2",
                             "penryn", "dunnington", "nehalem", "atom", "sandybridge", "opteron", "barcelona",
                             "bobcat", "bulldozer", "piledriver", "steamroller", "excavator"})
# The kernel to ask for, by the widest vector extension the CPU has.
CORETYPE_FOR = {"AVX-512": "SkylakeX", "AVX2": "Haswell"}
_CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                     "openblas_get_corename")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return frozenset()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def vector_extension(flags=None) -> str | None:
    """``"AVX-512"``, ``"AVX2"`` or None: the widest of the two that the CPU has."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return None


def _corename_by_ctypes() -> str | None:
    try:
        from .blas import _loaded_openblas
        paths = _loaded_openblas()
    except Exception:                   # the lookup is a courtesy: never let it stop a run
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _CORENAME_SYMBOLS:
            function = getattr(library, symbol, None)
            if function is not None:
                function.restype = ctypes.c_char_p
                name = function()
                return name.decode(errors="replace").strip() if name else None
    return None


def blas_kernel() -> str | None:
    """The kernel NumPy's OpenBLAS runs (``"SkylakeX"``, ``"Haswell"``, ``"Prescott"``...), or None when
    NumPy's BLAS is not an OpenBLAS or does not say."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return _corename_by_ctypes()
    for library in threadpool_info():
        if library.get("internal_api") == "openblas" and library.get("architecture"):
            return str(library["architecture"])
    return _corename_by_ctypes()


def slow_blas_warning(kernel=None, flags=None) -> str | None:
    """One line when NumPy's OpenBLAS runs a generic kernel on a CPU with AVX2 or AVX-512, else None.

    ``kernel`` and ``flags`` default to what this machine reports (tests pass their own)."""
    kernel = blas_kernel() if kernel is None else kernel
    extension = vector_extension(flags)
    if not kernel or extension is None or kernel.lower() not in GENERIC_KERNELS:
        return None
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    if chosen:                          # the user chose it (OpenBLAS may report another name for it)
        return (f"note: OPENBLAS_CORETYPE={chosen} makes NumPy's OpenBLAS run its generic '{kernel}' kernel on "
                f"this CPU, which has {extension}: matrix products run several times slower than they could. Fix: "
                f"OPENBLAS_CORETYPE={CORETYPE_FOR[extension]}, or leave it unset")
    return (f"note: NumPy {numpy.__version__}'s OpenBLAS runs its generic '{kernel}' kernel on this CPU, which has "
            f"{extension}: matrix products (every convolution) run several times slower than they could. Fix: "
            f"pip install -U numpy (a newer OpenBLAS knows the CPU), or start with "
            f"OPENBLAS_CORETYPE={CORETYPE_FOR[extension]} in the environment")
