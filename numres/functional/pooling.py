"""Max, average and adaptive-average pooling over (N, C, H, W), forward beside backward.

The engine's version of :mod:`numres.reference.pooling` (read that first): the same taps over
the window, done on a channels-last copy, chunk by chunk on all cores.

The pools walk the kernel one tap at a time over strided views of a padded,
channels-last copy of the input (see :func:`numres.functional.conv.kernel_offsets`),
so no Python loop ever runs over pixels and no window-sized temporary is built.

Max pooling::   y = max over the window (padding is -inf)
                dx: each window's dy goes to one element, its *first* maximum (PyTorch's choice)
Average::       y = sum over the window / divisor
                dx: every element of the window receives dy / divisor
Max unpooling:: y[n, c, indices[n, c, h, w]] = x[n, c, h, w] over each flattened output plane, zeros elsewhere
                dx[n, c, h, w] = dy[n, c, indices[n, c, h, w]]   (a gather)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..parallel import map_tiles
from .conv import images_elements, kernel_offsets, output_size, pad_nhwc, pair


class PoolGeometry(NamedTuple):
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    in_hw: tuple
    out_hw: tuple
    extra: tuple    # cells of padding added at the bottom/right for ceil_mode's last window


def is_default_stride(stride) -> bool:
    """True for PyTorch's ways of saying "the stride is the kernel size": None, or an empty ``()`` / ``[]``."""
    return stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)


def pool_geometry(x_shape, kernel_size, stride, padding, dilation=1, ceil_mode=False):
    """Window geometry for pooling ``x_shape``; checks PyTorch's padding rule.

    ``stride`` None or ``()`` (PyTorch's default) means ``kernel_size``."""
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = pair(kernel_size if is_default_stride(stride) else stride, "stride", minimum=1)
    padding, dilation = pair(padding, "padding"), pair(dilation, "dilation", minimum=1)
    for k, p in zip(kernel, padding):
        if p > k // 2:
            raise ValueError(f"pad should be at most half of effective kernel size, got padding={padding} "
                             f"for kernel_size={kernel}")
    in_hw = tuple(x_shape[2:])
    out_hw = tuple(output_size(in_hw[a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
                   for a in range(2))
    extra = tuple(max(0, (out_hw[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1
                      - (in_hw[a] + 2 * padding[a])) for a in range(2))
    return PoolGeometry(kernel, stride, padding, dilation, in_hw, out_hw, extra)


def _padded(x, geometry, value):
    return pad_nhwc(x.transpose(0, 2, 3, 1), geometry.padding[0], geometry.padding[1], value,
                    geometry.extra[0], geometry.extra[1])


def _scatter_taps(window_gradients, x_shape, geometry, dtype, xp):
    """dx from per-tap gradients.  ``window_gradients(images)`` yields, tap by tap in window order,
    the (n, OH, OW, C) gradient each tap sends back for the images in the slice ``images``; each
    is summed into the input positions that tap read."""
    n, c, h, w = x_shape
    pad_h, pad_w = geometry.padding
    padded = xp.empty((n, h + 2 * pad_h + geometry.extra[0], w + 2 * pad_w + geometry.extra[1], c), dtype=dtype)

    def accumulate(images):
        frame = padded[images]
        frame[...] = 0
        for tap, gradient in zip(_taps(frame, geometry), window_gradients(images)):
            tap += gradient

    map_tiles(accumulate, n, images_elements(padded), xp)
    return padded[:, pad_h:pad_h + h, pad_w:pad_w + w].transpose(0, 3, 1, 2)


def _taps(frame, geometry):
    """The strided view of ``frame`` (padded NHWC images) that each kernel tap reads, in window order."""
    for _, _, rows, cols in kernel_offsets(geometry.kernel, geometry.stride, geometry.dilation, geometry.out_hw):
        yield frame[:, rows, cols]


# --- max pooling -----------------------------------------------------------------------------

class MaxPoolCache(NamedTuple):
    padded: object       # the input framed by -inf, channels-last
    y: object            # the maxima, channels-last
    x_shape: tuple
    geometry: PoolGeometry


class MaxPoolIndexCache(NamedTuple):
    indices: object      # (N, OH, OW, C) int64: the flat H*W position of each window's maximum
    x_shape: tuple
    geometry: PoolGeometry


def maxpool2d_forward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
                      return_indices=False):
    """``(y, cache)``, or ``((y, indices), cache)`` with ``return_indices``.

    ``y`` is the running maximum over the taps.  ``indices`` are PyTorch's: for each output,
    the position ``h * W + w`` of its window's maximum in the input plane, int64.
    """
    geometry = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    if return_indices:
        return _maxpool2d_with_indices(x, geometry)
    xp = xp_of(x)
    padded = _padded(x, geometry, -xp.inf)
    y = xp.empty((x.shape[0], *geometry.out_hw, x.shape[1]), dtype=x.dtype)

    def pool(images):
        out = y[images]
        taps = _taps(padded[images], geometry)
        out[...] = next(taps)
        for tap in taps:
            xp.maximum(out, tap, out=out)       # NaN propagates, as in PyTorch

    map_tiles(pool, x.shape[0], images_elements(padded), xp)
    return y.transpose(0, 3, 1, 2), MaxPoolCache(padded, y, tuple(x.shape), geometry)


def maxpool2d_backward(dy, cache):
    """Route each output's gradient to its window's maximum: the saved index, or else the first
    element of the window that equals the maximum (the same element, PyTorch's choice)."""
    if isinstance(cache, MaxPoolIndexCache):
        return _maxpool2d_backward_by_indices(dy, cache)
    xp = xp_of(dy)
    padded, y, x_shape, geometry = cache
    dy_nhwc = dy.transpose(0, 2, 3, 1)

    def window_gradients(images):
        maximum, gradient = y[images], dy_nhwc[images]
        unclaimed = xp.ones(maximum.shape, dtype=bool)
        for tap in _taps(padded[images], geometry):
            winner = (tap == maximum) & unclaimed
            unclaimed &= ~winner
            yield xp.where(winner, gradient, 0)

    return _scatter_taps(window_gradients, x_shape, geometry, dy.dtype, xp)


def _tap_positions(geometry, xp):
    """For each kernel tap, in window order: the (OH, OW, 1) flat input position ``h * W + w`` it reads
    at each output, and -1 where it reads padding."""
    (in_h, in_w), (out_h, out_w) = geometry.in_hw, geometry.out_hw
    for i, j, _, _ in kernel_offsets(geometry.kernel, geometry.stride, geometry.dilation, geometry.out_hw):
        rows = xp.arange(out_h) * geometry.stride[0] - geometry.padding[0] + i * geometry.dilation[0]
        cols = xp.arange(out_w) * geometry.stride[1] - geometry.padding[1] + j * geometry.dilation[1]
        inside = ((rows >= 0) & (rows < in_h))[:, None] & ((cols >= 0) & (cols < in_w))[None, :]
        yield xp.where(inside, rows[:, None] * in_w + cols[None, :], -1)[:, :, None]


def _maxpool2d_with_indices(x, geometry):
    """Max pooling that records where each maximum is, by PyTorch's rule: over the window's input
    elements in order, an element wins when it is greater than the best so far, or NaN, or the first."""
    xp = xp_of(x)
    padded = _padded(x, geometry, -xp.inf)
    y = xp.empty((x.shape[0], *geometry.out_hw, x.shape[1]), dtype=x.dtype)
    indices = xp.empty(y.shape, dtype=xp.int64)
    positions = list(_tap_positions(geometry, xp))

    def pool(images):
        best, argmax = y[images], indices[images]
        best[...] = -xp.inf
        argmax[...] = -1
        for tap, position in zip(_taps(padded[images], geometry), positions):
            wins = (position >= 0) & ((tap > best) | xp.isnan(tap) | (argmax < 0))
            xp.copyto(best, tap, where=wins)
            xp.copyto(argmax, xp.broadcast_to(position, argmax.shape), where=wins)

    map_tiles(pool, x.shape[0], images_elements(padded), xp)
    cache = MaxPoolIndexCache(indices, tuple(x.shape), geometry)
    return (y.transpose(0, 3, 1, 2), indices.transpose(0, 3, 1, 2)), cache


def _maxpool2d_backward_by_indices(dy, cache):
    """Each output's gradient goes to the input element its saved index names (tap by tap, no atomics)."""
    xp = xp_of(dy)
    indices, x_shape, geometry = cache
    dy_nhwc = dy.transpose(0, 2, 3, 1)
    positions = list(_tap_positions(geometry, xp))

    def window_gradients(images):
        winner, gradient = indices[images], dy_nhwc[images]
        for position in positions:
            yield xp.where(winner == position, gradient, 0)

    return _scatter_taps(window_gradients, x_shape, geometry, dy.dtype, xp)


# --- max unpooling -----------------------------------------------------------------------------

def unpool_output_size(x_shape, kernel, stride, padding, output_size=None):
    """PyTorch's output size of max unpooling: ``(H - 1) * stride + kernel - 2 * padding`` per axis by
    default; a given ``output_size`` ((H, W) or (N, C, H, W)) must lie strictly within ``stride`` of it."""
    default = tuple((x_shape[2 + a] - 1) * stride[a] + kernel[a] - 2 * padding[a] for a in range(2))
    if output_size is None:
        size = default
    else:
        size = tuple(int(v) for v in output_size)
        if len(size) == 4:
            size = size[2:]
        if len(size) != 2:
            raise ValueError(f"output_size must hold 2 or 4 sizes, got {tuple(output_size)!r}")
        for a in range(2):
            if not default[a] - stride[a] < size[a] < default[a] + stride[a]:
                raise ValueError(f"invalid output_size {size}: dimension {a} must be between "
                                 f"{default[a] - stride[a]} and {default[a] + stride[a]} (exclusive)")
    if min(size) < 0:
        raise ValueError(f"max unpooling would give a negative output size {size}")
    return size


def maxunpool2d_forward(x, indices, kernel_size, stride=None, padding=0, output_size=None):
    """``(y, cache)``: a partial inverse of max pooling; ``y`` (N, C, OH, OW) is zero except
    ``y[n, c].flat[indices[n, c, h, w]] = x[n, c, h, w]`` (a repeated index keeps the last value,
    as PyTorch's CPU kernel does).  ``y`` is stored channels-last."""
    xp = xp_of(x)
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = pair(stride if stride is not None else kernel_size, "stride", minimum=1)
    padding = pair(padding, "padding")
    if not hasattr(indices, "dtype") or indices.dtype.kind not in "iu":
        raise TypeError(f"max unpooling expects integer indices, got {getattr(indices, 'dtype', type(indices))}")
    if tuple(indices.shape) != tuple(x.shape):
        raise ValueError(f"max unpooling expects indices of the input's shape {tuple(x.shape)}, "
                         f"got {tuple(indices.shape)}")
    n, c, h, w = x.shape
    out_h, out_w = unpool_output_size(x.shape, kernel, stride, padding, output_size)
    indices_nhwc = indices.transpose(0, 2, 3, 1)
    if xp is np and indices.size:           # (on a GPU this check would wait for the device)
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= out_h * out_w:
            bad = low if low < 0 else high
            raise ValueError(f"max unpooling found index {bad}, outside the output plane of {out_h}x{out_w}")
    planes = xp.zeros((n, out_h * out_w, c), dtype=x.dtype)
    images, channels = xp.arange(n)[:, None, None, None], xp.arange(c)[None, None, None, :]
    planes[images, indices_nhwc, channels] = x.transpose(0, 2, 3, 1)
    y = planes.reshape(n, out_h, out_w, c).transpose(0, 3, 1, 2)
    return y, (indices, tuple(x.shape))


def maxunpool2d_backward(dy, cache):
    """``dx[n, c, h, w] = dy[n, c].flat[indices[n, c, h, w]]``: each input reads back the gradient of
    the place it was put (every repeat of an index reads it, as in PyTorch)."""
    xp = xp_of(dy)
    indices, x_shape = cache
    n, c = x_shape[:2]
    planes = dy.transpose(0, 2, 3, 1).reshape(n, -1, c)
    images, channels = xp.arange(n)[:, None, None, None], xp.arange(c)[None, None, None, :]
    return planes[images, indices.transpose(0, 2, 3, 1), channels].transpose(0, 3, 1, 2)


# --- average pooling -------------------------------------------------------------------------

def _window_counts(out_len, in_len, kernel, stride, padding, count_include_pad, xp):
    """How many elements each window along one axis averages over (PyTorch's divisor)."""
    start = xp.arange(out_len) * stride - padding
    end = xp.minimum(start + kernel, in_len + padding)
    if not count_include_pad:
        start = xp.maximum(start, 0)
        end = xp.minimum(end, in_len)
    return end - start


def avgpool2d_forward(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                      divisor_override=None):
    """``(y, cache)``; the cache holds the per-output divisor."""
    xp = xp_of(x)
    geometry = pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None:
        if divisor_override == 0:
            raise ValueError("divisor_override must not be zero")
        divisor = xp.full((), divisor_override, dtype=x.dtype)
    else:
        counts = [_window_counts(geometry.out_hw[a], geometry.in_hw[a], geometry.kernel[a], geometry.stride[a],
                                 geometry.padding[a], count_include_pad, xp) for a in range(2)]
        divisor = (counts[0][:, None] * counts[1][None, :]).astype(x.dtype)[:, :, None]   # (OH, OW, 1)
    padded = _padded(x, geometry, 0.0)
    total = xp.zeros((x.shape[0], *geometry.out_hw, x.shape[1]), dtype=x.dtype)
    for _, _, rows, cols in kernel_offsets(geometry.kernel, geometry.stride, geometry.dilation, geometry.out_hw):
        total += padded[:, rows, cols]
    y = total / divisor
    return y.transpose(0, 3, 1, 2), (divisor, tuple(x.shape), geometry)


def avgpool2d_backward(dy, cache):
    """Spread ``dy / divisor`` evenly over each window."""
    divisor, x_shape, geometry = cache
    share = dy.transpose(0, 2, 3, 1) / divisor
    taps = geometry.kernel[0] * geometry.kernel[1]
    return _scatter_taps(lambda images: (share[images] for _ in range(taps)), x_shape, geometry, dy.dtype,
                         xp_of(dy))


# --- adaptive average pooling ------------------------------------------------------------------

def adaptive_bins(in_len, out_len):
    """PyTorch's bins: bin i covers [floor(i*in/out), ceil((i+1)*in/out))."""
    return [(i * in_len // out_len, -(-(i + 1) * in_len // out_len)) for i in range(out_len)]


def adaptive_output_size(x_shape, output_size):
    out = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    if len(out) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    return tuple(x_shape[2 + a] if out[a] is None else int(out[a]) for a in range(2))


def adaptive_avgpool2d_forward(x, output_size):
    """``(y, cache)``: the mean of each adaptive bin.  (1, 1) is the global average."""
    xp = xp_of(x)
    n, c, h, w = x.shape
    out_h, out_w = adaptive_output_size(x.shape, output_size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output_size must be positive, got {(out_h, out_w)}")
    x_nhwc = x.transpose(0, 2, 3, 1)
    y = xp.empty((n, out_h, out_w, c), dtype=x.dtype)
    for oh, (h0, h1) in enumerate(adaptive_bins(h, out_h)):
        for ow, (w0, w1) in enumerate(adaptive_bins(w, out_w)):
            y[:, oh, ow] = x_nhwc[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y.transpose(0, 3, 1, 2), tuple(x.shape)


def adaptive_avgpool2d_backward(dy, x_shape):
    """Each bin's gradient, divided by the bin's area, spread over the bin (bins may overlap)."""
    xp = xp_of(dy)
    n, c, h, w = x_shape
    out_h, out_w = dy.shape[2:]
    dy_nhwc = dy.transpose(0, 2, 3, 1)
    dx = xp.zeros((n, h, w, c), dtype=dy.dtype)
    for oh, (h0, h1) in enumerate(adaptive_bins(h, out_h)):
        for ow, (w0, w1) in enumerate(adaptive_bins(w, out_w)):
            dx[:, h0:h1, w0:w1] += (dy_nhwc[:, oh, ow] / ((h1 - h0) * (w1 - w0)))[:, None, None, :]
    return dx.transpose(0, 3, 1, 2)

