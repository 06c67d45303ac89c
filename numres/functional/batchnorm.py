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

Implementation.  The channel axis is made the last one, so the data is an
``(m, C)`` matrix of rows (free for channels-last input).  Rows are processed in
cache-sized tiles on all cores (:mod:`numres.parallel`).  The cache keeps the
input ``x`` and the per-channel statistics only: backward recomputes ``xhat``
and the ReLU mask tile by tile, in cache, which costs less than storing them.
The statistics are combined per tile with Chan et al.'s pairwise formula::

    mean = sum_t n_t mean_t / m        M2 = sum_t [M2_t + n_t (mean_t - mean)^2]
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import xp_of
from ..parallel import map_tiles
from .layout import channel_rows, rows_as_nchw


class BatchNormCache(NamedTuple):
    rows: object       # the input as an (m, C) matrix
    shape: tuple       # the input's (N, C, H, W)
    mean: object       # statistics used for normalising (batch or running), (C,)
    invstd: object     # 1 / sqrt(var + eps), (C,)
    weight: object     # (C,), ones when affine=False
    bias: object       # (C,), zeros when affine=False
    affine: bool
    relu: bool
    training: bool


def _moments(rows):
    """Per-channel ``(mean, biased variance)`` of an (m, C) matrix, tile by tile."""
    xp = xp_of(rows)
    count, channels = rows.shape

    def tile_moments(tile):
        block = rows[tile]
        tile_mean = block.mean(axis=0)
        centred = block - tile_mean
        return block.shape[0], tile_mean, (centred * centred).sum(axis=0)

    parts = map_tiles(tile_moments, count, channels, xp)
    mean = sum(n * tile_mean for n, tile_mean, _ in parts) / count
    m2 = sum(tile_m2 + n * (tile_mean - mean) ** 2 for n, tile_mean, tile_m2 in parts)
    return mean, m2 / count


def _normalise(rows, shape, mean, var, weight, bias, eps, relu, training):
    """``y = (x - mean) * weight / sqrt(var + eps) + bias`` (+ ReLU), written tile by tile."""
    xp = xp_of(rows)
    affine = weight is not None
    if not affine:
        weight = xp.ones(rows.shape[1], dtype=rows.dtype)
        bias = xp.zeros(rows.shape[1], dtype=rows.dtype)
    invstd = (1.0 / xp.sqrt(var + eps)).astype(rows.dtype)
    mean = mean.astype(rows.dtype)
    scale = invstd * weight
    y = xp.empty_like(rows)

    def tile_normalise(tile):
        out = y[tile]
        xp.subtract(rows[tile], mean, out=out)
        out *= scale
        out += bias
        if relu:
            xp.maximum(out, 0, out=out)

    map_tiles(tile_normalise, rows.shape[0], rows.shape[1], xp)
    cache = BatchNormCache(rows, tuple(shape), mean, invstd, weight, bias, affine, relu, training)
    return rows_as_nchw(y, shape), cache


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
    rows = channel_rows(x)
    mean, var = _moments(rows)
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += (momentum * count / (count - 1)) * var
    return _normalise(rows, x.shape, mean, var, weight, bias, eps, relu, training=True)


def batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps=1e-5, relu=False):
    """Normalise with the running statistics."""
    return _normalise(channel_rows(x), x.shape, running_mean, running_var, weight, bias, eps, relu,
                      training=False)


def _tile_terms(cache, dy_rows, tile):
    """``(g, xhat)`` for one tile: the gradient after the ReLU mask, and the normalised input."""
    centred = cache.rows[tile] - cache.mean
    g = dy_rows[tile]
    if cache.relu:
        # y > 0  <=>  (x - mean) * scale + bias > 0, evaluated exactly as forward did.
        g = g * (centred * (cache.invstd * cache.weight) + cache.bias > 0)
    centred *= cache.invstd
    return g, centred


def batchnorm_backward(dy, cache: BatchNormCache):
    """``(dx, dweight, dbias)``; the parameter gradients are None when the layer has no affine part."""
    xp = xp_of(dy)
    count, channels = cache.rows.shape
    dy_rows = channel_rows(dy)

    def tile_sums(tile):
        g, xhat = _tile_terms(cache, dy_rows, tile)
        return g.sum(axis=0), (g * xhat).sum(axis=0)

    parts = map_tiles(tile_sums, count, channels, xp)
    dbias = sum(part[0] for part in parts)
    dweight = sum(part[1] for part in parts)

    scale = cache.invstd * cache.weight
    dx = xp.empty_like(cache.rows)
    if cache.training:
        mean_dweight, mean_dbias = dweight / count, dbias / count

        def tile_dx(tile):
            g, xhat = _tile_terms(cache, dy_rows, tile)
            xhat *= mean_dweight
            out = dx[tile]
            xp.subtract(g, xhat, out=out)
            out -= mean_dbias
            out *= scale
    else:
        def tile_dx(tile):
            g, _ = _tile_terms(cache, dy_rows, tile)
            xp.multiply(g, scale, out=dx[tile])

    map_tiles(tile_dx, count, channels, xp)
    dx = rows_as_nchw(dx, cache.shape)
    if not cache.affine:
        return dx, None, None
    return dx, dweight, dbias
