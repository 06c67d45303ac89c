"""2-D convolution as im2col + GEMM, forward beside backward.

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
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import xp_of
from ..parallel import map_tiles


def pair(value, name="value"):
    """``3 -> (3, 3)``; a 2-sequence passes through."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def output_size(size, kernel, stride, padding, dilation, ceil_mode=False):
    """Length of a sliding-window output along one axis, as PyTorch computes it."""
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    if room < 0:
        raise ValueError(
            f"input size {size} (padded by {padding} each side) is smaller than the "
            f"kernel's extent {span}")
    if ceil_mode:
        out = -(-room // stride) + 1
        # The last window must start inside the input or the left padding.
        if (out - 1) * stride >= size + padding:
            out -= 1
        return out
    return room // stride + 1


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
        map_tiles(fill, n, padded[0].size, xp)
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

    map_tiles(copy_images, n, cols[:, 0].size, xp)
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

    map_tiles(accumulate, n, padded[0].size, xp)
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


class ConvCache(NamedTuple):
    x: object             # the input; backward rebuilds the patch matrix from it
    weight: object        # the weight, PyTorch shape
    x_shape: tuple
    out_hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    has_bias: bool


WORKSPACE_ELEMENTS = 1 << 22    # patch-matrix elements built at once (16 MiB of float32)


def image_chunks(x_shape, kernel, stride, padding, out_hw):
    """Slices of the batch whose patch matrices fit :data:`WORKSPACE_ELEMENTS` together.

    Working through the batch chunk by chunk bounds im2col's workspace and keeps each patch
    matrix in cache between the copy that builds it and the GEMM that reads it.  A 1x1 stride-1
    convolution builds no patch matrix (it reads the input itself) and takes one chunk.
    """
    n, c = x_shape[:2]
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return [slice(0, n)]
    per_image = out_hw[0] * out_hw[1] * kernel[0] * kernel[1] * c
    images = max(1, WORKSPACE_ELEMENTS // per_image)
    return [slice(start, min(start + images, n)) for start in range(0, n, images)]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``y = conv2d(x, weight) + bias`` -> ``(y, cache)``; ``y`` is (N, O, OH, OW), stored channels-last."""
    xp = xp_of(x)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    out_channels, cg, kh, kw = weight.shape
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
                      bias is not None)
    return y, cache


def conv2d_backward(dy, cache: ConvCache, need_input_grad=True):
    """Gradients ``(dx, dweight, dbias)`` from ``dy`` (N, O, OH, OW).

    ``dx`` is None when ``need_input_grad`` is False (the stem of a network needs none);
    ``dbias`` is None for a convolution without bias.  ``dweight`` has the weight's shape and
    is stored ``(kh, kw, Cg, O)``, like the weights of :class:`numres.nn.Conv2d`.

    The patch matrix is rebuilt here, chunk by chunk, from the saved input rather than kept
    from forward: for a 3x3 convolution it is nine times the input's size, and rebuilding it
    costs one copy (for a 1x1 stride-1 convolution it is the input itself, so nothing at all).
    """
    xp = xp_of(dy)
    groups = cache.groups
    out_channels, cg, kh, kw = cache.weight.shape
    n = cache.x_shape[0]
    pixels = cache.out_hw[0] * cache.out_hw[1]
    dy_rows = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(n * pixels, groups, out_channels // groups)
    matrix_t = weight_matrix(cache.weight, groups).transpose(0, 2, 1)

    dweight = xp.empty((kh * kw * cg, groups, out_channels // groups), dtype=dy.dtype)
    dweight_groups = dweight.transpose(1, 0, 2)                     # (g, kh*kw*Cg, O/g)
    dx = xp.empty((n, cache.x_shape[2], cache.x_shape[3], cache.x_shape[1]), dtype=dy.dtype) \
        if need_input_grad else None
    chunks = image_chunks(cache.x_shape, cache.kernel, cache.stride, cache.padding, cache.out_hw)
    for index, images in enumerate(chunks):
        cols, _ = im2col(cache.x[images], cache.kernel, cache.stride, cache.padding, cache.dilation, groups)
        dy_chunk = dy_rows[images.start * pixels:images.stop * pixels].transpose(1, 0, 2)    # (g, rows, O/g)
        if index == 0:
            group_matmul(cols.transpose(0, 2, 1), dy_chunk, out=dweight_groups)
        else:
            dweight_groups += group_matmul(cols.transpose(0, 2, 1), dy_chunk)
        if need_input_grad:
            dcols = group_matmul(dy_chunk, matrix_t)
            col2im(dcols, (images.stop - images.start, *cache.x_shape[1:]), cache.kernel, cache.stride,
                   cache.padding, cache.dilation, cache.out_hw, groups, out=dx[images])
    dweight = dweight.reshape(kh, kw, cg, out_channels).transpose(3, 2, 0, 1)
    dbias = dy_rows.reshape(n * pixels, out_channels).sum(axis=0) if cache.has_bias else None
    if need_input_grad:
        dx = dx.transpose(0, 3, 1, 2)
    return dx, dweight, dbias
