"""Fused BatchNorm (+ReLU) on the GPU, beside numres.functional.batchnorm.

The math is the generic op's (see :mod:`numres.functional.batchnorm` and
``kernels/batchnorm.cu``).  Per call:

* training forward: ``bn_partial_moments`` reads the input once (shifted sums in double, per
  lane), ``bn_finalize_moments`` combines the lanes per channel, updates the running
  statistics in place (momentum may be a device scalar: no host round-trip) and writes
  mean, 1/std and weight/std; ``bn_apply`` writes ``y`` (ReLU fused);
* backward: ``bn_backward_partials`` reads ``dy`` and ``x`` once for both reductions,
  ``bn_backward_finalize`` gives dweight, dbias and the dx coefficients, ``bn_backward_dx``
  writes dx.  The ReLU mask is recomputed from ``x`` with the forward's exact expression, so
  the cache holds only ``x`` and per-channel vectors (no ``y``, no ``xhat``).

Input of any layout works (a non-channels-last input is copied once into channels-last rows);
outputs are channels-last.
"""
from __future__ import annotations

from typing import NamedTuple

import numres.functional.batchnorm as generic

from .fallback import kernel_op
from .runtime import check_extent, map_shape, runtime_for, supports


class KernelBatchNormCache(NamedTuple):
    rows: object        # the input as contiguous (m, C) rows
    shape: tuple        # (N, C, H, W)
    mean: object        # (C,) statistics used to normalise (batch or running)
    invstd: object      # (C,)
    scale: object       # (C,) weight * invstd
    bias: object        # (C,) (zeros without affine)
    affine: bool
    relu: bool
    training: bool


def _channel_rows(x, xp):
    nhwc = x.transpose(0, 2, 3, 1)
    if not nhwc.flags.c_contiguous:
        nhwc = xp.ascontiguousarray(nhwc)
    return nhwc.reshape(-1, x.shape[1])


def _as_nchw(rows, shape):
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def _affine_params(weight, bias, channels, dtype, xp):
    if weight is None:
        return xp.ones(channels, dtype=dtype), xp.zeros(channels, dtype=dtype)
    return xp.ascontiguousarray(weight), xp.ascontiguousarray(bias)


def _apply(rt, x_rows, shape, mean, invstd, scale, bias, affine, relu, training):
    rows, channels = x_rows.shape
    y = rt.xp.empty_like(x_rows)
    rt.launch("bn_apply", x_rows.dtype, rows, channels, (x_rows, rows, channels, mean, scale, bias, int(relu), y))
    cache = KernelBatchNormCache(x_rows, tuple(shape), mean, invstd, scale, bias, affine, relu, training)
    return _as_nchw(y, shape), cache


MAX_LANES = 2048


def _reduction_budget(rt, rows, channels):
    """Block budget for the partial-sum kernels: about a quarter of the device's threads, split into
    row lanes, but at most MAX_LANES lanes (the finalize kernels' blocks add each channel's lanes)."""
    (gx, _, _), (bx, by, _) = map_shape(rows, channels, rt.max_blocks)
    target_lanes = max(1, min(MAX_LANES, rt.max_blocks * 64 // (gx * bx)))
    return gx * max(1, target_lanes // by)


def _lanes(rt, rows, channels):
    """The number of row lanes the partial-sum kernels use (their grid's y extent in threads)."""
    grid, block = map_shape(rows, channels, rt.budget(_reduction_budget(rt, rows, channels)))
    return grid[1] * block[1]


def _usable(x, weight=None, bias=None, running_mean=None, running_var=None, *args, **kwargs):
    """What the kernels take: 4-D input with elements, weight and bias both given or both None, and
    running statistics both given or both None."""
    return (getattr(x, "ndim", 0) == 4 and x.size > 0 and (weight is None) == (bias is None)
            and (running_mean is None) == (running_var is None))


def _eval_usable(x, weight=None, bias=None, running_mean=None, running_var=None, *args, **kwargs):
    return _usable(x, weight, bias, running_mean, running_var) and running_mean is not None


@kernel_op(generic.batchnorm_train_forward, usable=_usable)
def batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, relu=False):
    """Kernel version of :func:`numres.functional.batchnorm.batchnorm_train_forward`."""
    if not supports(x):
        return generic.batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum, eps, relu)
    rt = runtime_for(x)
    xp = rt.xp
    n, channels, h, w = x.shape
    rows = check_extent(n * h * w, "N*H*W")
    if rows < 2:
        raise ValueError(f"BatchNorm2d in training mode needs more than 1 value per channel, got input of shape "
                         f"{tuple(x.shape)}")
    x_rows = _channel_rows(x, xp)
    affine = weight is not None
    weight, bias = _affine_params(weight, bias, channels, x.dtype, xp)
    lanes = _lanes(rt, rows, channels)
    psum = xp.empty((channels, lanes), dtype="float64")
    psumsq = xp.empty((channels, lanes), dtype="float64")
    grid, block = rt.launch("bn_partial_moments", x.dtype, rows, channels, (x_rows, rows, channels, psum, psumsq),
                            max_blocks=_reduction_budget(rt, rows, channels))
    assert grid[1] * block[1] == lanes

    mean, invstd, scale = (xp.empty(channels, dtype=x.dtype) for _ in range(3))
    update = running_mean is not None
    if update and not (running_mean.flags.c_contiguous and running_var.flags.c_contiguous):
        raise ValueError("BatchNorm running statistics must be contiguous arrays (they are updated in place)")
    on_device = isinstance(momentum, xp.ndarray)
    momentum_array = momentum.astype("float64").reshape(1) if on_device else psum
    rt.launch("bn_finalize_moments", x.dtype, lanes, channels,
              (x_rows, psum, psumsq, lanes, rows, channels, weight, float(eps), int(update),
               0.0 if on_device else float(momentum), momentum_array, int(on_device),
               running_mean if update else mean, running_var if update else invstd, mean, invstd, scale))
    return _apply(rt, x_rows, x.shape, mean, invstd, scale, bias, affine, relu, training=True)


@kernel_op(generic.batchnorm_eval_forward, usable=_eval_usable)
def batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps=1e-5, relu=False):
    """Kernel version of :func:`numres.functional.batchnorm.batchnorm_eval_forward`."""
    if not supports(x):
        return generic.batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps, relu)
    rt = runtime_for(x)
    xp = rt.xp
    channels = x.shape[1]
    check_extent(x.size // max(1, channels), "N*H*W")
    x_rows = _channel_rows(x, xp)
    affine = weight is not None
    weight, bias = _affine_params(weight, bias, channels, x.dtype, xp)
    mean, invstd, scale = (xp.empty(channels, dtype=x.dtype) for _ in range(3))
    rt.launch("bn_eval_params", x.dtype, 1, channels,
              (xp.ascontiguousarray(running_mean), xp.ascontiguousarray(running_var), weight, float(eps), channels,
               mean, invstd, scale))
    return _apply(rt, x_rows, x.shape, mean, invstd, scale, bias, affine, relu, training=False)


@kernel_op(generic.batchnorm_backward, cache_type=KernelBatchNormCache)
def batchnorm_backward(dy, cache, *, need_param_grads=True):
    """Kernel version of :func:`numres.functional.batchnorm.batchnorm_backward`: ``(dx, dweight, dbias)``;
    both parameter gradients are None with ``need_param_grads=False`` (frozen parameters)."""
    rt = runtime_for(dy)
    xp = rt.xp
    rows, channels = cache.rows.shape
    dy_rows = _channel_rows(dy, xp)
    lanes = _lanes(rt, rows, channels)
    pg = xp.empty((channels, lanes), dtype="float64")
    pgx = xp.empty((channels, lanes), dtype="float64")
    grid, block = rt.launch("bn_backward_partials", dy.dtype, rows, channels,
                            (dy_rows, cache.rows, rows, channels, cache.mean, cache.scale, cache.bias,
                             int(cache.relu), pg, pgx), max_blocks=_reduction_budget(rt, rows, channels))
    assert grid[1] * block[1] == lanes
    dweight, dbias, shift, slope = (xp.empty(channels, dtype=dy.dtype) for _ in range(4))
    rt.launch("bn_backward_finalize", dy.dtype, lanes, channels,
              (pg, pgx, lanes, rows, channels, cache.invstd, cache.scale, int(cache.training), dweight, dbias,
               shift, slope))
    dx = xp.empty_like(cache.rows)
    rt.launch("bn_backward_dx", dy.dtype, rows, channels,
              (dy_rows, cache.rows, rows, channels, cache.mean, cache.scale, cache.bias, int(cache.relu), shift,
               slope, dx))
    dx = _as_nchw(dx, cache.shape)
    if not cache.affine or not need_param_grads:
        return dx, None, None
    return dx, dweight, dbias
