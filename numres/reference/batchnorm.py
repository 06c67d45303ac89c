"""Batch normalisation over (N, C, H, W), the textbook way, per channel.

For each channel c over its ``m = N*H*W`` values (sums below run over axes (0, 2, 3))::

    mean = sum(x) / m                       var = sum((x - mean)^2) / m     (biased)
    invstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * invstd              (zero mean, unit variance per channel)
    y    = weight * xhat + bias             then max(y, 0) when relu=True

Training mode normalises with the batch's ``mean``/``var`` and updates the running
statistics in place, as PyTorch does::

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

Evaluation mode normalises with ``running_mean``/``running_var`` instead.  ``weight``
or ``bias`` may be None (``affine=False``, ``bias=False``): a weight of ones, a bias of
zeros, and no gradient for the missing one.  ``relu=True`` is a separate plain ReLU
step after the normalisation; backward applies its mask first.

Why the engine (:mod:`numres.functional.batchnorm`) looks different.  It never stores
``xhat``: forward computes ``y = x * scale + shift`` and backward is rewritten in
terms of ``x`` (``dx = g*a + x*b + c``), which saves a tensor and passes over memory;
it works on a channels-last ``(m, C)`` matrix in cache-sized tiles on all cores, and
fuses the ReLU into the same pass.  The gradient is the one derived below.
"""
from __future__ import annotations

from ..backend import xp_of


def _per_channel(v):
    """A (C,) vector shaped (1, C, 1, 1), so it broadcasts over (N, C, H, W)."""
    return v[None, :, None, None]


def _normalise(x, weight, bias, mean, var, eps, relu, training):
    """``y = weight * xhat + bias`` (then the ReLU), and the cache backward reads."""
    xp = xp_of(x)
    invstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype)
    xhat = (x - _per_channel(mean.astype(x.dtype))) * _per_channel(invstd)
    y = xhat if weight is None else xhat * _per_channel(weight)
    if bias is not None:
        y = y + _per_channel(bias)
    if relu:
        y = xp.maximum(y, 0)
    return y, (xhat, invstd, weight, bias is not None, y if relu else None, training)


def batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, relu=False):
    """``(y, cache)``, normalised with the batch statistics; updates ``running_mean`` and
    ``running_var`` in place unless ``running_mean`` is None.  An empty batch (m = 0) gives
    an empty output and leaves the running statistics alone, as in PyTorch."""
    xp = xp_of(x)
    n, channels, h, w = x.shape
    m = n * h * w
    if m == 1:
        raise ValueError(f"BatchNorm2d in training mode needs more than 1 value per channel, got input of "
                         f"shape {tuple(x.shape)}")
    if m == 0:
        zeros = xp.zeros(channels, dtype=x.dtype)
        return _normalise(x, weight, bias, zeros, zeros, eps, relu, training=True)
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - _per_channel(mean)) ** 2).mean(axis=(0, 2, 3))            # biased: divided by m
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += momentum * var * (m / (m - 1))                      # unbiased: divided by m - 1
    return _normalise(x, weight, bias, mean, var, eps, relu, training=True)


def batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps=1e-5, relu=False):
    """``(y, cache)``, normalised with the running statistics."""
    return _normalise(x, weight, bias, running_mean, running_var, eps, relu, training=False)


def batchnorm_backward(dy, cache, *, need_param_grads=True):
    """``(dx, dweight, dbias)`` from ``dy = dL/dy`` (N, C, H, W).

    A missing parameter gets None, and ``need_param_grads=False`` returns None for both.

    Derivation, per channel (sums run over the m = N*H*W values of the channel, axes (0, 2, 3)).

    1. ReLU, when fused in forward: ``y = max(z, 0)`` with ``z = weight * xhat + bias``, so
       ``g = dL/dz = dy * [y > 0]``.  Without it ``g = dy``.
    2. ``z = weight * xhat + bias``, with weight and bias shared by every value of the channel::

           dbias   = sum(g)
           dweight = sum(g * xhat)
           dxhat   = g * weight

    3. Evaluation: ``xhat = (x - running_mean) * invstd`` with constants, so
       ``dx = dxhat * invstd``.
    4. Training: ``mean`` and ``invstd`` depend on every x of the channel too.  With
       ``xhat_k = (x_k - mean) * invstd``, ``dmean/dx_k = 1/m`` and, since
       ``var = sum((x - mean)^2) / m`` gives ``dvar/dx_k = 2 (x_k - mean) / m`` and
       ``invstd = (var + eps)^(-1/2)``, ``dinvstd/dx_k = -invstd^3 (x_k - mean) / m
       = -invstd^2 xhat_k / m``.  So

           dxhat_j/dx_k = invstd * ([j = k] - 1/m) + (x_j - mean) * dinvstd/dx_k
                        = invstd * ([j = k] - 1/m - xhat_j * xhat_k / m)

       and the chain rule ``dx_k = sum_j dxhat_j * dxhat_j/dx_k`` gives

           dx = invstd * (dxhat - sum(dxhat) / m - xhat * sum(dxhat * xhat) / m)
              = weight * invstd * (g - dbias / m - xhat * dweight / m)
    """
    xhat, invstd, weight, has_bias, relu_output, training = cache
    g = dy if relu_output is None else dy * (relu_output > 0)               # 1. the ReLU's mask
    dbias = g.sum(axis=(0, 2, 3))                                           # 2.
    dweight = (g * xhat).sum(axis=(0, 2, 3))
    dxhat = g if weight is None else g * _per_channel(weight)
    if training:                                                            # 4.
        m = max(1, xhat.shape[0] * xhat.shape[2] * xhat.shape[3])               # (an empty batch: sums are 0)
        dx = _per_channel(invstd) * (dxhat - _per_channel(dxhat.sum(axis=(0, 2, 3)) / m)
                                     - xhat * _per_channel((dxhat * xhat).sum(axis=(0, 2, 3)) / m))
    else:                                                                   # 3.
        dx = dxhat * _per_channel(invstd)
    if not need_param_grads:
        return dx, None, None
    return dx, None if weight is None else dweight, dbias if has_bias else None
