"""Fully connected layer.

The same math as :mod:`numres.reference.linear`; the engine adds only the frozen-weight shortcut.

Forward::   y = x @ W^T + b          x: (..., in), W: (out, in), b: (out,)
Backward::  dx = dy @ W      dW = dy^T @ x      db = sum of dy over the leading axes

``dy^T @ x`` is the weight-gradient GEMM; a frozen weight (``need_weight_grad=False``) skips it.
An empty batch (no rows) gives an empty ``y`` and ``dx``, and zero ``dW`` and ``db`` (sums over nothing).
"""
from __future__ import annotations


def linear_forward(x, weight, bias=None):
    """``(y, cache)`` with ``y`` of shape ``(..., out_features)``."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache, need_input_grad=True, *, need_weight_grad=True):
    """``(dx, dweight, dbias)``; ``dbias`` is None without bias, ``dx`` and ``dweight`` None when not wanted."""
    x, weight, has_bias = cache
    rows_dy = dy.reshape(-1, dy.shape[-1])
    dweight = rows_dy.T @ x.reshape(-1, x.shape[-1]) if need_weight_grad else None
    dbias = rows_dy.sum(axis=0) if has_bias else None
    dx = dy @ weight if need_input_grad else None
    return dx, dweight, dbias
