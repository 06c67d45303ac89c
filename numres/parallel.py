"""Tiled, threaded execution of array code on the CPU.

NumPy runs each elementwise operation on one core and streams whole arrays
through memory, one operation at a time.  Two cheap changes help a lot:

* **tiles** - run a short chain of operations (normalise, scale, shift, ReLU)
  on a block of rows small enough to stay in cache, then move to the next block,
  so each array crosses main memory once instead of once per operation;
* **threads** - NumPy releases the GIL inside large operations, so blocks of rows
  can be processed on every core at once.

:func:`map_tiles` gives a function one slice of rows at a time and returns the
per-tile results in order (reductions then add the partial results in a fixed
order, so the answer does not depend on thread timing).  On a GPU backend the
whole array is one tile: the GPU is already parallel.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TILE_ELEMENTS = 1 << 16        # 256 KiB of float32: a chain of temporaries stays in the L2 cache

_threads = max(1, int(os.environ.get("NUMRES_NUM_THREADS", os.cpu_count() or 1)))
_pool: ThreadPoolExecutor | None = None
_THREAD_PREFIX = "numres-worker"


def get_num_threads() -> int:
    return _threads


def set_num_threads(count: int) -> None:
    """Use ``count`` threads for numres's own elementwise work (BLAS has its own setting)."""
    global _threads, _pool
    if count < 1:
        raise ValueError(f"thread count must be positive, got {count}")
    _threads = int(count)
    if _pool is not None:
        _pool.shutdown()
        _pool = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, _threads - 1), thread_name_prefix=_THREAD_PREFIX)
    return _pool


def _in_pool() -> bool:
    """True on one of numres's own worker threads: nested work runs there serially (waiting on
    the pool from inside it could deadlock)."""
    return threading.current_thread().name.startswith(_THREAD_PREFIX)


def tiles(rows: int, row_elements: int, tile_elements: int | None = None) -> list[slice]:
    """Consecutive row slices covering ``range(rows)``, each about ``tile_elements`` elements."""
    tile_elements = tile_elements or TILE_ELEMENTS
    tile_rows = max(1, tile_elements // max(1, row_elements))
    return [slice(start, min(start + tile_rows, rows)) for start in range(0, rows, tile_rows)]


def map_tiles(function, rows: int, row_elements: int, xp=np, tile_elements: int | None = None) -> list:
    """``[function(tile) for tile in tiles(...)]``, run on the thread pool for NumPy arrays.

    ``function`` receives a ``slice`` of rows and must only write rows inside it.
    Each thread takes one contiguous run of tiles; the calling thread works on the first run
    itself rather than wait idle, so the pool holds one thread fewer than ``get_num_threads()``.
    """
    if xp is not np:
        return [function(slice(0, rows))]
    parts = tiles(rows, row_elements, tile_elements)
    workers = min(_threads, len(parts))
    if workers <= 1 or _in_pool():
        return [function(part) for part in parts]
    per_worker = -(-len(parts) // workers)
    runs = [parts[i:i + per_worker] for i in range(0, len(parts), per_worker)]
    work = lambda run: [function(part) for part in run]           # noqa: E731
    others = [_executor().submit(work, run) for run in runs[1:]]
    results = work(runs[0])
    for future in others:
        results.extend(future.result())
    return results


def run_parts(function, count: int) -> list:
    """``[function(index) for index in range(count)]``, part 0 on the calling thread and the others on
    numres's pool (serially when called from the pool itself); results in order."""
    if count <= 1 or _in_pool():
        return [function(index) for index in range(count)]
    others = [_executor().submit(function, index) for index in range(1, count)]
    results = [function(0)]
    results.extend(future.result() for future in others)
    return results
