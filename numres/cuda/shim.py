"""numres's CUDA kernels built with g++ and run on the CPU, for checking them without a GPU.

:func:`build` compiles one kernel source under ``kernels/shim.h`` into a shared library;
:class:`ShimRuntime` launches kernels from it on NumPy arrays with the same argument checks
and launch shapes as the CuPy runtime, only with a small block budget so that the
grid-stride loops wrap around.  Install it with :func:`numres.cuda.runtime.use_host_runtime`
and the kernel ops in :mod:`numres.cuda` accept NumPy arrays::

    from numres.cuda import shim, runtime, conv
    with runtime.use_host_runtime(shim.ShimRuntime()):
        cols, out_hw = conv.im2col(x, (3, 3), (1, 1), (1, 1))     # x: a NumPy array

Running the threads one after another is exact for these kernels: none uses shared memory,
barriers or atomics, and no thread reads what another writes.  ``reverse=True`` runs the
threads in the opposite order, to show that results do not depend on it.
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
    """Compile ``unit`` (``"im2col.cu"``, ...) with g++ under the shim and load it (cached by content)."""
    text = sources.shim_source(unit)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if digest in _LIBRARIES:
        return _LIBRARIES[digest]
    gxx = compiler()
    if gxx is None:
        raise RuntimeError("g++ is needed to run numres's CUDA kernels on the CPU")
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = _BUILD_DIR / f"{Path(unit).stem}-{digest}.cpp"
    library = source.with_suffix(".so")
    if not library.exists():
        source.write_text(text)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(
            [gxx, "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(partial),
             str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ could not build {unit} under the shim:\n{result.stderr}")
        partial.replace(library)        # atomic: a concurrent build never loads half a library
    _LIBRARIES[digest] = ctypes.CDLL(str(library))
    return _LIBRARIES[digest]


class ShimRuntime(runtime.Runtime):
    """Runs kernels on NumPy arrays, thread by thread, from the g++ build of their source."""

    xp = np

    def __init__(self, max_blocks: int = 3, reverse: bool = False):
        self.max_blocks = max_blocks
        self.reverse = reverse
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
        self.launches.append((entry, grid, block))
