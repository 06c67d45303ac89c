"""Convolution followed by BatchNorm, fused: forward beside backward.

The textbook runs :func:`numres.reference.conv2d_forward` then
:func:`numres.reference.batchnorm_eval_forward`; this file computes the same in one step.

**Folding (evaluation mode).**  With running statistics, BatchNorm is an affine map per output
channel ``o``, so it folds into the convolution before it::

    z = conv(x, W) + b                       (b = 0 when the convolution has no bias)
    y = gamma * (z - mean) * invstd + beta   invstd = 1 / sqrt(running_var + eps)
      = conv(x, W * scale) + shift           scale = gamma * invstd,
                                             shift = beta + (b - mean) * scale

(:func:`fold_conv_bn`).  The folded convolution's output pass adds ``shift`` and applies the
ReLU (``relu=True``) to each chunk of the GEMM output while it is still in cache
(:func:`conv2d_bias_relu_forward`); no BatchNorm pass remains.

Backward through a folded pair gives the unfolded pair's gradients exactly, from the folded
convolution's own backward.  With ``g`` the gradient at ``y`` (after the ReLU mask) and
``dWf = cols^T g`` the gradient of the folded weight::

    dx     = conv_input_grad(g, W * scale)               (the folded convolution's dx)
    dW     = scale * dWf                                 (per output channel o)
    db     = scale * sum(g)
    dbeta  = sum(g)
    dgamma = invstd * (sum(g * z) - mean * sum(g)),  with  sum_p g[p, o] z[p, o]
           = sum_k W[k, o] dWf[k, o] + b[o] sum(g)   (z is never formed: z = cols W + b)

(:func:`folded_conv_bn_backward`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..parallel import TILE_ELEMENTS, map_tiles
from . import conv as C
from .batchnorm import channel_tile, fit


# --- folding ---------------------------------------------------------------------------------------

class FoldedParameters(NamedTuple):
    weight: object        # W * scale, PyTorch shape (O, I/groups, kh, kw), stored (kh, kw, I/groups, O)
    bias: object          # shift, (O,)
    scale: object         # gamma * invstd, (O,)
    invstd: object        # 1 / sqrt(running_var + eps), (O,)
    mean: object          # running_mean, (O,)


def fold_conv_bn(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """The folded ``(weight, bias)`` of conv -> eval-mode BatchNorm (see the module's notes).

    ``weight`` has PyTorch's shape; the folded weight keeps its memory layout, so a weight
    stored ``(kh, kw, I/groups, O)`` (as :class:`numres.nn.Conv2d` stores it) gives a folded
    weight stored so too.  ``bn_weight``/``bn_bias``/``conv_bias`` may be None (ones, zeros,
    zeros).  The per-channel vectors are computed in float64 and rounded once to the weight's
    dtype.
    """
    xp = xp_of(weight)
    dtype = weight.dtype
    var = running_var.astype(np.float64)
    invstd = 1.0 / xp.sqrt(var + eps)
    gamma = 1.0 if bn_weight is None else bn_weight.astype(np.float64)
    beta = 0.0 if bn_bias is None else bn_bias.astype(np.float64)
    scale = gamma * invstd
    mean = running_mean.astype(np.float64)
    z_offset = -mean if conv_bias is None else conv_bias.astype(np.float64) - mean
    shift = beta + z_offset * scale
    # Scale along the output axis of the stored layout (kh, kw, I/g, O): one contiguous pass.
    stored = weight.transpose(2, 3, 1, 0)
    folded = xp.multiply(stored, scale.astype(dtype)).astype(dtype, copy=False)
    return FoldedParameters(folded.transpose(3, 2, 0, 1), shift.astype(dtype), scale.astype(dtype),
                            invstd.astype(dtype), running_mean.astype(dtype))


class FoldedConvCache(NamedTuple):
    """What backward needs from a folded conv -> BatchNorm pair."""
    conv_cache: object    # the folded convolution's own cache (im2col or Winograd)
    weight: object        # the unfolded convolution weight W (PyTorch shape)
    scale: object         # gamma * invstd
    invstd: object
    mean: object          # running_mean
    conv_bias: object     # the convolution's bias b, or None
    algorithm: str        # "im2col" or "winograd"
    bn_weight: object = None   # the caller's handles on the BatchNorm's weight and bias (numres.nn
    bn_bias: object = None     # keeps its Parameters here, for their gradients)


def folded_conv_bn_backward(g, cache: FoldedConvCache, conv_backward, need_input_grad=True, *,
                            need_conv_grads=True, need_bn_grads=True):
    """``(dx, dW, db, dgamma, dbeta)`` of a folded pair from ``g`` = dL/dy (after the ReLU mask).

    ``conv_backward(g, conv_cache, need_input_grad, need_weight_grad=..., need_bias_grad=False)``
    is the folded convolution's backward (the algorithm that made ``conv_cache``).  A gradient
    nobody needs is None: ``dW``/``db`` without ``need_conv_grads``, ``dgamma``/``dbeta`` without
    ``need_bn_grads`` (``db`` is also None for a convolution without bias).
    """
    need_weight = need_conv_grads or need_bn_grads
    dx, dweight_folded, _ = conv_backward(g, cache.conv_cache, need_input_grad, need_weight_grad=need_weight,
                                          need_bias_grad=False)
    if not need_weight:
        return dx, None, None, None, None
    has_bias = cache.conv_bias is not None
    sum_g = g.sum(axis=(0, 2, 3)) if need_bn_grads or has_bias else None     # a pass over g: only when used
    dweight = dconv_bias = dgamma = dbeta = None
    if need_conv_grads:
        dweight = dweight_folded * cache.scale[:, None, None, None]
        if has_bias:
            dconv_bias = cache.scale * sum_g
    if need_bn_grads:
        # sum over pixels of g * z, per output channel, from the folded weight's gradient.
        g_dot_z = (cache.weight * dweight_folded).sum(axis=(1, 2, 3))
        if has_bias:
            g_dot_z += cache.conv_bias * sum_g
        dgamma = cache.invstd * (g_dot_z - cache.mean * sum_g)
        dbeta = sum_g
    if dweight is not None:
        # The layout numres.nn.Conv2d keeps its weight (and gradients) in: (kh, kw, I/groups, O).
        dweight = xp_of(dweight).ascontiguousarray(dweight.transpose(2, 3, 1, 0)).transpose(3, 2, 0, 1)
    return dx, dweight, dconv_bias, dgamma, dbeta


# --- the convolution with its output pass fused ------------------------------------------------------

def conv2d_bias_relu_forward(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                             relu=False):
    """im2col convolution whose output pass adds ``bias`` and applies ReLU chunk by chunk -> ``(y, cache)``.

    The same GEMMs as :func:`numres.functional.conv.conv2d_forward` (whose cache this returns,
    so its backward applies), but each chunk of GEMM output gets ``max(y + bias, 0)`` right after
    the GEMM wrote it, while it is still in cache, instead of in one more pass over ``y``.  A 1x1
    stride-1 convolution is one GEMM on the input itself, followed by one tiled pass: cutting its
    GEMM into blocks of rows, so that each block's output is still in cache, measured slower
    (each block streams the whole weight matrix again; ResNet-50, batch 8, 224x224: 495-508 ms
    with 2 MiB blocks against 476-487 ms unblocked).
    ``padding`` is the symmetric zero padding ``(ph, pw)``.
    """
    xp = xp_of(x)
    out_channels, cg, kh, kw = weight.shape
    n, _, h, w = x.shape
    out_hw = (C.output_size(h, kh, stride[0], padding[0], dilation[0]),
              C.output_size(w, kw, stride[1], padding[1], dilation[1]))
    pixels = out_hw[0] * out_hw[1]
    matrix = C.weight_matrix(weight, groups)
    y = xp.empty((n * pixels, out_channels), dtype=x.dtype)
    y_groups = y.reshape(n * pixels, groups, out_channels // groups)
    tile_rows = max(1, TILE_ELEMENTS // max(1, out_channels))
    bias_tile = None if bias is None else channel_tile(bias.astype(y.dtype, copy=False), tile_rows)

    def epilogue(block):
        """bias and ReLU on output rows ``block``, tile by tile on all cores, while it is in cache."""
        rows = y[block]

        def finish(tile):
            part = rows[tile]
            if bias is not None:
                part += fit(bias_tile, tile.stop - tile.start)
            if relu:
                xp.maximum(part, 0, out=part)

        if bias is not None or relu:
            map_tiles(finish, rows.shape[0], out_channels, xp)

    for images in C.image_chunks(x.shape, (kh, kw), stride, padding, out_hw):
        cols, _ = C.im2col(x[images], (kh, kw), stride, padding, dilation, groups)
        block = slice(images.start * pixels, images.stop * pixels)
        C.group_matmul(cols, matrix, out=y_groups[block].transpose(1, 0, 2))
        epilogue(block)
    y = y.reshape(n, out_hw[0], out_hw[1], out_channels).transpose(0, 3, 1, 2)
    cache = C.ConvCache(x, weight, tuple(x.shape), out_hw, (kh, kw), tuple(stride), tuple(padding),
                        tuple(dilation), groups, bias is not None)
    return y, cache
