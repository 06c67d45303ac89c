"""Keep freed activation memory in the process instead of handing it back to the OS.

Every forward and backward pass allocates activation-sized arrays (tens of MB) and
frees them a moment later.  glibc's malloc returns such blocks to the kernel, and the
next allocation page-faults them back in, zeroed: thousands of page faults per
ResNet-50 step, about 7% of its time on a 2-core machine.  :func:`retain_freed_memory`
raises glibc's mmap and trim thresholds, so freed blocks are reused instead (the
process's resident size then stays near its peak, as with any caching allocator).

It changes a process-wide setting, so numres never calls it on import; ``numres train``
and the benchmarks call it, and a user may.  Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD = 32 * 2 ** 20     # glibc's ceiling on 64-bit systems


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MB for reuse; True when it accepted."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    accepted = mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD)
    accepted &= mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(accepted)
