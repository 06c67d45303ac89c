"""Max, average and adaptive-average pooling over (N, C, H, W), forward beside backward.

All three walk the kernel one tap at a time over strided views of a padded,
channels-last copy of the input (see :func:`numres.functional.conv.kernel_offsets`),
so no Python loop ever runs over pixels and no window-sized temporary is built.

Max pooling::   y = max over the window (padding is -inf)
                dx: each window's dy goes to one element, its *first* maximum (PyTorch's choice)
Average::       y = sum over the window / divisor
                dx: every element of the window receives dy / divisor
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import xp_of
from ..parallel import map_tiles
from .conv import kernel_offsets, output_size, pad_nhwc, pair


class PoolGeometry(NamedTuple):
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    in_hw: tuple
    out_hw: tuple
    extra: tuple    # cells of padding added at the bottom/right for ceil_mode's last window


def pool_geometry(x_shape, kernel_size, stride, padding, dilation=1, ceil_mode=False):
    """Window geometry for pooling ``x_shape``; checks PyTorch's padding rule."""
    kernel = pair(kernel_size, "kernel_size")
    stride = pair(stride if stride is not None else kernel_size, "stride")
    padding, dilation = pair(padding, "padding"), pair(dilation, "dilation")
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

    map_tiles(accumulate, n, padded[0].size, xp)
    return padded[:, pad_h:pad_h + h, pad_w:pad_w + w].transpose(0, 3, 1, 2)


def _taps(frame, geometry):
    """The strided view of ``frame`` (padded NHWC images) that each kernel tap reads, in window order."""
    for _, _, rows, cols in kernel_offsets(geometry.kernel, geometry.stride, geometry.dilation, geometry.out_hw):
        yield frame[:, rows, cols]


# --- max pooling -----------------------------------------------------------------------------

def maxpool2d_forward(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """``(y, cache)``: the running maximum over the taps; the cache keeps the padded input and ``y``."""
    xp = xp_of(x)
    geometry = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    padded = _padded(x, geometry, -xp.inf)
    y = xp.empty((x.shape[0], *geometry.out_hw, x.shape[1]), dtype=x.dtype)

    def pool(images):
        out = y[images]
        taps = _taps(padded[images], geometry)
        out[...] = next(taps)
        for tap in taps:
            xp.maximum(out, tap, out=out)       # NaN propagates, as in PyTorch

    map_tiles(pool, x.shape[0], padded[0].size, xp)
    return y.transpose(0, 3, 1, 2), (padded, y, tuple(x.shape), geometry)


def maxpool2d_backward(dy, cache):
    """Route each output's gradient to the first element of its window that equals the maximum."""
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

