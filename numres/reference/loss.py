"""Softmax cross-entropy, the textbook way, with PyTorch's options.

Logits ``z`` have the classes on axis 1 ((N, C), (N, C, d1, ...), or unbatched (C,)).
Every other axis is a sample axis, so the logits are ``M`` rows of ``C`` classes;
``i`` runs over rows and ``c`` over classes.  Stable log-softmax (shifted by the row's
maximum so that ``exp`` never overflows)::

    L[i, c] = z[i, c] - max_c z[i] - log sum_c exp(z[i, c] - max_c z[i])      p = exp(L)

Every kind of target becomes one target matrix ``T`` (M, C), and the loss of row i is
``loss[i] = -sum_c T[i, c] * L[i, c]``.  With class weights ``w`` (ones by default) and
label smoothing ``eps``:

* class indices ``t[i]``, ``a[i] = [t[i] != ignore_index]``::

      T[i, c] = a[i] * ((1 - eps) * w[t[i]] * [c = t[i]] + eps / C * w[c])
      "mean" divides by D = sum_i a[i] * w[t[i]]  (the number of counted rows, without weights)

* class probabilities ``q`` (a floating target of the logits' shape)::

      T[i, c] = w[c] * ((1 - eps) * q[i, c] + eps / C)        "mean" divides by D = M

``"sum"`` adds the row losses; ``"none"`` returns them in the target's sample shape.
The engine (:mod:`numres.functional.loss`) never builds ``T`` for class indices: it
picks ``L[i, t[i]]`` and adds the smoothing term apart, which saves an (M, C) array.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of


def _rows(z):
    """``(M, C)`` rows: the class axis moved last, every sample axis flattened."""
    xp = xp_of(z)
    if z.ndim == 1:
        return z.reshape(1, -1)
    return xp.moveaxis(z, 1, -1).reshape(-1, z.shape[1])


def _unrows(rows, shape):
    """The inverse of :func:`_rows`: rows back in the logits' ``shape``."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    return xp_of(rows).moveaxis(rows.reshape(shape[:1] + shape[2:] + shape[1:2]), -1, 1)


def cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0, *, weight=None, ignore_index=-100):
    """``(loss, cache)``: a 0-d array, or the per-sample losses for ``reduction="none"``."""
    xp = xp_of(logits)
    z = _rows(logits)
    rows, classes = z.shape
    eps = float(label_smoothing)
    w = xp.ones(classes, dtype=z.dtype) if weight is None else weight.astype(z.dtype)
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    if target.dtype.kind == "f" and target.shape == logits.shape:          # class probabilities
        T = w * ((1.0 - eps) * _rows(target).astype(z.dtype) + eps / classes)
        D = xp.asarray(rows, dtype=z.dtype)
        sample_shape = logits.shape[:1] + logits.shape[2:] if logits.ndim > 1 else ()
    else:                                                                 # class indices
        t = target.reshape(-1)
        counted = t != ignore_index
        t = xp.where(counted, t, 0)
        one_hot = (xp.arange(classes)[None, :] == t[:, None]).astype(z.dtype)
        T = counted[:, None] * ((1.0 - eps) * w[t][:, None] * one_hot + eps / classes * w)
        D = (counted * w[t]).sum()
        sample_shape = tuple(target.shape)
    losses = -(T * log_p).sum(axis=1)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):              # D = 0: NaN, as PyTorch's 0 / 0
            loss = losses.sum() / D
    else:
        loss = losses.sum() if reduction == "sum" else losses.reshape(sample_shape)
    return xp.asarray(loss, dtype=z.dtype), (log_p, T, D, reduction, tuple(logits.shape))


def cross_entropy_backward(dloss, cache):
    """``dlogits`` from ``dloss = dL/dloss`` (a scalar, or the "none" loss's shape).

    Derivation, for one row i (drop the i).  ``loss = -sum_c T[c] L[c]`` with
    ``L[c] = z[c] - log sum_k exp(z[k])`` (the shift by the maximum is a constant that cancels),
    so ``dL[c]/dz[j] = [c = j] - p[j]`` with ``p = softmax(z)``, and::

        dloss/dz[j] = -sum_c T[c] ([c = j] - p[j]) = p[j] * S - T[j],     S = sum_c T[c]

    (S = 1 for a plain one-hot or probability target: the famous ``p - onehot``.)  The reduction
    scales each row's upstream gradient: ``s[i] = dloss`` for "sum", ``dloss / D`` for "mean"
    and ``dloss[i]`` for "none".  The chain rule::

        dz[i, j] = s[i] * (p[i, j] * S[i] - T[i, j])

    A row that is ignored has ``T[i] = 0``, so its gradient is zero; when every row is ignored
    (D = 0) the loss is NaN but, as in PyTorch, the gradient is zero (s is taken as 0, not 1/0).
    """
    xp = xp_of(cache[0])
    log_p, T, D, reduction, shape = cache
    dloss = xp.asarray(dloss, dtype=log_p.dtype)
    if reduction == "none":
        s = dloss.reshape(-1, 1)
    else:
        s = dloss / xp.where(D == 0, xp.inf, D) if reduction == "mean" else dloss   # D = 0: all rows ignored
    S = T.sum(axis=1, keepdims=True)
    dz = s * (xp.exp(log_p) * S - T)
    return _unrows(dz, shape)
