"""2-D convolution, the textbook way: a sum over the kernel's offsets.

Shapes (NCHW, as PyTorch)::

    x: (N, C, H, W)    W: (O, C/G, KH, KW)    b: (O,)    y: (N, O, OH, OW)

with ``G`` groups of ``Cg = C/G`` input and ``Og = O/G`` output channels each.  After
zero padding, kernel offset ``(i, j)`` sees the input shifted by ``(i*dh, j*dw)`` and
sampled every ``(sh, sw)`` pixels::

    x_shifted(i, j) = x_pad[:, :, i*dh : i*dh + sh*(OH-1) + 1 : sh,
                                  j*dw : j*dw + sw*(OW-1) + 1 : sw]          (N, C, OH, OW)

and the convolution is one small matrix product per offset, over the channels::

    y[n, g] = sum over (i, j) of  W[g][:, :, i, j] @ x_shifted(i, j)[n, g]  + b

(``W[g][:, :, i, j]`` is (Og, Cg); ``x_shifted(i, j)[n, g]`` is (Cg, OH*OW)).  The loop
runs over the KH*KW offsets only; each step is vectorised over images and pixels.

Why the engine (:mod:`numres.functional.conv`) looks different.  This sum makes KH*KW
small GEMMs, each reading a strided copy of the whole input.  The engine instead
gathers every window into one patch matrix (im2col) and does one large GEMM, which
BLAS runs near peak; it keeps activations channels-last so the patch matrix is built
with one contiguous copy and a 1x1 convolution needs none; it builds that matrix a
chunk of images at a time so the workspace stays in cache; it spreads the copies over
threads; and for 3x3 layers it may use Winograd's algorithm, which needs fewer
multiplications.  Every one of those changes computes the same sum as this file.
"""
from __future__ import annotations

from ..backend import xp_of


def _pair(value):
    """``3 -> (3, 3)``; a pair passes through."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pads(padding, kernel, stride, dilation):
    """``padding`` as ``((top, bottom), (left, right))``: from an int, a pair, such a pair of pairs,
    ``"valid"`` or ``"same"`` (stride 1; an odd total puts the extra cell bottom/right, as PyTorch)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple(_pair(p) for p in _pair(padding))


def _shifted(x_pad, i, j, out_hw, stride, dilation):
    """The (N, C, OH, OW) view of ``x_pad`` that kernel offset ``(i, j)`` reads."""
    rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_hw[0] - 1) + 1, stride[0])
    cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_hw[1] - 1) + 1, stride[1])
    return x_pad[:, :, rows, cols]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros"):
    """``(y, cache)`` with ``y = conv2d(x, weight) + bias``, (N, O, OH, OW).

    Zero padding only (an int, a pair, ``((top, bottom), (left, right))``, ``"valid"`` or
    ``"same"``); the engine also has the reflect, replicate and circular modes.
    """
    if padding_mode != "zeros":
        raise NotImplementedError(f"numres.reference.conv2d_forward pads with zeros only; padding_mode="
                                  f"{padding_mode!r} is in the engine (numres.functional.conv2d_forward)")
    xp = xp_of(x)
    stride, dilation = _pair(stride), _pair(dilation)
    out_channels, cg, kh, kw = weight.shape
    (top, bottom), (left, right) = _pads(padding, (kh, kw), stride, dilation)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, hp, wp = x_pad.shape
    out_hw = ((hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1, (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1)
    if min(out_hw) < 1:
        raise ValueError(f"input of {tuple(x.shape[2:])} pixels, padded by {((top, bottom), (left, right))}, "
                         f"is smaller than the kernel's extent")
    w_groups = weight.reshape(groups, out_channels // groups, cg, kh, kw)        # W[g]: (Og, Cg, KH, KW)
    pixels = out_hw[0] * out_hw[1]
    y = xp.zeros((n, groups, out_channels // groups, pixels), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            w_ij = w_groups[:, :, :, i, j]                                        # (G, Og, Cg)
            x_ij = _shifted(x_pad, i, j, out_hw, stride, dilation).reshape(n, groups, cg, pixels)  # (N, G, Cg, P)
            y += w_ij @ x_ij                                                      # (N, G, Og, P)
    y = y.reshape(n, out_channels, *out_hw)
    if bias is not None:
        y += bias[:, None, None]
    cache = (x_pad, weight, stride, dilation, groups, ((top, bottom), (left, right)), bias is not None)
    return y, cache


def conv2d_backward(dy, cache, need_input_grad=True, *, need_weight_grad=True, need_bias_grad=None):
    """``(dx, dweight, dbias)`` from ``dy = dL/dy`` (N, O, OH, OW); a gradient not wanted is None.

    ``need_bias_grad`` follows ``need_weight_grad`` unless given; ``dbias`` is None without a bias.

    Derivation.  Forward is, per image n and group g (P = OH*OW output pixels), a sum over the
    kernel offsets (i, j) of one matrix product each::

        y_g[n, g] = sum_(i,j) w_ij[g] @ x_ij[n, g]  + b      w_ij = W[g][:, :, i, j]     (G, Og, Cg)
                                                             x_ij = x_shifted(i, j)      (N, G, Cg, P)

    For a product ``Y = A @ B`` with upstream gradient ``dY``: ``Y[o, p] = sum_c A[o, c] B[c, p]``,
    so ``dL/dA[o, c] = sum_p dY[o, p] B[c, p]`` and ``dL/dB[c, p] = sum_o A[o, c] dY[o, p]``, that
    is ``dA = dY @ B^T`` and ``dB = A^T @ dY``.  Each term of the sum receives the whole
    ``dy_g[n, g]`` (Og, P), since ``dy/dterm = 1``; so, per offset::

        dw_ij[g]     = sum_n dy_g[n, g] @ x_ij[n, g]^T      (every image used the same weights)
        dx_ij[n, g]  = w_ij[g]^T @ dy_g[n, g]
        db[o]        = sum over n, oh, ow of dy[n, o, oh, ow]   (b is added at every output pixel)

    ``x_ij`` is a strided view of ``x_pad``, so its gradient goes back to the same positions:
    ``dx_pad[shifted(i, j)] += dx_ij``.  An input pixel read by several offsets (or windows)
    collects every contribution.  Last, ``dx`` is ``dx_pad`` without its frame: the padding is
    a constant, and its gradient goes nowhere.
    """
    xp = xp_of(dy)
    x_pad, weight, stride, dilation, groups, ((top, bottom), (left, right)), has_bias = cache
    out_channels, cg, kh, kw = weight.shape
    n, _, hp, wp = x_pad.shape
    out_hw, pixels = dy.shape[2:], dy.shape[2] * dy.shape[3]
    dy_g = dy.reshape(n, groups, out_channels // groups, pixels)               # (N, G, Og, P)
    w_groups = weight.reshape(groups, out_channels // groups, cg, kh, kw)
    dweight = xp.zeros_like(w_groups) if need_weight_grad else None
    dx_pad = xp.zeros_like(x_pad) if need_input_grad else None
    for i in range(kh):
        for j in range(kw):
            if need_weight_grad:
                x_ij = _shifted(x_pad, i, j, out_hw, stride, dilation).reshape(n, groups, cg, pixels)
                dweight[:, :, :, i, j] = (dy_g @ x_ij.swapaxes(-1, -2)).sum(axis=0)     # dw_ij: (G, Og, Cg)
            if need_input_grad:
                dx_ij = w_groups[:, :, :, i, j].swapaxes(-1, -2) @ dy_g                 # (N, G, Cg, P)
                _shifted(dx_pad, i, j, out_hw, stride, dilation)[...] += dx_ij.reshape(n, groups * cg, *out_hw)
    dx = dx_pad[:, :, top:hp - bottom, left:wp - right] if need_input_grad else None
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    dbias = dy.sum(axis=(0, 2, 3)) if has_bias and need_bias_grad else None
    return dx, None if dweight is None else dweight.reshape(weight.shape), dbias
