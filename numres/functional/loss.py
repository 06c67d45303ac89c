"""Softmax cross-entropy on logits, with optional label smoothing.

For logits ``z`` (N, C), integer targets ``t`` and smoothing ``eps``::

    log p_ic = z_ic - max_c z_ic - log sum_c exp(z_ic - max_c z_ic)      (stable log-softmax)
    loss_i   = -(1 - eps) * log p_{i,t_i} - (eps / C) * sum_c log p_ic
    d loss_i / d z_ic = p_ic - (1 - eps) * [c = t_i] - eps / C

``reduction="mean"`` divides the sum by N, ``"sum"`` does not, ``"none"`` returns loss_i.
"""
from __future__ import annotations

from ..backend import xp_of

REDUCTIONS = ("mean", "sum", "none")


def log_softmax(logits):
    """Row-wise log-softmax, shifted by the row maximum so exp never overflows."""
    xp = xp_of(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0):
    """``(loss, cache)``; ``loss`` is a 0-d array (or (N,) for ``reduction="none"``)."""
    xp = xp_of(logits)
    n, classes = logits.shape
    log_p = log_softmax(logits)
    rows = xp.arange(n)
    losses = -(1.0 - label_smoothing) * log_p[rows, target]
    if label_smoothing:
        losses -= (label_smoothing / classes) * log_p.sum(axis=1)
    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    return loss, (log_p, target, reduction, label_smoothing)


def cross_entropy_backward(dloss, cache):
    """``dlogits`` for an upstream gradient ``dloss`` (a scalar, or (N,) for ``reduction="none"``)."""
    xp = xp_of(cache[0])
    log_p, target, reduction, label_smoothing = cache
    n, classes = log_p.shape
    dlogits = xp.exp(log_p)
    dlogits[xp.arange(n), target] -= 1.0 - label_smoothing
    if label_smoothing:
        dlogits -= label_smoothing / classes
    if reduction == "none":
        return dlogits * dloss.reshape(n, 1)
    scale = dloss / n if reduction == "mean" else dloss
    return dlogits * scale
