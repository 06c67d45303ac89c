"""Max pooling with saved indices on the GPU, beside numres.functional.pooling.

Forward writes, per output, the window's maximum and the index of the tap that won (the
first maximum, PyTorch's rule); backward is a gather over that index (each input element
sums the gradients of the windows it won), so there are no atomics and the result equals the
generic backward bit for bit.  The cache holds the int32 indices (a quarter of PyTorch's
int64) instead of the padded input.
"""
from __future__ import annotations

import numres.functional.pooling as generic

from .fallback import kernel_op
from .runtime import check_extent, element_strides, runtime_for, supports


class KernelMaxPoolCache(tuple):
    """``(argmax, x_shape, geometry)``; a tuple subclass so backward can tell it from the generic cache."""


def _geometry_args(geometry):
    return (*geometry.kernel, *geometry.stride, *geometry.padding, *geometry.dilation, *geometry.out_hw)


def _usable(x, *args, **kwargs):
    return getattr(x, "ndim", 0) == 4 and x.size > 0


@kernel_op(generic.maxpool2d_forward, usable=_usable)
def maxpool2d_forward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Kernel version of :func:`numres.functional.pooling.maxpool2d_forward`; ``y`` is channels-last."""
    if not supports(x):
        return generic.maxpool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode)
    rt = runtime_for(x)
    geometry = generic.pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    n, c, h, w = x.shape
    rows = check_extent(n * geometry.out_hw[0] * geometry.out_hw[1], "N*OH*OW")
    check_extent(n * h * w, "N*H*W")
    x_nhwc = x.transpose(0, 2, 3, 1)
    y = rt.xp.empty((n, *geometry.out_hw, c), dtype=x.dtype)
    argmax = rt.xp.empty((n, *geometry.out_hw, c), dtype="int32")
    rt.launch("maxpool_forward_nhwc", x.dtype, rows, c,
              (x_nhwc, *element_strides(x_nhwc), n, h, w, c, *_geometry_args(geometry), y, argmax))
    return y.transpose(0, 3, 1, 2), KernelMaxPoolCache((argmax, tuple(x.shape), geometry))


@kernel_op(generic.maxpool2d_backward, cache_type=KernelMaxPoolCache)
def maxpool2d_backward(dy, cache):
    """Kernel version of :func:`numres.functional.pooling.maxpool2d_backward`; dx is channels-last."""
    rt = runtime_for(dy)
    argmax, x_shape, geometry = cache
    n, c, h, w = x_shape
    if tuple(dy.shape) != (n, c, *geometry.out_hw):
        raise ValueError(f"max-pool backward expects a gradient of shape {(n, c, *geometry.out_hw)}, "
                         f"got {tuple(dy.shape)}")
    dy_nhwc = dy.transpose(0, 2, 3, 1)
    dx = rt.xp.empty((n, h, w, c), dtype=dy.dtype)
    rt.launch("maxpool_backward_nhwc", dy.dtype, n * h * w, c,
              (dy_nhwc, *element_strides(dy_nhwc), argmax, n, h, w, c, *_geometry_args(geometry), dx))
    return dx.transpose(0, 3, 1, 2)
