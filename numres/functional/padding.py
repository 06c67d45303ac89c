"""Explicit padding of NCHW arrays: "same" with an odd total, and the reflect, replicate and circular modes.

im2col pads with zeros on the fly; what it cannot do is done here first, as a copy
``padded = x[s_h(i), s_w(j)]`` through per-axis source maps (:func:`padding_sources`), and the
backward folds the padded gradient back onto ``x`` (the copy's adjoint).  :func:`split_padding`
says which part of a convolution's padding is which.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import xp_of
from .geometry import pair

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_padding(padding, kernel, stride, dilation):
    """conv2d's ``padding`` argument as amounts per side, ``((top, bottom), (left, right))``.

    An int or a 1-/2-sequence pads both sides of an axis alike; ``"valid"`` pads nothing;
    ``"same"`` (stride 1 only) pads ``d*(k-1)`` in all per axis, as PyTorch does: half on each
    side, and the odd cell, if any, at the bottom/right.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((total // 2, total - total // 2) for total in totals)
        raise ValueError(f"padding must be an int, a sequence of 1 or 2 ints, 'same' or 'valid', got {padding!r}")
    pad_h, pad_w = pair(padding, "padding")
    return (pad_h, pad_h), (pad_w, pad_w)


def padding_sources(size, before, after, mode):
    """For each position of a padded axis (``before + size + after`` of them): the input index it copies.

    With ``i`` running from ``-before`` to ``size + after - 1``::

        reflect    s(i) = -i for i < 0, 2 * (size - 1) - i for i >= size (the edge is not repeated)
        replicate  s(i) = clip(i, 0, size - 1)
        circular   s(i) = i mod size
    """
    if mode == "reflect" and max(before, after) >= size:
        raise ValueError(f"padding_mode='reflect' needs padding smaller than the input size, got padding "
                         f"({before}, {after}) for size {size}")
    if mode == "circular" and max(before, after) > size:
        raise ValueError(f"padding_mode='circular' needs padding no larger than the input size, got padding "
                         f"({before}, {after}) for size {size}")
    if mode == "replicate" and size == 0:
        raise ValueError("padding_mode='replicate' needs a non-empty input")
    sources = []
    for i in range(-before, size + after):
        if mode == "reflect":
            i = -i if i < 0 else 2 * (size - 1) - i if i >= size else i
        elif mode == "replicate":
            i = min(max(i, 0), size - 1)
        else:                                   # circular
            i %= size
        sources.append(i)
    return sources


class PadCache(NamedTuple):
    pads: tuple          # ((top, bottom), (left, right))
    mode: str
    in_hw: tuple


def pad2d_forward(x, pads, mode="zeros"):
    """``(padded, cache)``: ``x`` (N, C, H, W) framed by ``pads = ((top, bottom), (left, right))``.

    ``zeros`` frames with 0; the other modes copy input values: ``padded[..., i, j] =
    x[..., s_h(i), s_w(j)]`` with the source maps of :func:`padding_sources`.  ``padded`` is
    stored channels-last, like every numres activation.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    xp = xp_of(x)
    n, c, h, w = x.shape
    (top, bottom), (left, right) = pads
    x_nhwc = x.transpose(0, 2, 3, 1)
    if mode == "zeros":
        padded = xp.zeros((n, top + h + bottom, left + w + right, c), dtype=x.dtype)
        padded[:, top:top + h, left:left + w] = x_nhwc
    else:
        rows = xp.asarray(padding_sources(h, top, bottom, mode))
        cols = xp.asarray(padding_sources(w, left, right, mode))
        padded = x_nhwc[:, rows[:, None], cols[None, :]]            # one gather, contiguous (N, H', W', C)
    return padded.transpose(0, 3, 1, 2), PadCache(tuple(pads), mode, (h, w))


def pad2d_backward(dpadded, cache: PadCache):
    """dL/dx from dL/dpadded: the adjoint of the copy in :func:`pad2d_forward`.

    Each input element receives the gradient of every padded position that copied it,
    ``dx[k] = sum over i with s(i) = k of dpadded[i]`` along each axis; for ``zeros`` that is
    just the interior (the frame copied nothing).
    """
    (top, bottom), (left, right) = cache.pads
    h, w = cache.in_hw
    grad = dpadded.transpose(0, 2, 3, 1)
    if cache.mode == "zeros":
        dx = grad[:, top:top + h, left:left + w].copy()
    else:
        dx = _fold_axis(grad, 1, padding_sources(h, top, bottom, cache.mode), top, h)
        dx = _fold_axis(dx, 2, padding_sources(w, left, right, cache.mode), left, w)
    return dx.transpose(0, 3, 1, 2)


def _fold_axis(grad, axis, sources, before, size):
    """Sum the gradient of each padded position along ``axis`` into the input position it copied."""
    def at(index):
        return (slice(None),) * axis + (index,)

    folded = grad[at(slice(before, before + size))].copy()         # the interior copies each input once
    for position, source in enumerate(sources):
        if not before <= position < before + size:                  # a border position (few of them)
            folded[at(source)] += grad[at(position)]
    return folded


def split_padding(pads, mode):
    """``(symmetric, explicit)``: what im2col pads with zeros on the fly, and what is padded beforehand.

    Zero padding stays in im2col, except the odd extra cell of ``padding="same"`` (bottom/right),
    which is padded explicitly; the other modes pad everything explicitly.
    """
    (top, bottom), (left, right) = pads
    if mode == "zeros":
        return (top, left), ((0, bottom - top), (0, right - left))
    return (0, 0), pads
