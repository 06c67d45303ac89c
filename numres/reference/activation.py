"""ReLU and the residual join, the textbook way.

Forward::    y = max(x, 0)
Backward::   dx = dy * [y > 0]

The residual join at the end of every ResNet block is ``y = max(x + identity, 0)``:
the same ReLU after a plain sum, whose backward hands the same gradient to both
summands.  The engine (:mod:`numres.functional.activation`) computes the same
values in cache-sized tiles on all cores; here each is one array expression.
"""
from __future__ import annotations

from ..backend import xp_of


def relu_forward(x):
    """``(y, cache)`` with ``y = max(x, 0)``.  The cache is ``y`` itself: the mask ``[y > 0]``
    is all that backward needs, and the next layer keeps ``y`` anyway."""
    y = xp_of(x).maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """dL/dx of ``y = relu(x)``, given ``dy = dL/dy`` and the forward's output ``y``.

    Derivation.  ``y`` is elementwise, ``y[k] = max(x[k], 0)``, so each ``y[k]`` depends
    on ``x[k]`` alone and the chain rule has one term per element::

        dL/dx[k] = dL/dy[k] * dy[k]/dx[k]
        dy[k]/dx[k] = 1 if x[k] > 0 else 0          (0 at x = 0, as PyTorch chooses)

    ``x[k] > 0`` exactly when ``y[k] > 0``, so the mask can be read from the output::

        dx = dy * [y > 0]
    """
    return dy * (y > 0)


def add_relu_forward(x, identity):
    """``max(x + identity, 0)``: the residual join.  Only the output is returned (it is the cache
    of :func:`relu_backward`, which gives the gradient of the sum)."""
    y, _ = relu_forward(x + identity)
    return y


def add(a, b):
    """``a + b``: two gradients that meet where the forward pass forked (a residual block's input
    feeds both the branch and the shortcut, so dL/dx is the sum of both paths' gradients)."""
    return a + b
