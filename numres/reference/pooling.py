"""Max, average and adaptive-average pooling over (N, C, H, W), the textbook way.

A pooling window of KH x KW taps slides over the (padded) input.  As in
:mod:`numres.reference.conv`, tap ``(i, j)`` of every window at once is one strided
view of the padded input, (N, C, OH, OW)::

    x_shifted(i, j) = x_pad[:, :, i*dh : i*dh + sh*(OH-1) + 1 : sh,
                                  j*dw : j*dw + sw*(OW-1) + 1 : sw]

so the pools loop over the taps of one window, never over pixels or images.

Max::       y = max over the taps (padding is -inf; it never wins)
Average::   y = sum over the taps / divisor
Adaptive::  y = A_h @ x @ A_w^T, with averaging matrices A (PyTorch's bins)
Unpooling:: y[n, c].flat[indices] = x (zeros elsewhere), the partial inverse of max pooling

``ceil_mode`` lets the last window hang over the bottom/right edge; the extra cells
are padding too.  Why the engine (:mod:`numres.functional.pooling`) looks different:
it works on a channels-last copy, a tile of images at a time on all cores, and keeps
a running maximum instead of the positions when no indices are asked for.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _out_len(size, kernel, stride, padding, dilation, ceil_mode):
    """Windows along one axis, as PyTorch counts them."""
    room = size + 2 * padding - dilation * (kernel - 1) - 1
    if room < 0:
        raise ValueError(f"input size {size} (padded by {padding} each side) is smaller than the kernel's "
                         f"extent {dilation * (kernel - 1) + 1}")
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:        # the last window must start inside
        out -= 1
    return out


def _stride(stride, kernel_size):
    """PyTorch's default stride (None, or an empty sequence) is the kernel size."""
    return _pair(kernel_size if stride is None or (isinstance(stride, (tuple, list)) and not stride) else stride)


def _geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    """``(kernel, stride, padding, dilation, out_hw, extra)``; ``extra`` is ceil_mode's bottom/right padding."""
    kernel, stride = _pair(kernel_size), _stride(stride, kernel_size)
    padding, dilation = _pair(padding), _pair(dilation)
    if any(p > k // 2 for k, p in zip(kernel, padding)):
        raise ValueError(f"pad should be at most half of effective kernel size, got padding={padding} "
                         f"for kernel_size={kernel}")
    out_hw = tuple(_out_len(x_shape[2 + a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
                   for a in range(2))
    extra = tuple(max(0, (out_hw[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1
                      - x_shape[2 + a] - 2 * padding[a]) for a in range(2))
    return kernel, stride, padding, dilation, out_hw, extra


def _padded_zeros(x_shape, geometry, dtype, xp):
    """A zero (N, C, H + padding, W + padding) array: the padded input's shape, for a gradient."""
    _, _, (ph, pw), _, _, (eh, ew) = geometry
    return xp.zeros((x_shape[0], x_shape[1], x_shape[2] + 2 * ph + eh, x_shape[3] + 2 * pw + ew), dtype=dtype)


def _taps(geometry):
    """For each tap ``(i, j)`` of a window: the slices of the padded input it reads at every output."""
    (kh, kw), (sh, sw), _, (dh, dw), (oh, ow), _ = geometry
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
                         slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


def _position(i, j, in_hw, geometry, xp):
    """The flat input position ``h * W + w`` that tap ``(i, j)`` reads at each output (OH, OW), -1 in padding."""
    _, (sh, sw), (ph, pw), (dh, dw), (oh, ow), _ = geometry
    rows = xp.arange(oh) * sh - ph + i * dh
    cols = xp.arange(ow) * sw - pw + j * dw
    inside = ((rows >= 0) & (rows < in_hw[0]))[:, None] & ((cols >= 0) & (cols < in_hw[1]))[None, :]
    return xp.where(inside, rows[:, None] * in_hw[1] + cols[None, :], -1)


# --- max pooling ------------------------------------------------------------------------------

def maxpool2d_forward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
                      return_indices=False):
    """``(y, cache)``, or ``((y, indices), cache)`` with ``return_indices``.

    Each window's maximum, and where it is: ``indices`` holds its flat position ``h * W + w``
    in the input plane (int64), as PyTorch's.  Going over the taps in order, a tap takes over
    when it is greater than the best so far (so ties keep the *first* maximum) or NaN.
    """
    xp = xp_of(x)
    geometry = _geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    _, _, (ph, pw), _, out_hw, (eh, ew) = geometry
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=-xp.inf)
    y = xp.full((x.shape[0], x.shape[1], *out_hw), -xp.inf, dtype=x.dtype)
    indices = xp.full(y.shape, -1, dtype=xp.int64)
    for i, j, window in _taps(geometry):
        tap, position = x_pad[window], _position(i, j, x.shape[2:], geometry, xp)
        wins = (position >= 0) & ((tap > y) | xp.isnan(tap) | (indices < 0))
        y = xp.where(wins, tap, y)
        indices = xp.where(wins, position, indices)
    cache = (indices, tuple(x.shape), geometry)
    return ((y, indices), cache) if return_indices else (y, cache)


def maxpool2d_backward(dy, cache):
    """dL/dx from ``dy = dL/dy`` (N, C, OH, OW).

    Derivation.  Each output is one of its window's inputs: ``y[o] = x[argmax(o)]``, with the
    position ``argmax(o)`` saved as ``indices``.  So ``dy[o]/dx[k] = [k = argmax(o)]`` (a small
    change of a non-maximal input leaves the max alone), and the chain rule sums over outputs::

        dx[k] = sum over outputs o of dy[o] * [indices[o] = k]

    Tap by tap: tap ``(i, j)`` reads input position ``position(i, j)`` at each output, and the
    outputs whose maximum it was send their ``dy`` there.  Overlapping windows (stride < kernel)
    may pick the same input; the ``+=`` adds their gradients up.
    """
    xp = xp_of(dy)
    indices, x_shape, geometry = cache
    (ph, pw) = geometry[2]
    dx_pad = _padded_zeros(x_shape, geometry, dy.dtype, xp)
    for i, j, window in _taps(geometry):
        dx_pad[window] += xp.where(indices == _position(i, j, x_shape[2:], geometry, xp), dy, 0)
    return dx_pad[:, :, ph:ph + x_shape[2], pw:pw + x_shape[3]]


# --- max unpooling ----------------------------------------------------------------------------

def _planes(n, c, xp):
    """Index arrays that pick image n and channel c of an (N, C, positions) array."""
    return xp.arange(n)[:, None, None], xp.arange(c)[None, :, None]


def maxunpool2d_forward(x, indices, kernel_size, stride=None, padding=0, output_size=None):
    """``(y, cache)``: a partial inverse of max pooling.  ``y`` (N, C, OH, OW) is zero except
    ``y[n, c].flat[indices[n, c, h, w]] = x[n, c, h, w]`` (a repeated index keeps the last value,
    as PyTorch's CPU kernel does).  ``output_size`` ((OH, OW) or (N, C, OH, OW)) picks among the
    sizes a pooling could have come from: within ``stride`` of ``(H - 1) * stride + kernel - 2 * padding``."""
    xp = xp_of(x)
    kernel, stride, padding = _pair(kernel_size), _stride(stride, kernel_size), _pair(padding)
    n, c, h, w = x.shape
    default = [(x.shape[2 + a] - 1) * stride[a] + kernel[a] - 2 * padding[a] for a in range(2)]
    size = default if output_size is None else [int(v) for v in tuple(output_size)[-2:]]
    if any(not d - s < o < d + s for d, s, o in zip(default, stride, size)) or min(size) < 0:
        raise ValueError(f"invalid output_size {tuple(size)} for max unpooling to about {tuple(default)}")
    if tuple(indices.shape) != tuple(x.shape) or indices.dtype.kind not in "iu":
        raise ValueError(f"max unpooling expects integer indices of the input's shape {tuple(x.shape)}, got "
                         f"{indices.dtype} {tuple(indices.shape)}")
    plane = size[0] * size[1]
    flat = indices.reshape(n, c, h * w)
    if xp is np and flat.size and (flat.min() < 0 or flat.max() >= plane):
        raise ValueError(f"max unpooling found an index outside the output plane of {size[0]}x{size[1]}")
    y = xp.zeros((n, c, plane), dtype=x.dtype)
    y[(*_planes(n, c, xp), flat)] = x.reshape(n, c, h * w)
    return y.reshape(n, c, *size), (flat, tuple(x.shape))


def maxunpool2d_backward(dy, cache):
    """dL/dx from ``dy = dL/dy`` (N, C, OH, OW).

    Derivation.  Forward copies each input to one place: ``y[n, c].flat[flat[n, c, k]] = x[n, c].flat[k]``
    (all other outputs are the constant 0).  So ``dy[n, c].flat[p]/dx[n, c].flat[k] = [p = flat[n, c, k]]``
    and the chain rule leaves one term::

        dx[n, c].flat[k] = dy[n, c].flat[flat[n, c, k]]          (a gather)

    Where two inputs share an index, both read its gradient (as in PyTorch), though only the last
    one's value is in ``y``.
    """
    xp = xp_of(dy)
    flat, x_shape = cache
    n, c = x_shape[:2]
    planes = dy.reshape(n, c, dy.shape[2] * dy.shape[3])
    return planes[(*_planes(n, c, xp), flat)].reshape(x_shape)


# --- average pooling --------------------------------------------------------------------------

def _counts(out_len, size, kernel, stride, padding, count_include_pad, xp):
    """How many cells each window along one axis averages: PyTorch's divisor (its share on one axis)."""
    start = xp.arange(out_len) * stride - padding
    end = xp.minimum(start + kernel, size + padding)           # ceil_mode's overhang does not count
    if not count_include_pad:
        start, end = xp.maximum(start, 0), xp.minimum(end, size)
    return end - start


def avgpool2d_forward(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                      divisor_override=None):
    """``(y, cache)``: the sum of each window divided by its divisor (OH, OW), which counts the zero
    padding unless ``count_include_pad=False``, or is ``divisor_override`` when given."""
    xp = xp_of(x)
    geometry = _geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    kernel, stride, (ph, pw), _, out_hw, (eh, ew) = geometry
    if divisor_override is not None:
        if divisor_override == 0:
            raise ValueError("divisor_override must not be zero")
        divisor = xp.asarray(divisor_override, dtype=x.dtype)
    else:
        counts = [_counts(out_hw[a], x.shape[2 + a], kernel[a], stride[a], (ph, pw)[a], count_include_pad, xp)
                  for a in range(2)]
        divisor = (counts[0][:, None] * counts[1][None, :]).astype(x.dtype)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)))
    total = xp.zeros((x.shape[0], x.shape[1], *out_hw), dtype=x.dtype)
    for _, _, window in _taps(geometry):
        total += x_pad[window]
    return total / divisor, (divisor, tuple(x.shape), geometry)


def avgpool2d_backward(dy, cache):
    """dL/dx from ``dy = dL/dy`` (N, C, OH, OW).

    Derivation.  ``y[o] = sum over taps t of x_pad[window(o, t)] / divisor[o]``, linear in x,
    so ``dy[o]/dx_pad[k] = 1 / divisor[o]`` for every cell k of window o (0 elsewhere).  The
    chain rule::

        dx_pad[k] = sum over windows o containing k of dy[o] / divisor[o]

    Tap by tap: every tap's view of ``dx_pad`` receives ``dy / divisor``; overlapping windows
    add up.  The padding cells are constants, so ``dx`` is ``dx_pad`` without them.
    """
    xp = xp_of(dy)
    divisor, x_shape, geometry = cache
    (ph, pw) = geometry[2]
    share = dy / divisor
    dx_pad = _padded_zeros(x_shape, geometry, dy.dtype, xp)
    for _, _, window in _taps(geometry):
        dx_pad[window] += share
    return dx_pad[:, :, ph:ph + x_shape[2], pw:pw + x_shape[3]]


# --- adaptive average pooling -----------------------------------------------------------------

def _averaging_matrix(out_len, size, dtype, xp):
    """A (out_len, size) matrix whose row i averages PyTorch's bin i: [floor(i*size/out), ceil((i+1)*size/out))."""
    i, k = xp.arange(out_len)[:, None], xp.arange(size)[None, :]
    start, end = (i * size) // out_len, -(-((i + 1) * size) // out_len)
    return (((k >= start) & (k < end)) / (end - start)).astype(dtype)


def adaptive_avgpool2d_forward(x, output_size):
    """``(y, cache)``: the mean of each adaptive bin, ``y = A_h @ x @ A_w^T`` over the last two axes.
    ``output_size`` is an int or a pair (None keeps that axis's size); (1, 1) is the global average."""
    xp = xp_of(x)
    out = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    out_h, out_w = (x.shape[2 + a] if out[a] is None else int(out[a]) for a in range(2))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output_size must be positive, got {(out_h, out_w)}")
    a_h = _averaging_matrix(out_h, x.shape[2], x.dtype, xp)                  # (OH, H)
    a_w = _averaging_matrix(out_w, x.shape[3], x.dtype, xp)                  # (OW, W)
    return a_h @ x @ a_w.T, (a_h, a_w)


def adaptive_avgpool2d_backward(dy, cache):
    """dL/dx from ``dy = dL/dy`` (N, C, OH, OW).

    Derivation.  For one image and channel, ``y = A_h @ x @ A_w^T``: row i of ``A_h`` averages
    the rows of bin i, row j of ``A_w`` the columns of bin j, so ``y[i, j]`` is the mean of bin
    (i, j).  Written out, ``y[i, j] = sum_(h,w) A_h[i, h] x[h, w] A_w[j, w]``, so
    ``dy[i, j]/dx[h, w] = A_h[i, h] A_w[j, w]`` and the chain rule gives::

        dx[h, w] = sum_(i,j) A_h[i, h] dy[i, j] A_w[j, w]    ->   dx = A_h^T @ dy @ A_w

    Each bin's gradient, divided by its area, spread over the bin (bins may overlap).
    """
    a_h, a_w = cache
    return a_h.T @ dy @ a_w
