"""numres's CUDA kernels built with g++ and run on the CPU, for checking them without a GPU.

:func:`build` compiles one kernel source under ``kernels/shim.h`` into a shared library;
:class:`ShimRuntime` launches kernels from it on NumPy arrays with the same argument checks
and launch shapes as the CuPy runtime, only with a small block budget so that the
grid-stride loops wrap around.  Install it with :func:`numres.cuda.runtime.use_host_runtime`
and the kernel ops in :mod:`numres.cuda` accept NumPy arrays::

    from numres.cuda import shim, runtime, conv
    with runtime.use_host_runtime(shim.ShimRuntime()):
        cols, out_hw = conv.im2col(x, (3, 3), (1, 1), (1, 1))     # x: a NumPy array

Running the threads one after another is exact for the map kernels: none uses shared memory,
barriers or atomics, and no thread reads what another writes.  The block kernels (shared memory
and ``__syncthreads``) run block by block, each block's threads as fibers that all meet at every
barrier before any goes on (see ``kernels/shim.h``); a divergent barrier is an error.
``reverse=True`` runs the threads in the opposite order, to show that results do not depend on
it; ``block_threads`` caps the threads per block of the block kernels (32 by default, to keep
the fibers cheap; a small number makes their per-thread loops wrap, as a large problem does on
the GPU, and the tests also run the GPU's 256).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import runtime, sources

_CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "double": ctypes.c_double}
_LIBRARIES: dict = {}
_BUILD_DIR = Path(tempfile.gettempdir()) / "numres-cuda-shim"


def compiler() -> str | None:
    return shutil.which("g++")


def build(unit: str) -> ctypes.CDLL:
    """Compile ``unit`` (``"im2col.cu"``, ...) with g++ under the shim and load it (built once per content)."""
    if unit not in _LIBRARIES:
        _LIBRARIES[unit] = build_text(sources.shim_source(unit), Path(unit).stem)
    return _LIBRARIES[unit]


def build_text(text: str, stem: str = "kernel") -> ctypes.CDLL:
    """Compile C++ ``text`` (which includes the shim header's text itself) into a library and load it;
    the library is cached on disk by content.  :func:`build` uses it, and tests of the shim build
    small kernels of their own with it."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    gxx = compiler()
    if gxx is None:
        raise RuntimeError("g++ is needed to run numres's CUDA kernels on the CPU")
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = _BUILD_DIR / f"{stem}-{digest}.cpp"
    library = source.with_suffix(".so")
    if not library.exists():
        source.write_text(text)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(
            [gxx, "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(partial),
             str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ could not build {stem} under the shim:\n{result.stderr}")
        partial.replace(library)        # atomic: a concurrent build never loads half a library
    return ctypes.CDLL(str(library))


CANARY_ELEMENTS = 64


def _canary_value(dtype):
    dtype = np.dtype(dtype)
    return np.nan if dtype.kind == "f" else np.iinfo(dtype).min if dtype.kind in "iu" else 0


def framed(values, canary=None):
    """A copy of ``values`` in the middle of a larger buffer whose margins hold a canary (NaN for
    floats): a kernel that reads outside the array picks up NaN, one that writes there is caught
    by :meth:`CanaryNumpy.check`."""
    values = np.asarray(values)
    canary = _canary_value(values.dtype) if canary is None else canary
    buffer = np.full(values.size + 2 * CANARY_ELEMENTS, canary, dtype=values.dtype)
    inner = buffer[CANARY_ELEMENTS:CANARY_ELEMENTS + values.size].reshape(values.shape)
    inner[...] = values
    return inner


class CanaryNumpy:
    """``numpy`` for the shim runtime, except that ``empty``/``empty_like`` allocate framed arrays
    (see :func:`framed`) and remember them, so every kernel output can be checked for writes
    outside its bounds."""

    def __init__(self):
        self._frames = []

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=float):
        array = framed(np.zeros(shape, dtype=dtype))
        array[...] = _canary_value(array.dtype)           # unwritten elements stay recognisable
        self._frames.append(array)
        return array

    def empty_like(self, prototype, dtype=None):
        return self.empty(prototype.shape, dtype or prototype.dtype)

    def check(self, entry):
        for array in self._frames:
            buffer = array.base
            margins = np.concatenate([buffer[:CANARY_ELEMENTS], buffer[-CANARY_ELEMENTS:]])
            expected = _canary_value(buffer.dtype)
            intact = np.isnan(margins).all() if buffer.dtype.kind == "f" else (margins == expected).all()
            if not intact:
                raise AssertionError(f"kernel {entry} wrote outside the bounds of an output array")
        self._frames = self._frames[-64:]


class ShimRuntime(runtime.Runtime):
    """Runs kernels on NumPy arrays, thread by thread, from the g++ build of their source.

    ``max_blocks`` is small by default so that grid-stride loops wrap around; outputs are
    framed by canaries (``canaries=True``) and checked after every launch.
    """

    def __init__(self, max_blocks: int = 3, reverse: bool = False, canaries: bool = True,
                 block_threads: int = 32):
        self.max_blocks = max_blocks
        self.block_threads = block_threads
        self.reverse = reverse
        self.xp = CanaryNumpy() if canaries else np
        self.launches = []          # (kernel entry, grid, block) of every launch, for tests to inspect

    def _run(self, kernel, dtype, grid, block, args):
        library = build(kernel.unit)
        entry = kernel.entry(dtype)
        function = getattr(library, f"numres_launch_{entry}")
        types = [ctypes.c_uint] * 6
        values = [*grid, *block]
        for (kind, _), value in zip(kernel.params, args):
            if kind.endswith("*"):
                types.append(ctypes.c_void_p)
                values.append(value.ctypes.data)
            elif kind == "T":
                types.append(ctypes.c_float if dtype == np.float32 else ctypes.c_double)
                values.append(float(value))
            else:
                types.append(_CTYPES[kind])
                values.append(float(value) if kind == "double" else int(value))
        function.argtypes = types
        function.restype = None
        library.numres_shim_set_order(int(self.reverse))
        function(*values)
        error = library.numres_shim_take_error()
        if error:
            raise RuntimeError(f"kernel {entry}: " + ("threads of one block diverged at __syncthreads (some returned "
                                                      "while others waited)" if error == 1 else
                                                      "__syncthreads in a kernel launched as a map"))
        self.launches.append((entry, grid, block))
        if isinstance(self.xp, CanaryNumpy):
            self.xp.check(entry)
