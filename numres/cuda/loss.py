"""Fused softmax cross-entropy on the GPU, beside numres.functional.loss.

Forward is one kernel (per row: max, log-sum-exp, the smoothed loss; in double) plus the
mean/sum over rows; backward is one kernel writing ``dlogits`` directly.  The cache keeps the
logits and the per-row log-sum-exp (N doubles) instead of an (N, C) log-softmax.  The upstream
gradient may be a Python number or a device array (read on the device: no host round-trip).
A target outside ``[0, C)`` makes that row's loss and gradient NaN (the NumPy backend raises;
a kernel cannot).
"""
from __future__ import annotations

import numres.functional.loss as generic

from .fallback import kernel_op
from .runtime import check_extent, runtime_for, supports


class KernelCrossEntropyCache(tuple):
    """``(logits, lse, target, reduction, label_smoothing)``."""


def _usable(logits, target, reduction="mean", label_smoothing=0.0, *args, **kwargs):
    """Class-index targets for 2-D logits with at least one row, and a reduction the kernel knows."""
    return (getattr(logits, "ndim", 0) == 2 and logits.shape[0] > 0 and logits.shape[1] > 0
            and getattr(target, "ndim", -1) == 1 and getattr(target, "dtype", None) is not None
            and target.dtype.kind in "iu" and reduction in generic.REDUCTIONS)


@kernel_op(generic.cross_entropy_forward, usable=_usable)
def cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0):
    """Kernel version of :func:`numres.functional.loss.cross_entropy_forward`."""
    if not supports(logits):
        return generic.cross_entropy_forward(logits, target, reduction, label_smoothing)
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
              (logits, rows, classes, target, float(label_smoothing), lse, losses))
    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    return loss, KernelCrossEntropyCache((logits, lse, target, reduction, float(label_smoothing)))


@kernel_op(generic.cross_entropy_backward, cache_type=KernelCrossEntropyCache)
def cross_entropy_backward(dloss, cache):
    """Kernel version of :func:`numres.functional.loss.cross_entropy_backward`."""
    if not isinstance(cache, KernelCrossEntropyCache):
        return generic.cross_entropy_backward(dloss, cache)
    logits, lse, target, reduction, label_smoothing = cache
    rt = runtime_for(logits)
    xp = rt.xp
    rows, classes = logits.shape
    per_row = 1.0 / rows if reduction == "mean" else 1.0
    if isinstance(dloss, xp.ndarray):
        if reduction == "none":
            mode, value, device_dloss = 2, 1.0, xp.ascontiguousarray(dloss.astype(logits.dtype, copy=False))
            if device_dloss.shape != (rows,):
                raise ValueError(f"reduction='none' needs an upstream gradient of shape ({rows},), "
                                 f"got {tuple(dloss.shape)}")
        else:
            mode, value, device_dloss = 1, per_row, dloss.astype(logits.dtype).reshape(1)
    else:
        mode, value, device_dloss = 0, float(dloss) * per_row, logits.reshape(-1)[:1]    # unread placeholder
    dlogits = xp.empty_like(logits)
    rt.launch("softmax_xent_backward", logits.dtype, rows, classes,
              (logits, lse, target, rows, classes, label_smoothing, device_dloss, value, mode, dlogits))
    return dlogits
