"""NumPy's BLAS seen from numres: its thread count, its worker threads' spin, and its CBLAS GEMM.

A GEMM split over a different number of threads may add its products in another order, so
the thread count is part of what makes a seeded run repeatable.  numres must therefore set it
the same way whether or not the optional ``threadpoolctl`` is installed: :func:`blas_threads`
uses threadpoolctl when it is there, and otherwise calls OpenBLAS's own
``openblas_set_num_threads`` (under the symbol names NumPy's bundled OpenBLAS uses) through
ctypes on the library NumPy has loaded.

Spinning workers.  After each threaded call, OpenBLAS's worker threads busy-wait for
``2**OPENBLAS_THREAD_TIMEOUT`` cycles (default 2**28, about 0.1 s) before they sleep, and on a
small machine that spin takes the cores from numres's own threads (BatchNorm, im2col, ReLU run
between GEMMs).  OpenBLAS reads the variable once, when it is loaded, so numres's default of 4
(``numres/__init__.py``) used to help only when numres was imported before NumPy.
:func:`settle_thread_timeout` (run when this module is imported) makes it independent of the
order: where the loaded OpenBLAS holds another value, it re-reads its environment
(``openblas_read_env``) and shuts its thread server down (``blas_thread_shutdown_``, what
OpenBLAS's own fork handler calls); the next threaded call starts the workers again, with the new
timeout.  Where the library lacks those entry points it warns once, with the fix.

CBLAS GEMM.  :func:`cblas_gemm` finds ``cblas_sgemm``/``cblas_dgemm`` in the same library
(scipy-openblas's prefixed ILP64 names first; MKL exports the plain names), for the callers that
need what ``numpy.matmul`` lacks: ``beta = 1`` (accumulate into the output) and leading
dimensions (operate on a block of rows and columns of a larger matrix without copying it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
import warnings

# (getter, setter) symbol pairs: NumPy's wheels ship scipy-openblas with prefixed names.
_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))


def _loaded_libraries(pattern: str) -> list:
    """Paths of the shared libraries mapped into this process (Linux) whose path matches ``pattern``."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return []
    return sorted({path for path in re.findall(r"(/\S*\.so\S*)", text) if re.search(pattern, path.lower())})


def _loaded_openblas() -> list:
    """Paths of the OpenBLAS libraries mapped into this process (Linux), NumPy's among them."""
    return _loaded_libraries(r"openblas[^/]*$")


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


# --- the worker threads' spin: the same whatever the import order -----------------------------------

DEFAULT_THREAD_TIMEOUT = "4"     # numres/__init__.py sets the same default in the environment


def settle_thread_timeout(wanted=None) -> list:
    """Make every loaded OpenBLAS use ``OPENBLAS_THREAD_TIMEOUT = wanted`` (default: the environment's
    value, else 4), even when it was loaded before the variable was set; returns the paths changed.

    OpenBLAS keeps the value it read at load time (``openblas_thread_timeout()``) and applies it
    when it starts its worker threads.  Where that differs, the variable is put in the environment,
    ``openblas_read_env()`` reads it again, and ``blas_thread_shutdown_()`` stops the workers (they
    restart, with the new timeout, at the next threaded call).  Call it with no BLAS call running on
    another thread: numres does so once, when it is imported.  A library without those entry
    points gets one warning that says how to set the variable instead.
    """
    wanted = str(wanted if wanted is not None else os.environ.get("OPENBLAS_THREAD_TIMEOUT", DEFAULT_THREAD_TIMEOUT))
    if not wanted.strip().isdigit():
        return []
    changed = []
    for path in _loaded_openblas():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        current = getattr(library, "openblas_thread_timeout", None)
        read_env = getattr(library, "openblas_read_env", None)
        shutdown = getattr(library, "blas_thread_shutdown_", None)
        if current is None:
            continue                                     # not a threaded OpenBLAS we can ask
        current.restype = ctypes.c_uint
        if int(current()) == int(wanted):
            continue
        if read_env is None or shutdown is None:
            warnings.warn(f"the OpenBLAS at {path} was loaded before OPENBLAS_THREAD_TIMEOUT={wanted} was set, "
                          "and numres cannot change it now, so its worker threads spin after every GEMM; set "
                          f"OPENBLAS_THREAD_TIMEOUT={wanted} in the environment or import numres before NumPy",
                          RuntimeWarning, stacklevel=2)
            continue
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = wanted
        read_env()
        shutdown()
        changed.append(path)
    return changed


# --- CBLAS GEMM with beta and leading dimensions ------------------------------------------------------

# (single, double, 64-bit integers): NumPy's scipy-openblas wheels first, then plain CBLAS (OpenBLAS, MKL).
CBLAS_GEMM_SYMBOLS = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
                      ("cblas_sgemm64_", "cblas_dgemm64_", True),
                      ("scipy_cblas_sgemm", "scipy_cblas_dgemm", False),
                      ("cblas_sgemm", "cblas_dgemm", False))
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112       # CBLAS enum values


class CblasGemm:
    """``C = alpha * op(A) @ op(B) + beta * C`` on raw pointers, single and double precision.

    ``gemm(dtype, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`` with row-major
    operands given as addresses (``array.ctypes.data`` plus a byte offset), leading dimensions in
    elements.  ctypes releases the GIL for the call.
    """

    def __init__(self, path, single, double, ilp64):
        self.path, self.symbols, self.ilp64 = path, (single.__name__, double.__name__), ilp64
        integer = ctypes.c_int64 if ilp64 else ctypes.c_int
        for function, real in ((single, ctypes.c_float), (double, ctypes.c_double)):
            function.restype = None
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real,
                                 ctypes.c_void_p, integer, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]
        self._functions = {"float32": single, "float64": double}

    def function(self, dtype):
        """The raw ctypes function for ``dtype`` (float32 or float64), or None."""
        import numpy
        return self._functions.get(numpy.dtype(dtype).name)

    def __call__(self, dtype, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        self.function(dtype)(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS,
                                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


@functools.lru_cache(maxsize=1)
def cblas_gemm():
    """The :class:`CblasGemm` of the BLAS NumPy loaded (OpenBLAS or MKL), or None where none is found."""
    for path in _loaded_libraries(r"(openblas|mkl_rt|libmkl|libcblas|libblas)[^/]*$"):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for single, double, ilp64 in CBLAS_GEMM_SYMBOLS:
            s, d = getattr(library, single, None), getattr(library, double, None)
            if s is not None and d is not None:
                return CblasGemm(path, s, d, ilp64)
    return None


# --- single-threaded BLAS around numres's own parallel sections -------------------------------------------

_section_lock = threading.Lock()
_section = {"depth": 0, "saved": None}


def single_threaded_blas_available() -> bool:
    """True when numres can set OpenBLAS's thread count (:func:`single_threaded_blas`)."""
    return _openblas_controls() is not None


@contextlib.contextmanager
def single_threaded_blas():
    """Inside the block NumPy's OpenBLAS runs every call on one thread; on leaving, its count is restored.

    What numres's own parallel sections use: each of numres's threads runs single-threaded GEMMs
    on its share of the rows, where one multi-threaded GEMM of a thin matrix would synchronise its
    threads once per block of K.  OpenBLAS's thread count is one setting for the whole process
    (its ``openblas_set_num_threads_local`` sets the same global in a pthreads build), so sections
    entered from several threads at once share one saved count: the first to enter saves it and
    sets 1, the last to leave restores it.  A BLAS call on another thread meanwhile also runs on
    one thread.  Raises where numres cannot set the count (:func:`single_threaded_blas_available`).
    """
    controls = _openblas_controls()
    if controls is None:
        raise RuntimeError("numres cannot set this BLAS's thread count (not an OpenBLAS it can find)")
    get, set_ = controls
    with _section_lock:
        if _section["depth"] == 0:
            _section["saved"] = get()
            set_(1)
        _section["depth"] += 1
    try:
        yield
    finally:
        with _section_lock:
            _section["depth"] -= 1
            if _section["depth"] == 0:
                set_(_section["saved"])


settle_thread_timeout()
