"""Batch normalisation over (N, C, H, W), per channel, with an optional fused ReLU.

Forward, for each channel over its ``m = N*H*W`` values::

    mean = sum(x) / m                 var = sum((x - mean)^2) / m      (biased)
    xhat = (x - mean) / sqrt(var + eps)
    y    = weight * xhat + bias       (then max(y, 0) when relu=True)

Training mode uses the batch's ``mean``/``var`` and updates the running statistics
as PyTorch does: ``running = (1 - momentum) * running + momentum * batch``, with the
*unbiased* variance ``var * m / (m - 1)`` going into ``running_var``.
Evaluation mode uses the running statistics instead.

Backward, with ``g = dy * [y > 0]`` when the ReLU is fused (else ``g = dy``)::

    dbias   = sum(g)                  dweight = sum(g * xhat)
    train:  dx = weight / sqrt(var + eps) * (g - dbias / m - xhat * dweight / m)
    eval:   dx = weight / sqrt(running_var + eps) * g
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import xp_of

AXES = (0, 2, 3)   # every axis but the channel axis


def per_channel(vector):
    """A length-C vector shaped to broadcast against (N, C, H, W)."""
    return vector.reshape(1, -1, 1, 1)


class BatchNormCache(NamedTuple):
    xhat: object       # normalised input, (N, C, H, W)
    scale: object      # weight / sqrt(var + eps), (C,): d y / d x in eval mode
    weight: object     # or None when affine=False
    y: object          # the output, kept only for the fused ReLU's mask
    training: bool


def _normalise(x, mean, var, weight, bias, eps, relu, training):
    xp = xp_of(x)
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - per_channel(mean)) * per_channel(invstd)
    y = xhat * per_channel(weight) + per_channel(bias) if weight is not None else xhat.copy()
    if relu:
        xp.maximum(y, 0, out=y)
    scale = invstd * weight if weight is not None else invstd
    return y, BatchNormCache(xhat, scale, weight, y if relu else None, training)


def batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, relu=False):
    """Normalise with the batch statistics; update ``running_mean``/``running_var`` in place (when given).

    ``momentum`` is the weight of the new batch; PyTorch's ``momentum=None`` (a cumulative average)
    is handled by the caller passing ``1 / num_batches_tracked``.
    """
    count = x.size // x.shape[1]
    if count < 2:
        raise ValueError(
            f"BatchNorm2d in training mode needs more than 1 value per channel, got input of shape "
            f"{tuple(x.shape)}")
    mean = x.mean(axis=AXES)
    var = x.var(axis=AXES)
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += (momentum * count / (count - 1)) * var
    return _normalise(x, mean, var, weight, bias, eps, relu, training=True)


def batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps=1e-5, relu=False):
    """Normalise with the running statistics."""
    return _normalise(x, running_mean, running_var, weight, bias, eps, relu, training=False)


def batchnorm_backward(dy, cache: BatchNormCache):
    """``(dx, dweight, dbias)``; the parameter gradients are None when the layer has no affine part."""
    g = dy * (cache.y > 0) if cache.y is not None else dy
    dbias = g.sum(axis=AXES)
    dweight = (g * cache.xhat).sum(axis=AXES)
    if cache.training:
        count = g.size // g.shape[1]
        dx = per_channel(cache.scale) * (g - per_channel(dbias / count) - cache.xhat * per_channel(dweight / count))
    else:
        dx = g * per_channel(cache.scale)
    if cache.weight is None:
        return dx, None, None
    return dx, dweight, dbias
