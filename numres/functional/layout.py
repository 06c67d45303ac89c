"""Channels-last memory behind NCHW shapes.

numres arrays have PyTorch's (N, C, H, W) shape, but the activations numres
produces are stored channels-last: ``x.transpose(0, 2, 3, 1)`` is contiguous.
Per-channel work then sees an ``(N*H*W, C)`` matrix of rows for free.
"""
from __future__ import annotations

from ..backend import xp_of


def channel_rows(x):
    """(N, C, H, W) -> (N*H*W, C) matrix: a free view when ``x`` is channels-last, else one copy."""
    nhwc = x.transpose(0, 2, 3, 1)
    if not nhwc.flags.c_contiguous:
        nhwc = xp_of(x).ascontiguousarray(nhwc)
    return nhwc.reshape(-1, x.shape[1])


def rows_as_nchw(rows, shape):
    """Inverse of :func:`channel_rows`: (N*H*W, C) -> (N, C, H, W), a channels-last view."""
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def as_rows(x):
    """Any array as a 2-D matrix of rows: channel rows for 4-D input, else ``(-1, last axis)``."""
    if x.ndim == 4:
        return channel_rows(x)
    x = xp_of(x).ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def rows_like(rows, template):
    """Give ``rows`` (from :func:`as_rows` of ``template``) the template's shape back."""
    if template.ndim == 4:
        return rows_as_nchw(rows, template.shape)
    return rows.reshape(template.shape)
