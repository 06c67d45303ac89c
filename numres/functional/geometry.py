"""Sliding-window shape arithmetic shared by convolution, pooling and padding.

These functions only read and check arguments and compute output sizes; no array work.
"""
from __future__ import annotations

import operator


def pair(value, name="value", minimum=0):
    """``3 -> (3, 3)``; ``(3,) -> (3, 3)``; a 2-sequence passes through.

    Each entry must be an integer of at least ``minimum`` (1 for kernel sizes, strides and
    dilations, 0 for padding); anything else is a clear ValueError/TypeError naming ``name``.
    """
    entries = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(entries) not in (1, 2):
        raise ValueError(f"{name} must be an int or a sequence of 1 or 2 ints, got {value!r}")
    try:
        entries = tuple(operator.index(entry) for entry in entries)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of 1 or 2 ints, got {value!r}") from None
    if any(entry < minimum for entry in entries):
        rule = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f"at least {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return entries * 2 if len(entries) == 1 else entries



def output_size(size, kernel, stride, padding, dilation, ceil_mode=False):
    """Length of a sliding-window output along one axis, as PyTorch computes it."""
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    if room < 0:
        raise ValueError(
            f"input size {size} (padded by {padding} each side) is smaller than the "
            f"kernel's extent {span}")
    if ceil_mode:
        out = -(-room // stride) + 1
        # The last window must start inside the input or the left padding.
        if (out - 1) * stride >= size + padding:
            out -= 1
        return out
    return room // stride + 1
