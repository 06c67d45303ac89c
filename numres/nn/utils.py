"""``torch.nn.utils``'s gradient clipping, on the ``grad`` arrays of numres Parameters.

* :func:`clip_grad_norm_` - the norm of all gradients together, as if concatenated into one vector:
  ``total = || (||g_1||_p, ..., ||g_k||_p) ||_p`` (``p = inf``: the largest ``|g|``).  Every gradient
  is then multiplied by ``min(1, max_norm / (total + 1e-6))``; the call returns ``total``.
* :func:`clip_grad_value_` - each gradient element clamped into ``[-clip_value, clip_value]``.
* :func:`get_total_norm` and :func:`clip_grads_with_norm_` - the two halves of ``clip_grad_norm_``.

Parameters without a gradient (``grad is None``) are skipped.  Everything stays on the gradients'
backend: the norm is a 0-d array there, and the scale is applied without reading it back to the
host (on a GPU nothing is synchronised) - except with ``error_if_nonfinite=True``, which has to look.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend as B
from .module import Parameter

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]

EPS = 1e-6      # added to the total norm before dividing, as PyTorch does


def _as_list(parameters, what):
    if isinstance(parameters, Parameter) or hasattr(parameters, "ndim"):
        parameters = [parameters]
    try:
        parameters = list(parameters)
    except TypeError:
        raise TypeError(f"{what} takes a Parameter or an iterable of Parameters, got "
                        f"{type(parameters).__name__}") from None
    return parameters


def _grads(parameters, what):
    grads = []
    for p in _as_list(parameters, what):
        if not isinstance(p, Parameter):
            raise TypeError(f"{what} takes numres Parameters (with .grad), got {type(p).__name__}")
        if p.grad is not None:
            grads.append(p.grad)
    backends = {B.backend_of(g) for g in grads}
    if len(backends) > 1:
        raise ValueError(f"{what}: the gradients are on several backends ({', '.join(sorted(backends))})")
    return grads


def _norm_order(norm_type):
    if isinstance(norm_type, str):
        if norm_type.lower() != "inf":
            raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}")
        return math.inf
    return float(norm_type)


def _vector_norm(xp, v, order):
    """``||v||_order`` of a flat array: ``max |v|`` for inf, ``(sum |v|^p)^(1/p)`` otherwise."""
    if order == math.inf:
        return xp.abs(v).max() if v.size else xp.zeros((), v.dtype)
    if order == -math.inf:
        return xp.abs(v).min()
    if order == 2:
        return xp.sqrt(xp.dot(v, v))
    if order == 1:
        return xp.abs(v).sum()
    if order == 0:
        return (v != 0).sum().astype(v.dtype)
    return (xp.abs(v) ** order).sum() ** (1.0 / order)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite: bool = False, foreach=None):
    """The ``norm_type``-norm of the arrays ``tensors`` (gradients) taken together; a 0-d array.

    Each array's norm is taken first, then the norm of those norms, which is the norm of the
    concatenation (``inf``: the largest absolute value)."""
    arrays = [t for t in _as_list(tensors, "get_total_norm") if t is not None]
    order = _norm_order(norm_type)
    if not arrays:
        return np.zeros((), dtype=np.float32)
    xp = B.xp_of(arrays[0])
    dtype = arrays[0].dtype
    norms = xp.stack([_vector_norm(xp, a.reshape(-1), order).astype(dtype) for a in arrays])
    total = _vector_norm(xp, norms, order)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           f"so it cannot be clipped. To disable this error and scale the gradients by the "
                           f"non-finite norm anyway, set `error_if_nonfinite=False`")
    return xp.asarray(total)


def clip_grads_with_norm_(parameters, max_norm: float, total_norm, foreach=None) -> None:
    """Multiply every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in place."""
    _scale(_grads(parameters, "clip_grads_with_norm_"), max_norm, total_norm)


def _scale(grads, max_norm, total_norm):
    if not grads:
        return
    xp = B.xp_of(grads[0])
    total_norm = xp.asarray(total_norm)
    if total_norm.dtype.kind != "f":
        total_norm = total_norm.astype(grads[0].dtype)
    coefficient = xp.minimum(xp.asarray(float(max_norm), dtype=total_norm.dtype) / (total_norm + EPS), 1.0)
    for g in grads:
        g *= coefficient.astype(g.dtype)


def clip_grad_norm_(parameters, max_norm: float, norm_type=2.0, error_if_nonfinite: bool = False, foreach=None):
    """Scale the gradients of ``parameters`` so that their total norm is at most ``max_norm``.

    ``norm_type`` is a number or ``'inf'`` (``float('inf')``); ``error_if_nonfinite=True`` raises a
    RuntimeError when the total norm is NaN or infinite (otherwise the gradients are scaled by it,
    becoming NaN, as in PyTorch).  Returns the total norm before clipping, a 0-d array on the
    gradients' backend.  ``foreach`` is accepted for PyTorch's signature and ignored.
    """
    grads = _grads(parameters, "clip_grad_norm_")
    if not grads:
        return np.zeros((), dtype=np.float32)
    total = get_total_norm(grads, norm_type, error_if_nonfinite)
    _scale(grads, max_norm, total)
    return total


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """Clamp every gradient element of ``parameters`` into ``[-clip_value, clip_value]``, in place."""
    clip_value = float(clip_value)
    for g in _grads(parameters, "clip_grad_value_"):
        B.xp_of(g).clip(g, -clip_value, clip_value, out=g)
