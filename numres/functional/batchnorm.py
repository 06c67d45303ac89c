"""Batch normalisation over (N, C, H, W), per channel, with an optional fused ReLU.

The engine's version of :mod:`numres.reference.batchnorm` (read that first: its backward is the
textbook result in ``xhat``, derived step by step).  What changed, and why: the backward is
rewritten in terms of ``x`` (``dx = g*a + x*b + c``, per-channel constants), so no ``xhat``-sized
array is kept or rebuilt; the sums are taken in one pass over cache-sized tiles of channels-last
rows, on all cores; and a ReLU can be fused into the same passes.

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

In training mode ``dx`` needs the two sums whether or not the parameters learn (they are the
sums of ``g`` and ``g * xhat``, which carry the gradient through the batch statistics), so a
frozen layer saves only their return; in evaluation mode a frozen layer
(``need_param_grads=False``) skips the reduction pass altogether.

``weight`` and ``bias`` may each be None: no weight is a weight of ones (PyTorch's
``affine=False``), no bias a bias of zeros (``bias=False``); a missing one gets no gradient.

Empty input (``m = 0``: N, H or W is 0), as in PyTorch: the output and ``dx`` are empty, the
parameter gradients are zeros and the running statistics are left alone.  Training mode refuses
exactly one value per channel (its variance would be 0 / 0 in the unbiased update).

Implementation.  The channel axis is made the last one, so the data is an
``(m, C)`` matrix of rows (free for channels-last input).  Rows are processed in
cache-sized tiles on all cores (:mod:`numres.parallel`), and each per-channel
vector is laid out once as a whole tile of rows (:func:`channel_tile`), so every
operation inside a tile is a flat, SIMD-friendly loop instead of a broadcast.
The cache keeps the input ``x`` (and, with the ReLU, the output ``y``, which the
next convolution keeps anyway), never ``xhat``: forward applies ``y = x * scale +
shift`` and backward is written in terms of ``x`` as well (see
:func:`batchnorm_backward`), which saves passes over memory.  The variance is summed around a shift
``k`` close to the mean (the mean of the first tile), which avoids cancellation::

    var = sum((x - k)^2) / m - (mean - k)^2
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..blas import single_threaded_blas, single_threaded_blas_available
from ..parallel import map_tiles, tiles
from .layout import channel_rows, rows_as_nchw


def channel_tile(vector, rows):
    """A per-channel ``vector`` repeated over one tile of ``rows`` rows (NumPy), so tile operations
    need no broadcasting; other backends take the vector itself and broadcast on the device."""
    if xp_of(vector) is not np:
        return vector
    return np.ascontiguousarray(np.broadcast_to(vector, (rows, vector.shape[0])))


def fit(constant, tile_rows):
    """The first ``tile_rows`` rows of a :func:`channel_tile` (the last tile may be shorter)."""
    return constant[:tile_rows] if constant.ndim == 2 else constant


GEMV_BELOW_CHANNELS = 128     # rows shorter than this are summed as a GEMV (docs/implicit_gemm.md)


def column_sums(matrix, ones):
    """Per-column sums of a row matrix: ``ones @ matrix`` (a GEMV, on NumPy's BLAS or cuBLAS) for
    rows shorter than :data:`GEMV_BELOW_CHANNELS`, else ``matrix.sum(axis=0)``.

    ``ones`` is a vector of ones of ``matrix``'s dtype with at least as many entries as it has rows.
    The two give the same sums up to rounding; NumPy's axis-0 sum pays its loop overhead once per
    row, the GEMV does not, which wins for short rows (64 channels) and ties from 128 up.
    """
    if matrix.shape[1] >= GEMV_BELOW_CHANNELS:
        return matrix.sum(axis=0)
    return ones[:matrix.shape[0]] @ matrix


def tile_ones(rows):
    """The ``ones`` :func:`column_sums` needs for any tile :func:`numres.parallel.map_tiles` gives of the
    (m, C) matrix ``rows`` (off NumPy the whole matrix is one tile); None where the sums need none."""
    if rows.shape[1] >= GEMV_BELOW_CHANNELS:
        return None
    xp = xp_of(rows)
    return xp.ones(_tile_rows(rows) if xp is np else max(1, rows.shape[0]), dtype=rows.dtype)


def tile_blas(xp, channels):
    """The context the tiles' sums run in: BLAS on one thread while numres's own threads split the
    rows (:func:`numres.blas.single_threaded_blas`), where :func:`column_sums` calls it and numres
    can set its thread count."""
    if xp is np and channels < GEMV_BELOW_CHANNELS and single_threaded_blas_available():
        return single_threaded_blas()
    return contextlib.nullcontext()


class BatchNormCache(NamedTuple):
    rows: object       # the input as an (m, C) matrix
    y_rows: object     # the output rows (kept only with the fused ReLU, for its mask)
    shape: tuple       # the input's (N, C, H, W)
    mean: object       # statistics used for normalising (batch or running), (C,)
    invstd: object     # 1 / sqrt(var + eps), (C,)
    weight: object     # (C,), ones when there is no weight (affine=False)
    bias: object       # (C,), zeros when there is no bias (affine=False or bias=False)
    affine: bool       # the layer has a weight (and so a weight gradient)
    relu: bool
    training: bool
    has_bias: bool     # the layer has a bias (and so a bias gradient)


def _tile_rows(rows):
    """Rows per tile (at least 1, also for an empty input, so the per-channel tiles can be built)."""
    return tiles(max(1, rows.shape[0]), rows.shape[1])[0].stop


def _moments(rows):
    """Per-channel ``(mean, biased variance)`` of an (m, C) matrix, tile by tile, summed around a shift."""
    xp = xp_of(rows)
    count = rows.shape[0]
    tile_rows = _tile_rows(rows)
    shift = rows[:tile_rows].mean(axis=0)
    shift_tile = channel_tile(shift, tile_rows)
    ones = tile_ones(rows)

    def tile_sums(tile):
        deviation = rows[tile] - fit(shift_tile, tile.stop - tile.start)
        return column_sums(deviation, ones), column_sums(deviation * deviation, ones)

    with tile_blas(xp, rows.shape[1]):
        parts = map_tiles(tile_sums, count, rows.shape[1], xp)
    mean_deviation = sum(part[0] for part in parts) / count
    var = sum(part[1] for part in parts) / count - mean_deviation * mean_deviation
    return shift + mean_deviation, xp.maximum(var, 0)


def _normalise(rows, shape, mean, var, weight, bias, eps, relu, training):
    """``y = x * scale + shift`` (+ ReLU) with ``scale = weight / sqrt(var + eps)`` and
    ``shift = bias - mean * scale``, written tile by tile."""
    xp = xp_of(rows)
    affine, has_bias = weight is not None, bias is not None
    if not affine:
        weight = xp.ones(rows.shape[1], dtype=rows.dtype)
    if not has_bias:
        bias = xp.zeros(rows.shape[1], dtype=rows.dtype)
    invstd = (1.0 / xp.sqrt(var + eps)).astype(rows.dtype)
    mean = mean.astype(rows.dtype)
    scale = invstd * weight
    tile_rows = _tile_rows(rows)
    scale_tile, shift_tile = channel_tile(scale, tile_rows), channel_tile(bias - mean * scale, tile_rows)
    y = xp.empty_like(rows)

    def tile_normalise(tile):
        n, out = tile.stop - tile.start, y[tile]
        xp.multiply(rows[tile], fit(scale_tile, n), out=out)
        out += fit(shift_tile, n)
        if relu:
            xp.maximum(out, 0, out=out)

    map_tiles(tile_normalise, rows.shape[0], rows.shape[1], xp)
    cache = BatchNormCache(rows, y if relu else None, tuple(shape), mean, invstd, weight, bias, affine, relu,
                           training, has_bias)
    return rows_as_nchw(y, shape), cache


def batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, relu=False):
    """Normalise with the batch statistics; update ``running_mean``/``running_var`` in place (when given).

    ``momentum`` is the weight of the new batch; PyTorch's ``momentum=None`` (a cumulative average)
    is handled by the caller passing ``1 / num_batches_tracked``.
    """
    n, channels, h, w = x.shape
    count = n * h * w
    if count == 1:
        raise ValueError(
            f"BatchNorm2d in training mode needs more than 1 value per channel, got input of shape "
            f"{tuple(x.shape)}")
    rows = channel_rows(x)
    if count == 0:                   # nothing to normalise and no statistics: the running ones stay
        xp = xp_of(x)
        zeros = xp.zeros(channels, dtype=x.dtype)
        return _normalise(rows, x.shape, zeros, zeros, weight, bias, eps, relu, training=True)
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


def batchnorm_backward(dy, cache: BatchNormCache, *, need_param_grads=True):
    """``(dx, dweight, dbias)``; a parameter gradient is None when the layer lacks that parameter,
    and both are None with ``need_param_grads=False`` (frozen parameters; ``dx`` is unchanged).

    Both passes work on ``x`` directly rather than on ``xhat = (x - mean) * invstd``::

        dweight = invstd * (sum(g * x) - mean * dbias)
        dx      = g * a + x * b + c     with  a = scale,  b = -scale * invstd * dweight / m,
                                              c = -a * dbias / m - b * mean           (training)
    """
    xp = xp_of(dy)
    count, channels = cache.rows.shape
    dy_rows = channel_rows(dy)
    tile_rows = _tile_rows(cache.rows)

    def gradients(dx, dweight, dbias):
        dx = rows_as_nchw(dx, cache.shape)
        if not need_param_grads:
            return dx, None, None
        return dx, dweight if cache.affine else None, dbias if cache.has_bias else None

    if count == 0:                   # empty input: empty dx, and sums over nothing are zeros
        zeros = xp.zeros(channels, dtype=dy.dtype)
        return gradients(xp.empty_like(cache.rows), zeros, zeros.copy())

    def masked_gradient(tile):
        """``g``: the upstream gradient of one tile, through the ReLU mask when it is fused."""
        if cache.relu:
            return xp.multiply(dy_rows[tile], cache.y_rows[tile] > 0)
        return dy_rows[tile]

    ones = tile_ones(cache.rows)

    def tile_sums(tile):
        g = masked_gradient(tile)
        return column_sums(g, ones), column_sums(g * cache.rows[tile], ones)

    if cache.training or need_param_grads:
        with tile_blas(xp, channels):
            parts = map_tiles(tile_sums, count, channels, xp)
        dbias = sum(part[0] for part in parts)
        dweight = cache.invstd * (sum(part[1] for part in parts) - cache.mean * dbias)
    else:                            # eval-mode dx needs no sums, and nobody wants them
        dbias = dweight = None

    a = cache.invstd * cache.weight
    a_tile = channel_tile(a, tile_rows)
    dx = xp.empty_like(cache.rows)
    if cache.training:
        b = -a * cache.invstd * dweight / count
        b_tile, c_tile = channel_tile(b, tile_rows), channel_tile(-a * dbias / count - b * cache.mean, tile_rows)

        def tile_dx(tile):
            n, out = tile.stop - tile.start, dx[tile]
            xp.multiply(masked_gradient(tile), fit(a_tile, n), out=out)
            out += cache.rows[tile] * fit(b_tile, n)
            out += fit(c_tile, n)
    else:
        def tile_dx(tile):
            xp.multiply(masked_gradient(tile), fit(a_tile, tile.stop - tile.start), out=dx[tile])

    map_tiles(tile_dx, count, channels, xp)
    return gradients(dx, dweight, dbias)
