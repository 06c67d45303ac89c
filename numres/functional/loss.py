"""Softmax cross-entropy on logits, as PyTorch's ``cross_entropy`` defines it.

The engine's version of :mod:`numres.reference.loss`, which derives the gradient; this one adds
class weights, ``ignore_index``, probability targets and (N, C, d1, ...) logits in one code path.

The class axis is axis 1 of the logits (axis 0 for unbatched ``(C,)`` logits).  Every other
axis is a sample axis, so ``(N, C, d1, ...)`` logits are ``M = N * d1 * ...`` independent rows;
below, ``i`` runs over those rows and ``c`` over the ``C`` classes.

Stable log-softmax::

    L_ic = z_ic - max_c z_ic - log sum_c exp(z_ic - max_c z_ic)        p_ic = exp(L_ic)

Each row's loss is a weighted sum of its negative log-probabilities, ``loss_i = -sum_c T_ic L_ic``,
with a target matrix ``T`` that depends on the kind of target.  ``w`` is the per-class weight
(all ones without ``weight=``) and ``eps`` the label smoothing.

* Class indices ``t_i`` (integer target of shape ``(N, d1, ...)``); ``a_i = [t_i != ignore_index]``::

      T_ic = a_i * ((1 - eps) * w_{t_i} * [c = t_i] + (eps / C) * w_c)

  ``"mean"`` divides the sum of the losses by ``D = sum_i a_i * w_{t_i}``, the total weight of the
  targets that are not ignored (the number of them without ``weight=``).  With no such target,
  ``D = 0`` and the mean is NaN, as in PyTorch.

* Class probabilities ``y_ic`` (floating target of the logits' shape)::

      T_ic = w_c * ((1 - eps) * y_ic + eps / C)

  ``"mean"`` divides by the number of rows ``M`` (not by a weight), and is NaN for ``M = 0``.
  ``ignore_index`` does not apply.

``"sum"`` adds the losses and ``"none"`` returns them in the target's sample shape.

Backward.  For one row, ``d(-sum_c T_ic L_ic) / dz_ij = p_ij * sum_c T_ic - T_ij``; with the
upstream gradient per row ``s_i`` (``g`` for "sum", ``g / D`` or ``g / M`` for "mean", ``g_i``
for "none")::

    dz_ij = s_i * (p_ij * S_i - T_ij),      S_i = sum_c T_ic

An ignored row has ``T_i = 0``, so its gradient is exactly zero (also when ``D = 0``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import xp_of

REDUCTIONS = ("mean", "sum", "none")


def log_softmax(logits):
    """Row-wise log-softmax, shifted by the row maximum so exp never overflows."""
    xp = xp_of(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


class CrossEntropyCache(NamedTuple):
    log_p: object          # (M, C) log-softmax rows
    target: object         # (M,) class indices (ignored rows hold 0), or (M, C) target matrix T
    valid: object          # (M,) bool, False for ignored rows (None for probability targets)
    weight: object         # (C,) per-class weight, or None
    label_smoothing: float
    reduction: str
    denominator: object    # D or M for "mean" (0-d array), else None
    sample_shape: tuple    # shape of the "none" loss (the target's sample shape)
    logits_shape: tuple


def _class_rows(logits):
    """``(M, C)`` rows: the class axis moved last and every sample axis flattened."""
    xp = xp_of(logits)
    if logits.ndim == 1:
        return logits.reshape(1, -1)
    if logits.ndim == 2:
        return logits
    return xp.ascontiguousarray(xp.moveaxis(logits, 1, -1)).reshape(-1, logits.shape[1])


def _logits_shaped(rows, logits_shape):
    """The inverse of :func:`_class_rows` (a view with the class axis put back)."""
    xp = xp_of(rows)
    if len(logits_shape) <= 2:
        return rows.reshape(logits_shape)
    moved = (logits_shape[0],) + tuple(logits_shape[2:]) + (logits_shape[1],)
    return xp.moveaxis(rows.reshape(moved), -1, 1)


def is_probability_target(logits, target) -> bool:
    """PyTorch's rule: a floating target of the logits' own shape holds class probabilities."""
    return target.dtype.kind == "f" and tuple(target.shape) == tuple(logits.shape)


def cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0, *, weight=None, ignore_index=-100):
    """``(loss, cache)``; ``loss`` is a 0-d array, or the per-sample losses for ``reduction="none"``.

    ``target`` holds class indices (integer, the logits' shape without the class axis) or class
    probabilities (floating, the logits' shape); ``weight`` is an optional ``(C,)`` class weight.
    """
    xp = xp_of(logits)
    dtype = logits.dtype
    classes = logits.shape[1] if logits.ndim >= 2 else logits.shape[0]
    log_p = log_softmax(_class_rows(logits))
    eps = float(label_smoothing)
    if weight is not None:
        weight = weight.astype(dtype, copy=False)
    if is_probability_target(logits, target):
        targets = _class_rows(target.astype(dtype, copy=False))
        matrix = targets * (1.0 - eps) + eps / classes if eps else targets
        if weight is not None:
            matrix = matrix * weight
        losses = -(matrix * log_p).sum(axis=1)
        valid, stored_target = None, matrix
        sample_shape = logits.shape[:1] + logits.shape[2:] if logits.ndim >= 2 else ()
        denominator = xp.asarray(log_p.shape[0], dtype=dtype)
    else:
        indices = target.reshape(-1)
        valid = indices != ignore_index
        safe = xp.where(valid, indices, 0)
        picked = log_p[xp.arange(log_p.shape[0]), safe]                # L_{i, t_i}
        target_weight = xp.ones_like(picked) if weight is None else weight[safe]
        losses = -(1.0 - eps) * target_weight * picked
        if eps:
            smooth = log_p.sum(axis=1) if weight is None else log_p @ weight
            losses -= (eps / classes) * smooth
        losses = xp.where(valid, losses, 0).astype(dtype, copy=False)   # an ignored row is 0, even if not finite
        stored_target = safe
        sample_shape = tuple(target.shape)
        denominator = xp.where(valid, target_weight, 0).sum().astype(dtype)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):     # nothing to average over: NaN, as PyTorch's 0 / 0
            loss = xp.where(denominator == 0, xp.nan, losses.sum() / denominator)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.reshape(sample_shape)
    cache = CrossEntropyCache(log_p, stored_target, valid, weight, eps, reduction,
                              denominator if reduction == "mean" else None, sample_shape, tuple(logits.shape))
    return xp.asarray(loss, dtype=dtype), cache


def cross_entropy_backward(dloss, cache):
    """``dlogits`` for an upstream gradient ``dloss`` (a scalar, or the "none" loss's shape)."""
    with np.errstate(invalid="ignore", divide="ignore"):     # a mean over zero total weight is NaN, quietly
        return _cross_entropy_backward(dloss, cache)


def _cross_entropy_backward(dloss, cache):
    xp = xp_of(cache.log_p)
    log_p = cache.log_p
    rows, classes = log_p.shape
    dtype = log_p.dtype
    if cache.reduction == "none":
        scale = xp.asarray(dloss, dtype=dtype).reshape(rows)
    elif cache.reduction == "mean":
        scale = xp.broadcast_to(xp.asarray(dloss, dtype=dtype) / cache.denominator, (rows,))
    else:
        scale = xp.broadcast_to(xp.asarray(dloss, dtype=dtype), (rows,))
    eps = cache.label_smoothing
    dlogits = xp.exp(log_p)
    if cache.valid is None:                                  # probability targets: T is stored whole
        matrix = cache.target
        dlogits *= matrix.sum(axis=1, keepdims=True)
        dlogits -= matrix
        dlogits *= scale[:, None]
        return _logits_shaped(dlogits, cache.logits_shape)
    scale = xp.where(cache.valid, scale, 0).astype(dtype, copy=False)      # ignored rows get no gradient
    weight = cache.weight
    target_weight = xp.ones(rows, dtype=dtype) if weight is None else weight[cache.target]
    total = (1.0 - eps) * target_weight
    if eps:
        total += (eps / classes) * (classes if weight is None else weight.sum())
    dlogits *= (scale * total)[:, None]                      # s_i * p_ij * S_i
    if eps:
        spread = (eps / classes) * scale[:, None]
        dlogits -= spread if weight is None else spread * weight
    dlogits[xp.arange(rows), cache.target] -= (1.0 - eps) * scale * target_weight
    return _logits_shaped(dlogits, cache.logits_shape)
