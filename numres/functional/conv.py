"""2-D convolution as im2col + GEMM, forward beside backward.

The engine's version of :mod:`numres.reference.conv` (read that first: a sum over the kernel's
offsets, its gradient derived in the docstring).  What changed, and why: every window is copied
into one patch matrix so that the whole layer is one large GEMM, which BLAS runs near its peak;
activations are stored channels-last so that copy is contiguous and a 1x1 convolution needs none;
the patch matrix is built a chunk of images at a time (a bounded workspace) on all cores.
``docs/ladder.md`` measures each of these steps.

Layout.  Arrays keep PyTorch's NCHW *shape*, but the work is done on the
NHWC *view* ``x.transpose(0, 2, 3, 1)``.  When ``x`` is stored channels-last
(as every activation numres produces is) that view is contiguous, so

* a 1x1 stride-1 convolution is a single GEMM on ``x`` itself, with no copy;
* im2col is one strided view of the (padded) input plus one copy;
* the GEMM output ``(N*OH*OW, O)`` already *is* the channels-last result.

Weights keep PyTorch's shape ``(O, I/groups, kh, kw)``.  The GEMM wants them as a
``(kh*kw*I/groups, O)`` matrix; when the weight is stored as ``(kh, kw, I/groups, O)``
(which :class:`numres.nn.Conv2d` does) that matrix is a free view as well.

Math, with ``cols`` the im2col matrix (rows: output pixels, columns: the
receptive field flattened as ``(kh, kw, c)``) and ``W`` the weight matrix,
per group ``g``::

    y_g   = cols_g @ W_g + b_g
    dW_g  = cols_g^T @ dy_g
    db    = sum over output pixels of dy
    dcols_g = dy_g @ W_g^T ,   dx = col2im(dcols)   (scatter-add of each window)

Padding.  im2col pads with zeros on the fly.  What it cannot do - the odd extra row/column of
``padding="same"`` (PyTorch puts it at the bottom/right) and the ``reflect``, ``replicate`` and
``circular`` modes - :mod:`numres.functional.padding` does first, as a copy.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import xp_of
from ..parallel import map_tiles
from .geometry import output_size, pair
from .padding import (PADDING_MODES, PadCache, conv_padding, pad2d_backward, pad2d_forward,  # noqa: F401
                      padding_sources, split_padding)


def images_elements(array):
    """Elements per image (per entry of the first axis) of ``array``; 0 images are fine."""
    return math.prod(array.shape[1:])


def pad_nhwc(x_nhwc, pad_h, pad_w, value=0.0, extra_h=0, extra_w=0, threads=True):
    """``x_nhwc`` framed by ``value``: ``pad`` rows/cols each side plus ``extra`` more at the end.

    The copy is split over the images on all cores unless ``threads`` is False (a caller that
    already runs on a share of the images).
    """
    if pad_h == pad_w == extra_h == extra_w == 0:
        return x_nhwc
    xp = xp_of(x_nhwc)
    n, h, w, c = x_nhwc.shape
    padded = xp.empty((n, h + 2 * pad_h + extra_h, w + 2 * pad_w + extra_w, c), dtype=x_nhwc.dtype)

    def fill(images):
        frame = padded[images]
        frame[:, :pad_h] = value
        frame[:, pad_h + h:] = value
        frame[:, pad_h:pad_h + h, :pad_w] = value
        frame[:, pad_h:pad_h + h, pad_w + w:] = value
        frame[:, pad_h:pad_h + h, pad_w:pad_w + w] = x_nhwc[images]

    if threads:
        map_tiles(fill, n, images_elements(padded), xp)
    else:
        fill(slice(0, n))
    return padded


def sliding_windows(padded_nhwc, kernel, stride, dilation, out_hw, groups=1):
    """A read-only view ``(N, OH, OW, kh, kw, groups, C/groups)`` of every window; no copy."""
    xp = xp_of(padded_nhwc)
    n, _, _, c = padded_nhwc.shape
    s_n, s_h, s_w, s_c = padded_nhwc.strides
    shape = (n, out_hw[0], out_hw[1], kernel[0], kernel[1], groups, c // groups)
    strides = (s_n, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1],
               s_c * (c // groups), s_c)
    return xp.lib.stride_tricks.as_strided(padded_nhwc, shape=shape, strides=strides)


def kernel_offsets(kernel, stride, dilation, out_hw):
    """For each kernel tap ``(i, j)``: the strided slices of the padded input it reads."""
    for i in range(kernel[0]):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_hw[0] - 1) + 1, stride[0])
        for j in range(kernel[1]):
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_hw[1] - 1) + 1, stride[1])
            yield i, j, rows, cols


def im2col(x, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """``x`` (N, C, H, W) -> ``(groups, N*OH*OW, kh*kw*C/groups)`` patch matrix, and ``(OH, OW)``.

    A 1x1, stride-1, unpadded convolution over channels-last ``x`` returns ``x``'s own memory.
    """
    xp = xp_of(x)
    n, c, h, w = x.shape
    out_hw = (output_size(h, kernel[0], stride[0], padding[0], dilation[0]),
              output_size(w, kernel[1], stride[1], padding[1], dilation[1]))
    rows = n * out_hw[0] * out_hw[1]
    shape = (groups, rows, kernel[0] * kernel[1] * (c // groups))
    x_nhwc = x.transpose(0, 2, 3, 1)

    def windows_of(images, threads=False):
        """(g, n, OH, OW, kh, kw, Cg) view of the windows of some images, padded as needed."""
        padded = pad_nhwc(x_nhwc[images], padding[0], padding[1], threads=threads)
        return sliding_windows(padded, kernel, stride, dilation, out_hw, groups).transpose(5, 0, 1, 2, 3, 4, 6)

    if padding == (0, 0):
        unpadded = windows_of(slice(0, n))                # a view: nothing is copied yet
        if unpadded.flags.c_contiguous:
            # A 1x1 stride-1 convolution over channels-last x: the patch matrix is x itself.
            return unpadded.reshape(shape), out_hw
    cols = xp.empty((groups, n, out_hw[0], out_hw[1], kernel[0], kernel[1], c // groups), dtype=x.dtype)

    def copy_images(images):
        # Pad and copy image by image on all cores: each padded image is still in cache when copied.
        cols[:, images] = windows_of(images) if padding != (0, 0) else unpadded[:, images]

    map_tiles(copy_images, n, groups * images_elements(cols[0]), xp)
    return cols.reshape(shape), out_hw


def col2im(dcols, x_shape, kernel, stride, padding, dilation, out_hw, groups=1, out=None):
    """Adjoint of :func:`im2col`: scatter-add each patch row back onto an (N, C, H, W) gradient.

    Accumulates one kernel tap at a time, so no window-sized temporary is built.  ``out``, an
    (N, H, W, C) array, receives the result when given.
    """
    xp = xp_of(dcols)
    n, c, h, w = x_shape
    cg = c // groups
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
        # Every input pixel sits in exactly one window: col2im is a reshape.
        dx_nhwc = dcols.transpose(1, 0, 2).reshape(n, h, w, c)
        if out is not None:
            out[...] = dx_nhwc
            dx_nhwc = out
        return dx_nhwc.transpose(0, 3, 1, 2)
    taps = dcols.reshape(groups, n, out_hw[0], out_hw[1], kernel[0], kernel[1], cg)
    padded = xp.empty((n, h + 2 * padding[0], w + 2 * padding[1], groups, cg), dtype=dcols.dtype)
    dx_nhwc = (xp.empty((n, h, w, c), dtype=dcols.dtype) if out is None else out).reshape(n, h, w, groups, cg)

    def accumulate(images):
        frame = padded[images]
        frame[...] = 0
        for i, j, rows, cols in kernel_offsets(kernel, stride, dilation, out_hw):
            frame[:, rows, cols] += taps[:, images, :, :, i, j, :].transpose(1, 2, 3, 0, 4)
        # Crop the padding while the frame is still in cache; dx comes out contiguous channels-last.
        dx_nhwc[images] = frame[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w]

    map_tiles(accumulate, n, images_elements(padded), xp)
    return dx_nhwc.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def weight_matrix(weight, groups):
    """PyTorch weight ``(O, Cg, kh, kw)`` as the stacked GEMM operand ``(groups, kh*kw*Cg, O/groups)``."""
    out_channels, cg, kh, kw = weight.shape
    rows = kh * kw * cg
    # (kh, kw, Cg, O) is a free view when the weight is stored that way (numres.nn.Conv2d does).
    matrix = weight.transpose(2, 3, 1, 0).reshape(rows, out_channels)
    return matrix.reshape(rows, groups, out_channels // groups).transpose(1, 0, 2)


def group_matmul(a, b, out=None):
    """``a[g] @ b[g]`` for every group of stacked ``(groups, m, k)`` and ``(groups, k, n)`` operands.

    With one group it is a single 2-D GEMM (a batched matmul would make CuPy copy both operands).
    """
    xp = xp_of(a)
    if a.shape[0] != 1:
        return xp.matmul(a, b, out=out)
    if out is None:
        return xp.matmul(a[0], b[0])[None]
    xp.matmul(a[0], b[0], out=out[0])
    return out


# --- convolution ----------------------------------------------------------------------------------

def conv_output_hw(in_hw, kernel, stride, padding, dilation):
    """``(OH, OW)`` of a convolution with any ``padding`` that :func:`conv_padding` accepts."""
    pads = conv_padding(padding, kernel, stride, dilation)
    # Padding (before, after) on an axis of length L: symmetric padding `before` on length L + after - before.
    return tuple(output_size(in_hw[a] + pads[a][1] - pads[a][0], kernel[a], stride[a], pads[a][0], dilation[a])
                 for a in range(2))


class ConvCache(NamedTuple):
    x: object             # the input (explicitly padded, if it was); backward rebuilds the patch matrix from it
    weight: object        # the weight, PyTorch shape
    x_shape: tuple
    out_hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple        # the symmetric zero padding im2col applies
    dilation: tuple
    groups: int
    has_bias: bool
    explicit_padding: object = None   # a PadCache when the input was padded before im2col
    forward_algorithm: str = "im2col"  # "implicit" when implicit GEMM made the output (conv_algorithms)


WORKSPACE_ELEMENTS = 1 << 22    # patch-matrix elements built at once (16 MiB of float32)


def image_chunks(x_shape, kernel, stride, padding, out_hw):
    """Slices of the batch whose patch matrices fit :data:`WORKSPACE_ELEMENTS` together.

    Working through the batch chunk by chunk bounds im2col's workspace and keeps each patch
    matrix in cache between the copy that builds it and the GEMM that reads it.  A 1x1 stride-1
    convolution builds no patch matrix (it reads the input itself) and takes one chunk.
    """
    n, c = x_shape[:2]
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return [slice(0, n)] if n else []
    per_image = out_hw[0] * out_hw[1] * kernel[0] * kernel[1] * c
    images = max(1, WORKSPACE_ELEMENTS // max(1, per_image))
    return [slice(start, min(start + images, n)) for start in range(0, n, images)]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros"):
    """``y = conv2d(x, weight) + bias`` -> ``(y, cache)``; ``y`` is (N, O, OH, OW), stored channels-last.

    ``padding`` is an int, a 1-/2-sequence, ``"valid"`` or ``"same"``; ``padding_mode`` is
    ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as in PyTorch.  Padding that
    im2col cannot do on the fly (non-zero modes, the odd cell of ``"same"``) is applied first by
    :func:`pad2d_forward`, and backward folds its gradient back onto ``x``.
    """
    xp = xp_of(x)
    stride, dilation = pair(stride, "stride", minimum=1), pair(dilation, "dilation", minimum=1)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    out_channels, cg, kh, kw = weight.shape
    padding, explicit = split_padding(conv_padding(padding, (kh, kw), stride, dilation), padding_mode)
    pad_cache = None
    if explicit != ((0, 0), (0, 0)):
        x, pad_cache = pad2d_forward(x, explicit, padding_mode)
    n, _, h, w = x.shape
    out_hw = (output_size(h, kh, stride[0], padding[0], dilation[0]),
              output_size(w, kw, stride[1], padding[1], dilation[1]))
    pixels = out_hw[0] * out_hw[1]
    matrix = weight_matrix(weight, groups)
    y = xp.empty((n * pixels, groups, out_channels // groups), dtype=x.dtype)
    for images in image_chunks(x.shape, (kh, kw), stride, padding, out_hw):
        cols, _ = im2col(x[images], (kh, kw), stride, padding, dilation, groups)
        group_matmul(cols, matrix, out=y[images.start * pixels:images.stop * pixels].transpose(1, 0, 2))
    y = y.reshape(n * pixels, out_channels)
    if bias is not None:
        y += bias
    y = y.reshape(n, out_hw[0], out_hw[1], out_channels).transpose(0, 3, 1, 2)
    cache = ConvCache(x, weight, tuple(x.shape), out_hw, (kh, kw), stride, padding, dilation, groups,
                      bias is not None, pad_cache)
    return y, cache


def conv2d_backward(dy, cache: ConvCache, need_input_grad=True, *, need_weight_grad=True, need_bias_grad=None):
    """Gradients ``(dx, dweight, dbias)`` from ``dy`` (N, O, OH, OW).

    A gradient that is not needed is None and costs nothing: ``dx`` when ``need_input_grad`` is
    False (the stem of a network needs none); ``dweight`` when ``need_weight_grad`` is False (a
    frozen weight: the weight-gradient GEMM, and the patch matrices it reads, are skipped);
    ``dbias`` when ``need_bias_grad`` is False, which by default follows ``need_weight_grad``
    (:func:`conv2d_bias_backward` gives the bias gradient alone).  ``dbias`` is also None for a
    convolution without bias.  ``dweight`` has the weight's shape and is stored
    ``(kh, kw, Cg, O)``, like the weights of :class:`numres.nn.Conv2d`.

    The patch matrix is rebuilt here, chunk by chunk, from the saved input rather than kept
    from forward: for a 3x3 convolution it is nine times the input's size, and rebuilding it
    costs one copy (for a 1x1 stride-1 convolution it is the input itself, so nothing at all).
    """
    xp = xp_of(dy)
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    groups = cache.groups
    out_channels, cg, kh, kw = cache.weight.shape
    n = cache.x_shape[0]
    pixels = cache.out_hw[0] * cache.out_hw[1]
    dy_rows = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(n * pixels, groups, out_channels // groups)
    matrix_t = weight_matrix(cache.weight, groups).transpose(0, 2, 1)

    dweight = dweight_groups = None
    if need_weight_grad:
        dweight = xp.zeros((kh * kw * cg, groups, out_channels // groups), dtype=dy.dtype)
        dweight_groups = dweight.transpose(1, 0, 2)                 # (g, kh*kw*Cg, O/g)
    dx = xp.empty((n, cache.x_shape[2], cache.x_shape[3], cache.x_shape[1]), dtype=dy.dtype) \
        if need_input_grad else None
    chunks = image_chunks(cache.x_shape, cache.kernel, cache.stride, cache.padding, cache.out_hw) \
        if need_input_grad or need_weight_grad else []
    for index, images in enumerate(chunks):
        dy_chunk = dy_rows[images.start * pixels:images.stop * pixels].transpose(1, 0, 2)    # (g, rows, O/g)
        if need_weight_grad:
            cols, _ = im2col(cache.x[images], cache.kernel, cache.stride, cache.padding, cache.dilation, groups)
            if index == 0:
                group_matmul(cols.transpose(0, 2, 1), dy_chunk, out=dweight_groups)
            else:
                dweight_groups += group_matmul(cols.transpose(0, 2, 1), dy_chunk)
        if need_input_grad:
            dcols = group_matmul(dy_chunk, matrix_t)
            col2im(dcols, (images.stop - images.start, *cache.x_shape[1:]), cache.kernel, cache.stride,
                   cache.padding, cache.dilation, cache.out_hw, groups, out=dx[images])
    if need_weight_grad:
        dweight = dweight.reshape(kh, kw, cg, out_channels).transpose(3, 2, 0, 1)
    dbias = dy_rows.reshape(n * pixels, out_channels).sum(axis=0) if cache.has_bias and need_bias_grad else None
    if need_input_grad:
        dx = dx.transpose(0, 3, 1, 2)
        if cache.explicit_padding is not None:
            dx = pad2d_backward(dx, cache.explicit_padding)
    return dx, dweight, dbias


def conv2d_bias_backward(dy):
    """``dbias[o] = sum over n, h, w of dy[n, o, h, w]``: the bias gradient alone (for a frozen weight)."""
    return dy.sum(axis=(0, 2, 3))
