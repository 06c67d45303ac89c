"""Convolution on the GPU: im2col/col2im kernels and cuBLAS GEMMs, beside numres.functional.conv.

Same math and signatures as the generic ops (see :mod:`numres.functional.conv`)::

    y = cols @ W (+ b)        dW = cols^T @ dy        dx = col2im(dy @ W^T)

with three differences that matter on a GPU:

* im2col is one kernel launch that reads the input through its strides (any layout, coalesced
  for channels-last), and col2im is a *gather*: each input element sums the patch entries that
  copied it, so there are no atomics and the sum order is fixed (bit-identical to the generic
  col2im).
* For ``groups == 1`` the GEMMs are 2-D.  ``cupy.matmul`` makes both operands C-contiguous
  before a batched (3-D) GEMM, which would copy the whole patch matrix for ``cols^T @ dy``;
  a 2-D product hands the transposed operand to cuBLAS as it is.
* The cache keeps the *input* rather than the patch matrix whenever the patch matrix would be
  larger (any kernel wider than 1x1: 9x for 3x3), and backward rebuilds the patches with one
  fast im2col.  That trades a memory-bound kernel for most of the activation memory of a
  ResNet's training step.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

import numres.functional.conv as generic

from .fallback import kernel_op
from .runtime import check_extent, element_strides, runtime_for, supports


def _geometry_args(kernel, stride, padding, dilation, out_hw):
    return (kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            out_hw[0], out_hw[1])


def _is_identity_patch(kernel, stride, padding):
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)


def _has_images(x, *args, **kwargs):
    """The kernels take 4-D input with at least one element (an empty batch goes to the generic op)."""
    return getattr(x, "ndim", 0) == 4 and x.size > 0


@kernel_op(generic.im2col, usable=_has_images)
def im2col(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """Kernel version of :func:`numres.functional.conv.im2col`: ``(cols, (OH, OW))``."""
    if not supports(x):
        return generic.im2col(x, kernel, stride, padding, dilation, groups)
    rt = runtime_for(x)
    kernel, stride = generic.pair(kernel, "kernel"), generic.pair(stride, "stride")
    padding, dilation = generic.pair(padding, "padding"), generic.pair(dilation, "dilation")
    n, c, h, w = x.shape
    out_hw = (generic.output_size(h, kernel[0], stride[0], padding[0], dilation[0]),
              generic.output_size(w, kernel[1], stride[1], padding[1], dilation[1]))
    x_nhwc = x.transpose(0, 2, 3, 1)
    if _is_identity_patch(kernel, stride, padding) and x_nhwc.flags.c_contiguous and groups == 1:
        return x_nhwc.reshape(1, n * h * w, c), out_hw          # the input already is the patch matrix
    cg = c // groups
    rows = check_extent(n * out_hw[0] * out_hw[1], "N*OH*OW")
    width = check_extent(kernel[0] * kernel[1] * cg, "kh*kw*C/groups")
    check_extent(groups * width, "columns")
    cols = rt.xp.empty((groups, rows, width), dtype=x.dtype)
    rt.launch("im2col_nhwc", x.dtype, rows, groups * width,
              (x_nhwc, *element_strides(x_nhwc), n, h, w, cg, groups,
               *_geometry_args(kernel, stride, padding, dilation, out_hw), cols))
    return cols, out_hw


def _col2im_usable(dcols, x_shape, *args, **kwargs):
    return len(x_shape) == 4 and 0 not in tuple(x_shape) and dcols.size > 0


@kernel_op(generic.col2im, usable=_col2im_usable)
def col2im(dcols, x_shape, kernel, stride, padding, dilation, out_hw, groups=1):
    """Kernel version of :func:`numres.functional.conv.col2im` (gather form); dx is channels-last."""
    if not supports(dcols):
        return generic.col2im(dcols, x_shape, kernel, stride, padding, dilation, out_hw, groups)
    rt = runtime_for(dcols)
    n, c, h, w = x_shape
    if _is_identity_patch(tuple(kernel), tuple(stride), tuple(padding)) and groups == 1:
        return dcols.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    dcols = rt.xp.ascontiguousarray(dcols)
    rows = check_extent(n * h * w, "N*H*W")
    check_extent(n * out_hw[0] * out_hw[1], "N*OH*OW")
    dx = rt.xp.empty((n, h, w, c), dtype=dcols.dtype)
    rt.launch("col2im_nhwc", dcols.dtype, rows, c,
              (dcols, n, h, w, c // groups, groups, *_geometry_args(kernel, stride, padding, dilation, out_hw),
               dx))
    return dx.transpose(0, 3, 1, 2)


class KernelConvCache(NamedTuple):
    saved: object         # the patch matrix (saved_is_cols) or the input x, whichever is smaller
    saved_is_cols: bool
    weight: object
    x_shape: tuple
    out_hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    has_bias: bool


def _rows_of(y_nchw, xp):
    """(N, C, H, W) -> contiguous (N*H*W, C) rows (free for channels-last ``y``)."""
    nhwc = y_nchw.transpose(0, 2, 3, 1)
    if not nhwc.flags.c_contiguous:
        nhwc = xp.ascontiguousarray(nhwc)
    return nhwc.reshape(-1, y_nchw.shape[1])


def _plain_pair(value) -> bool:
    """An int or a pair of ints (not "same"/"valid" or per-side padding: those go to the generic op)."""
    def whole(item):
        return isinstance(item, (int, np.integer)) and not isinstance(item, bool)
    return whole(value) or (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(whole, value)))


def _conv_usable(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **kwargs):
    return (_has_images(x) and getattr(weight, "ndim", 0) == 4 and weight.size > 0
            and all(_plain_pair(value) for value in (stride, padding, dilation)))


@kernel_op(generic.conv2d_forward, usable=_conv_usable)
def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Kernel version of :func:`numres.functional.conv.conv2d_forward`; ``y`` is channels-last."""
    if not supports(x):
        return generic.conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
    xp = runtime_for(x).xp
    stride, padding, dilation = (generic.pair(stride, "stride"), generic.pair(padding, "padding"),
                                 generic.pair(dilation, "dilation"))
    out_channels, cg, kh, kw = weight.shape
    n = x.shape[0]
    cols, out_hw = im2col(x, (kh, kw), stride, padding, dilation, groups)
    rows = cols.shape[1]
    matrix = generic.weight_matrix(weight, groups)                       # (g, kh*kw*Cg, O/g)
    y = xp.empty((rows, out_channels), dtype=x.dtype)
    if groups == 1:
        xp.matmul(cols[0], matrix[0], out=y)
    else:
        xp.matmul(cols, matrix, out=y.reshape(rows, groups, out_channels // groups).transpose(1, 0, 2))
    if bias is not None:
        y += bias
    keep_cols = cols.size <= x.size
    cache = KernelConvCache(cols if keep_cols else x, keep_cols, weight, tuple(x.shape), out_hw, (kh, kw), stride,
                            padding, dilation, groups, bias is not None)
    return y.reshape(n, out_hw[0], out_hw[1], out_channels).transpose(0, 3, 1, 2), cache


@kernel_op(generic.conv2d_backward, cache_type=KernelConvCache)
def conv2d_backward(dy, cache, need_input_grad=True, *, need_weight_grad=True, need_bias_grad=None):
    """Kernel version of :func:`numres.functional.conv.conv2d_backward`: ``(dx, dweight, dbias)``.

    ``need_weight_grad=False`` (a frozen weight) skips the weight-gradient GEMM and returns
    ``dweight`` None; ``need_bias_grad`` (default: as ``need_weight_grad``) likewise for ``dbias``.
    """
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    xp = runtime_for(dy).xp
    groups = cache.groups
    out_channels, cg, kh, kw = cache.weight.shape
    dy_rows = _rows_of(dy, xp)                                             # (rows, O)
    dweight = None
    if need_weight_grad:
        cols = cache.saved if cache.saved_is_cols else im2col(
            cache.saved, cache.kernel, cache.stride, cache.padding, cache.dilation, groups)[0]
        width = kh * kw * cg
        if groups == 1:
            dweight = xp.matmul(cols[0].T, dy_rows)                       # (kh*kw*Cg, O)
        else:
            dweight = xp.empty((width, groups, out_channels // groups), dtype=dy.dtype)
            dy_groups = dy_rows.reshape(-1, groups, out_channels // groups).transpose(1, 0, 2)
            xp.matmul(cols.transpose(0, 2, 1), dy_groups, out=dweight.transpose(1, 0, 2))
        del cols                                                           # free the rebuilt patches early
        dweight = dweight.reshape(kh, kw, cg, out_channels).transpose(3, 2, 0, 1)
    dbias = dy_rows.sum(axis=0) if cache.has_bias and need_bias_grad else None

    dx = None
    if need_input_grad:
        matrix = generic.weight_matrix(cache.weight, groups)
        if groups == 1:
            dcols = xp.matmul(dy_rows, matrix[0].T)[None]                  # (1, rows, kh*kw*Cg)
        else:
            dy_groups = dy_rows.reshape(-1, groups, out_channels // groups).transpose(1, 0, 2)
            dcols = xp.matmul(dy_groups, matrix.transpose(0, 2, 1))
        dx = col2im(dcols, cache.x_shape, cache.kernel, cache.stride, cache.padding, cache.dilation,
                    cache.out_hw, groups)
    return dx, dweight, dbias
