"""Fused softmax cross-entropy on the GPU, beside numres.functional.loss.

Forward is one kernel (per row: max, log-sum-exp, the smoothed loss; in double) plus the
mean/sum over rows; backward is one kernel writing ``dlogits`` directly.  The cache keeps the
logits and the per-row log-sum-exp (N doubles) instead of an (N, C) log-softmax.  The upstream
gradient may be a Python number or a device array (read on the device: no host round-trip).

Class-index targets with PyTorch's ``ignore_index`` (default -100): an ignored row has loss 0 and
no gradient, and the mean is over the rows not ignored (the count is a device scalar; 0 rows give
NaN, as PyTorch's 0 / 0).  Any other target outside ``[0, C)`` makes that row's loss and gradient
NaN (the NumPy backend raises; a kernel cannot).  Class weights, probability targets and extra
dimensions go to the generic op (:mod:`numres.cuda.fallback`).
"""
from __future__ import annotations

import numpy as np

import numres.functional.loss as generic

from .fallback import kernel_op
from .runtime import check_extent, runtime_for, supports


class KernelCrossEntropyCache(tuple):
    """``(logits, lse, target, reduction, label_smoothing, ignore_index, inverse_count)``;
    ``inverse_count`` is 1 / (rows not ignored), a device scalar, for the mean (else None)."""


def _usable(logits, target, reduction="mean", label_smoothing=0.0, *args, ignore_index=-100, **kwargs):
    """Class-index targets for 2-D logits with at least one row, and a reduction the kernel knows."""
    return (getattr(logits, "ndim", 0) == 2 and logits.shape[0] > 0 and logits.shape[1] > 0
            and getattr(target, "ndim", -1) == 1 and getattr(target, "dtype", None) is not None
            and target.dtype.kind in "iu" and reduction in generic.REDUCTIONS
            and isinstance(ignore_index, (int, np.integer)) and not isinstance(ignore_index, bool))


@kernel_op(generic.cross_entropy_forward, usable=_usable)
def cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0, *, ignore_index=-100):
    """Kernel version of :func:`numres.functional.loss.cross_entropy_forward` (no class weights)."""
    if not supports(logits):
        return generic.cross_entropy_forward(logits, target, reduction, label_smoothing, ignore_index=ignore_index)
    rt = runtime_for(logits)
    xp = rt.xp
    rows, classes = logits.shape
    check_extent(rows, "N")
    check_extent(classes, "C")
    logits = xp.ascontiguousarray(logits)
    target = xp.ascontiguousarray(target.astype("int64", copy=False))
    lse = xp.empty(rows, dtype="float64")
    losses = xp.empty(rows, dtype=logits.dtype)
    rt.launch("softmax_xent_forward", logits.dtype, rows, 1,
              (logits, rows, classes, target, int(ignore_index), float(label_smoothing), lse, losses))
    inverse_count = None
    if reduction == "mean":
        count = (target != ignore_index).sum().astype(logits.dtype)
        with np.errstate(invalid="ignore", divide="ignore"):     # no row counted: NaN, as PyTorch's 0 / 0
            loss = (losses.sum() / count).astype(logits.dtype)
            inverse_count = (1.0 / count).astype(logits.dtype).reshape(1)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    cache = KernelCrossEntropyCache((logits, lse, target, reduction, float(label_smoothing), int(ignore_index),
                                     inverse_count))
    return loss, cache


@kernel_op(generic.cross_entropy_backward, cache_type=KernelCrossEntropyCache)
def cross_entropy_backward(dloss, cache):
    """Kernel version of :func:`numres.functional.loss.cross_entropy_backward`."""
    logits, lse, target, reduction, label_smoothing, ignore_index, inverse_count = cache
    rt = runtime_for(logits)
    xp = rt.xp
    rows, classes = logits.shape
    if reduction == "none":
        if not isinstance(dloss, xp.ndarray):
            dloss = xp.asarray(dloss, dtype=logits.dtype)
        if dloss.size != rows:
            raise ValueError(f"reduction='none' needs an upstream gradient of shape ({rows},), "
                             f"got {tuple(dloss.shape)}")
        mode, value, device_dloss = 2, 1.0, xp.ascontiguousarray(dloss.astype(logits.dtype, copy=False)).reshape(rows)
    elif reduction == "mean":
        if isinstance(dloss, xp.ndarray):
            mode, value, device_dloss = 1, 1.0, dloss.astype(logits.dtype).reshape(1) * inverse_count
        else:
            mode, value, device_dloss = 1, float(dloss), inverse_count
    elif isinstance(dloss, xp.ndarray):
        mode, value, device_dloss = 1, 1.0, dloss.astype(logits.dtype).reshape(1)
    else:
        mode, value, device_dloss = 0, float(dloss), logits.reshape(-1)[:1]    # unread placeholder
    dlogits = xp.empty_like(logits)
    rt.launch("softmax_xent_backward", logits.dtype, rows, classes,
              (logits, lse, target, ignore_index, rows, classes, label_smoothing, device_dloss, value, mode,
               dlogits))
    return dlogits
