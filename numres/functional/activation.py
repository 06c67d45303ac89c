"""ReLU and the residual join.

ReLU::   y = max(x, 0)          dx = dy * [y > 0]

The mask is read from the *output*, which the next layer keeps anyway, so ReLU
saves nothing of its own.  (PyTorch also gives x = 0 a zero gradient.)
"""
from __future__ import annotations

from ..backend import xp_of


def relu_forward(x):
    """``(y, cache)``; the cache is ``y`` itself."""
    y = xp_of(x).maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """``dx = dy`` where the output was positive, else 0."""
    return dy * (y > 0)


def add_relu_forward(x, identity):
    """The end of a residual block: ``y = max(x + identity, 0)``, computed in ``x``'s memory.

    The backward is :func:`relu_backward`; the same gradient then flows to both summands.
    """
    x += identity
    xp_of(x).maximum(x, 0, out=x)
    return x
