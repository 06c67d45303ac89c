"""The suite's one error measure, shared by every helper that compares two arrays.

``rel_err(actual, expected) = max|actual - expected| / max|expected|`` over one tensor (the
absolute difference when ``expected`` is all zeros).  It never returns NaN: a NaN or an infinity
on either side, NaN on both sides included, gives ``inf``, so a check ``rel_err(...) < tol`` fails
and ``max()`` over a collection of errors cannot drop it (Python's ``max`` skips a NaN that does not
come first; it never skips ``inf``).  ``worst`` picks the largest error of a dict the same way.

One opt-in exception, ``allow_matching_inf=True``: a max-pool window lying wholly in padding
outputs ``-inf`` in numres and in PyTorch alike.  With the flag, infinities of the same sign at the
same positions on both sides are accepted and the error is taken over the remaining entries.  A NaN
still fails, and so does an infinity on one side only.

Nothing here imports numres or torch: the MPI scripts in tests/distributed/ use it as well.
"""
from __future__ import annotations

import math

import numpy as np


def host_array(value) -> np.ndarray:
    """A float64 NumPy copy of ``value``: a NumPy array, a torch tensor, a CuPy array or a number."""
    if hasattr(value, "detach"):                       # torch.Tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        value = value.get()
    return np.array(value, dtype=np.float64)


def rel_err(actual, expected, *, allow_matching_inf: bool = False) -> float:
    """``max|actual - expected| / max|expected|``; ``inf`` for any NaN or infinity (see the module).

    Shapes must agree exactly (never broadcast); a mismatch raises AssertionError naming both.
    """
    a, b = host_array(actual), host_array(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape} vs expected {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        return math.inf
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not (finite_a.all() and finite_b.all()):
        if not allow_matching_inf:
            return math.inf
        if not np.array_equal(finite_a, finite_b) or not np.array_equal(a[~finite_a], b[~finite_b]):
            return math.inf
        a, b = a[finite_a], b[finite_b]
    scale = float(np.abs(b).max(initial=0.0))
    with np.errstate(over="ignore"):                   # a - b may overflow: that is inf, a failure
        diff = float(np.abs(a - b).max(initial=0.0))
    error = diff / scale if scale else diff
    return error if math.isfinite(error) else math.inf


def worst(errors: dict) -> tuple:
    """``(name, error)`` of the largest error; a NaN (which rel_err never gives) counts as ``inf``."""
    if not errors:
        raise ValueError("no errors to judge: nothing was compared")
    cleaned = {name: (math.inf if math.isnan(error) else float(error)) for name, error in errors.items()}
    name = max(cleaned, key=cleaned.get)
    return name, cleaned[name]


def max_error(errors) -> float:
    """The largest of ``errors`` (any iterable of numbers); NaN counts as ``inf``; empty is an error."""
    values = [math.inf if math.isnan(e) else float(e) for e in errors]
    if not values:
        raise ValueError("no errors to judge: nothing was compared")
    return max(values)
