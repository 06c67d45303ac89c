"""Fully connected layer, the textbook way.

Forward::   y = x @ W^T + b        x: (..., I),  W: (O, I),  b: (O,),  y: (..., O)

This is the same code as the engine's (:mod:`numres.functional.linear`): a GEMM is
already the fastest way to compute it, so the two tiers differ only in the prose.
"""
from __future__ import annotations


def linear_forward(x, weight, bias=None):
    """``(y, cache)`` with ``y = x @ weight.T + bias``; the cache is ``(x, weight, has_bias)``."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache, need_input_grad=True, *, need_weight_grad=True):
    """``(dx, dweight, dbias)`` from ``dy = dL/dy`` of shape (..., O).

    Derivation.  Flatten the leading axes into rows r, so ``x`` is (R, I) and ``dy`` is
    (R, O).  One output is ``y[r, o] = sum_i x[r, i] * W[o, i] + b[o]``, hence::

        dy[r, o]/dx[r, i] = W[o, i]      dy[r, o]/dW[o, i] = x[r, i]      dy[r, o]/db[o] = 1

    The chain rule sums over every output that the variable reaches:

        dx[r, i] = sum_o dy[r, o] * W[o, i]   ->  dx = dy @ W          (R, I)
        dW[o, i] = sum_r dy[r, o] * x[r, i]   ->  dW = dy^T @ x        (O, I)
        db[o]    = sum_r dy[r, o]             ->  db = dy.sum(rows)    (O,)

    ``need_input_grad=False`` / ``need_weight_grad=False`` skip ``dx`` / ``dW`` (returned as
    None); ``db`` is None when the layer has no bias.
    """
    x, weight, has_bias = cache
    dy_rows = dy.reshape(-1, dy.shape[-1])                 # (R, O)
    x_rows = x.reshape(-1, x.shape[-1])                    # (R, I)
    dx = dy @ weight if need_input_grad else None
    dweight = dy_rows.T @ x_rows if need_weight_grad else None
    dbias = dy_rows.sum(axis=0) if has_bias else None
    return dx, dweight, dbias
