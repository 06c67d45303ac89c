"""Launching numres's kernels: on a GPU through CuPy, or on the CPU through the g++ shim.

Every kernel is a 2-D map (x over columns, y over rows) walked with grid-stride loops, so a
launch only needs a grid that is big enough to keep the device busy: :func:`map_shape` picks
it.  A *runtime* supplies the array module for allocations and the ``launch`` that runs a
kernel; the op wrappers in this package pick one from the type of their input array
(:func:`runtime_for`):

* a ``cupy.ndarray`` -> :class:`CupyRuntime` (RawModule per source file, compiled once);
* a ``numpy.ndarray`` -> the host runtime installed with :func:`use_host_runtime` (the tests
  install :class:`numres.cuda.shim.ShimRuntime`), else none, and the ops fall back to the
  generic code.

Arguments are converted from the signature table in :mod:`numres.cuda.sources`, and every
array argument's dtype is checked before the launch, so a mismatch is a clear Python error
instead of a kernel reading garbage.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from . import sources

INT32_MAX = 2**31 - 1
BLOCK_THREADS = 256

_SCALARS = {"int": np.int32, "long long": np.int64, "double": np.float64}
_POINTER_DTYPES = {"int": np.dtype(np.int32), "long long": np.dtype(np.int64), "double": np.dtype(np.float64)}


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def map_shape(rows: int, cols: int, max_blocks: int):
    """``(grid, block)`` for a kernel mapping ``rows x cols``: 32 threads across columns where there
    are that many (coalesced accesses), up to 256 per block, and at most ``max_blocks`` blocks
    (grid-stride loops cover the rest)."""
    rows, cols = max(1, int(rows)), max(1, int(cols))
    bx = min(32, _pow2_at_least(cols))
    by = max(1, min(BLOCK_THREADS // bx, _pow2_at_least(rows)))
    gx = min(-(-cols // bx), max_blocks)
    gy = min(-(-rows // by), max(1, max_blocks // gx))
    return (gx, gy, 1), (bx, by, 1)


def block_shape(items: int, threads: int, max_blocks: int, max_threads: int = BLOCK_THREADS):
    """``(grid, block)`` for a block kernel: one block per item (at most ``max_blocks``; the kernel's
    grid-stride loop over blocks covers the rest) with a power-of-two number of threads, enough for
    ``threads`` values per item where possible, at most ``max_threads`` (the kernel loops over the rest)."""
    threads = min(_pow2_at_least(max(1, int(threads))), _pow2_floor(max_threads))
    return (max(1, min(int(items), int(max_blocks))), 1, 1), (threads, 1, 1)


def _pow2_floor(value: int) -> int:
    return 1 << (max(1, int(value)).bit_length() - 1)


def check_extent(value: int, what: str) -> int:
    """Kernels index each dimension with 32-bit ints; refuse extents that would overflow them."""
    if value > INT32_MAX - (1 << 24):
        raise ValueError(f"{what} = {value} is too large for numres's CUDA kernels (32-bit indices)")
    return int(value)


def element_strides(array) -> tuple:
    """Strides of ``array`` in elements (the kernels index with them); negative strides are refused."""
    strides = tuple(s // array.itemsize for s in array.strides)
    if any(s < 0 for s in strides) or any(s % array.itemsize for s in array.strides):
        raise ValueError(f"array with strides {array.strides} cannot be passed to a numres kernel")
    return strides


class Runtime:
    """Base: converts arguments and checks them; subclasses implement ``_run``."""

    xp = None
    max_blocks = 1
    block_threads = BLOCK_THREADS       # threads per block of a block kernel (a power of two)

    def launch(self, name: str, dtype, rows: int, cols: int, args: tuple, max_blocks: int | None = None):
        """Run kernel ``name`` for ``dtype`` over a ``rows x cols`` map; returns the ``(grid, block)`` used.

        For a block kernel, ``cols`` is the number of items (one block each) and ``rows`` the number of
        values each item's threads reduce.  ``max_blocks`` lowers the block budget below the
        runtime's (never above it).
        """
        kernel = sources.KERNELS[name]
        dtype = np.dtype(dtype)
        if len(args) != len(kernel.params):
            raise TypeError(f"{name} takes {len(kernel.params)} arguments, got {len(args)}")
        converted = [self._argument(kind, param, value, dtype, name) for (kind, param), value in
                     zip(kernel.params, args)]
        if kernel.layout == "block":
            grid, block = block_shape(cols, rows, self.budget(max_blocks), self.block_threads)
        else:
            grid, block = map_shape(rows, cols, self.budget(max_blocks))
        self._run(kernel, dtype, grid, block, converted)
        return grid, block

    def budget(self, max_blocks=None) -> int:
        return self.max_blocks if max_blocks is None else max(1, min(self.max_blocks, int(max_blocks)))

    def _argument(self, kind, param, value, dtype, name):
        if kind.endswith("*"):
            base = kind.replace("const", "").replace("*", "").strip()
            expected = dtype if base == "T" else _POINTER_DTYPES[base]
            if not isinstance(value, self.xp.ndarray):
                raise TypeError(f"{name}: argument {param} must be a {self.xp.__name__}.ndarray, "
                                f"got {type(value).__name__}")
            if value.dtype != expected:
                raise TypeError(f"{name}: argument {param} must have dtype {expected}, got {value.dtype}")
            return value
        if kind == "T":
            return dtype.type(value)
        if kind == "int" and not -INT32_MAX - 1 <= int(value) <= INT32_MAX:
            raise ValueError(f"{name}: argument {param} = {value} does not fit a 32-bit int")
        return _SCALARS[kind](value)

    def _run(self, kernel, dtype, grid, block, args):
        raise NotImplementedError


class CupyRuntime(Runtime):
    """Launches on the current CUDA device; one RawModule per source file, compiled on first use."""

    def __init__(self):
        import cupy
        self.xp = cupy
        device = cupy.cuda.Device()
        self.max_blocks = 32 * int(device.attributes["MultiProcessorCount"])
        self._modules = {}

    def module(self, unit: str):
        if unit not in self._modules:
            self._modules[unit] = self.xp.RawModule(code=sources.cuda_source(unit), options=("-std=c++17",))
        return self._modules[unit]

    def _run(self, kernel, dtype, grid, block, args):
        function = self.module(kernel.unit).get_function(kernel.entry(dtype))
        function(grid, block, tuple(args))


_cupy_runtime: CupyRuntime | None = None
_host = threading.local()


def cupy_runtime() -> CupyRuntime:
    global _cupy_runtime
    if _cupy_runtime is None:
        _cupy_runtime = CupyRuntime()
    return _cupy_runtime


@contextlib.contextmanager
def use_host_runtime(runtime):
    """Within this block, the kernel ops run on NumPy arrays through ``runtime`` (a CPU shim)."""
    previous = getattr(_host, "runtime", None)
    _host.runtime = runtime
    try:
        yield runtime
    finally:
        _host.runtime = previous


def runtime_for(array):
    """The runtime for ``array``'s backend, or None (the caller then uses the generic op)."""
    module = type(array).__module__
    if module.startswith("cupy"):
        return cupy_runtime()
    if isinstance(array, np.ndarray):
        return getattr(_host, "runtime", None)
    return None


def supports(array) -> bool:
    """True when a kernel can handle ``array``: a runtime exists and its dtype is float32/float64."""
    return runtime_for(array) is not None and np.dtype(array.dtype).name in sources.DTYPES
