"""Winograd convolution F(m x m, 3 x 3) for 3x3, stride-1 layers: forward beside both backward passes.

The same convolution as :func:`numres.reference.conv2d_forward`, with fewer multiplications.

One output tile.  A 3x3 kernel ``g`` slid over an ``a x a`` input tile ``d`` (``a = m + 2``)
gives an ``m x m`` output tile.  Winograd (Lavin & Gray, 2016) writes it as::

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* is the elementwise product)

``G`` (a x 3), ``B^T`` (a x a) and ``A^T`` (m x a) are small constant matrices (see
:data:`F2` and :data:`F4`).  ``m*m*9`` multiplications per tile and channel pair become
``a*a``: 2.25x fewer for F(2x2, 3x3), 4x fewer for F(4x4, 3x3).

Whole layer.  Summing over input channels ``c`` commutes with ``A^T ... A``, so for each of the
``a*a`` tile positions ``(xi, nu)`` the products summed over channels are one matrix product::

    U[xi,nu] = (G g G^T)[xi,nu]      (C, O)    the transformed weight
    V[xi,nu] = (B^T d B)[xi,nu]      (T, C)    the transformed input tiles, T tiles in all
    M[xi,nu] = V[xi,nu] @ U[xi,nu]   (T, O)    one batched matmul over the a*a positions
    Y_tile   = A^T M_tile A                    the output transform

Backward.  With ``dY`` the output gradient of one tile:

* input gradient: the adjoint of a 3x3 stride-1 correlation is again one.  ``dx`` is ``dy``
  padded by ``2 - padding`` and correlated with the kernel turned by 180 degrees, its two
  channel axes swapped, which is again a Winograd forward;
* weight gradient: ``y`` is linear in ``U``, and the transpose of each step gives::

      dM[xi,nu] = (A dY A^T)[xi,nu]                   (T, O)    dy's tiles transformed with A
      dU[xi,nu] = V[xi,nu]^T @ dM[xi,nu]              (C, O)    batched matmul, sums over tiles
      dg        = G^T dU G

docs/winograd.md derives both with a worked 4x4 tile.

Layout and cost.  As in :mod:`numres.functional.conv`, activations are NCHW-shaped and stored
channels-last, weights are stored ``(3, 3, I, O)``, and the batch is worked through in chunks
whose transformed tiles fit :data:`WORKSPACE_ELEMENTS`.  The transforms
are where the time goes besides the matmul, so each is written as a few adds and subtracts of
strided slices into preallocated buffers (no einsum with tiny matrices), on cache-sized runs of
tile rows on all cores (:func:`numres.parallel.map_tiles`).  An output whose height or width is
not a multiple of ``m`` gets a last tile that reads zeros past the input and writes only the
rows and columns that exist.

Memory.  Backward needs ``V``.  Keeping it from forward would hold ``a*a/(m*m)`` times the
input (4x for F(2,3), 2.25x for F(4,3)) per layer until backward; the cache keeps only the
input and backward transforms it again, chunk by chunk (one input transform, about the cost of
an elementwise pass over V).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..parallel import get_num_threads, map_tiles
from .geometry import output_size, pair


class WinogradTransforms(NamedTuple):
    """The constant matrices of F(m x m, 3 x 3), as nested tuples (host constants on any backend)."""
    tile: int          # m: output tile is m x m
    size: int          # a = m + 2: input tile is a x a
    BT: tuple          # (a, a) input transform B^T
    G: tuple           # (a, 3) kernel transform
    AT: tuple          # (m, a) output transform A^T


# F(2x2, 3x3), interpolation points 0, 1, -1 and infinity.
F2 = WinogradTransforms(
    tile=2, size=4,
    BT=((1, 0, -1, 0),
        (0, 1, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0, -1)),
    G=((1, 0, 0),
       (0.5, 0.5, 0.5),
       (0.5, -0.5, 0.5),
       (0, 0, 1)),
    AT=((1, 1, 1, 0),
        (0, 1, -1, -1)))

# F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 and infinity.
F4 = WinogradTransforms(
    tile=4, size=6,
    BT=((4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)),
    G=((1 / 4, 0, 0),
       (-1 / 6, -1 / 6, -1 / 6),
       (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6),
       (1 / 24, -1 / 12, 1 / 6),
       (0, 0, 1)),
    AT=((1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 0),
        (0, 1, 1, 4, 4, 0),
        (0, 1, -1, 8, -8, 1)))

TRANSFORMS = {2: F2, 4: F4}

# Measured on one core of a Xeon (AVX-512), 3x3 layers of ResNet at batch 8: runs of about 1 MiB of
# transformed tiles amortise NumPy's per-call cost, and chunks of about 4 MiB keep the transformed
# tiles in cache between the transform and the GEMM (16 MiB chunks were 10-30% slower).
TRANSFORM_TILE_ELEMENTS = 1 << 18    # transformed-tile elements per run of tile rows (1 MiB of float32)
WORKSPACE_ELEMENTS = 1 << 20         # transformed-tile elements per chunk of images, at least one run per thread
GPU_WORKSPACE_ELEMENTS = 1 << 26     # the same on a GPU (256 MiB of float32)


def transposed(matrix):
    """The transpose of a nested-tuple matrix."""
    return tuple(zip(*matrix))


def transforms_for(tile):
    """The :class:`WinogradTransforms` of F(tile x tile, 3x3); a clear error for a size we lack."""
    if tile not in TRANSFORMS:
        raise ValueError(f"Winograd output tile must be one of {sorted(TRANSFORMS)} (F(2x2,3x3) or "
                         f"F(4x4,3x3)), got {tile!r}")
    return TRANSFORMS[tile]


# --- the one building block: out = sum_j coefficient_j * array_j --------------------------------------


def _signed_sum(xp, target, terms):
    """``target[...] = sum of +-a`` over ``terms`` [(positive, a)], the first of which is positive."""
    (_, first), rest = terms[0], terms[1:]
    if rest:
        positive, second = rest[0]
        (xp.add if positive else xp.subtract)(first, second, out=target)
        rest = rest[1:]
    else:
        target[...] = first
    for positive, array in rest:
        (xp.add if positive else xp.subtract)(target, array, out=target)


def combine(xp, out, coefficients, arrays, scratch=None):
    """``out[...] = sum_j coefficients[j] * arrays[j]``, skipping zero coefficients, in few passes.

    Terms are grouped by the size of their coefficient: a group is summed with adds and
    subtracts, then multiplied once (``4*d1 + 4*d2`` is one add and one multiply).  F(2,3)'s input
    and output transforms have only +-1, so each output there costs one add or subtract per
    term after the first.  ``scratch``, a buffer at least as large as ``out`` on every axis, is
    used (cropped) for the groups with a coefficient other than +-1; one is made when needed.
    """
    groups = {}
    for c, a in zip(coefficients, arrays):
        if c:
            groups.setdefault(abs(c), []).append((c > 0, a))
    plan = []                                     # (coefficient, terms with a positive first term)
    for size, terms in groups.items():
        if not any(positive for positive, _ in terms):
            terms, size = [(True, a) for _, a in terms], -size
        plan.append((size, sorted(terms, key=lambda term: not term[0])))
    # Start with a group that saves a pass when it writes ``out`` directly (anything but a lone +-1 term).
    plan.sort(key=lambda group: abs(group[0]) == 1 and len(group[1]) == 1)
    (c, terms), rest = plan[0], plan[1:]
    if len(terms) == 1 and c != 1:
        xp.multiply(terms[0][1], c, out=out)
    else:
        _signed_sum(xp, out, terms)
        if c != 1:
            xp.multiply(out, c, out=out)
    for c, terms in rest:
        if abs(c) == 1:
            for positive, array in terms:
                (xp.add if positive == (c > 0) else xp.subtract)(out, array, out=out)
            continue
        if scratch is None:
            scratch = xp.empty(out.shape, dtype=out.dtype)
        part = scratch[tuple(slice(0, size) for size in out.shape)]
        if len(terms) == 1:
            xp.multiply(terms[0][1], c, out=part)
        else:
            _signed_sum(xp, part, terms)
            xp.multiply(part, c, out=part)
        xp.add(out, part, out=out)


# --- kernel transforms: one small GEMM each -----------------------------------------------------------

_KERNEL_MATRICES: dict = {}


def _device_id(xp):
    """The current GPU's number under CuPy (constants live on one device), None elsewhere."""
    try:
        return xp.cuda.Device().id
    except AttributeError:
        return None


def kernel_matrix(xp, dtype, transforms, flipped=False):
    """``kron(G, G)`` (a*a, 9) as an ``xp`` array: ``U[xi*a+nu] = sum_ij G[xi,i] G[nu,j] g[i*3+j]``.

    ``flipped`` gives the matrix for the kernel turned by 180 degrees (``g[2-i, 2-j]``), which
    only reverses the order of the nine taps.  Made once per backend, dtype and tile size.
    """
    key = (id(xp), _device_id(xp), str(dtype), transforms.tile, flipped)
    if key not in _KERNEL_MATRICES:
        g = np.array(transforms.G, dtype=np.float64)
        matrix = np.kron(g, g)
        if flipped:
            matrix = matrix[:, ::-1]
        _KERNEL_MATRICES[key] = xp.asarray(np.ascontiguousarray(matrix).astype(dtype))
    return _KERNEL_MATRICES[key]


def transform_weight(weight_khwio, transforms, flipped=False):
    """``U = G g G^T`` for a weight stored (3, 3, I, O) -> contiguous ``(a*a, I, O)``.

    All I*O kernels at once: one GEMM of ``kron(G, G)`` (a*a, 9) with the (9, I*O) weight.
    ``flipped`` transforms the kernel turned by 180 degrees instead (for the input gradient).
    """
    xp = xp_of(weight_khwio)
    a = transforms.size
    _, _, in_channels, out_channels = weight_khwio.shape
    taps = xp.ascontiguousarray(weight_khwio).reshape(9, in_channels * out_channels)
    u = xp.matmul(kernel_matrix(xp, weight_khwio.dtype, transforms, flipped), taps)
    return u.reshape(a * a, in_channels, out_channels)


def weight_gradient_from(du, transforms):
    """``dg = G^T dU G`` for ``dU`` (a*a, I, O) -> contiguous (3, 3, I, O): one GEMM with ``kron(G, G)^T``."""
    xp = xp_of(du)
    _, in_channels, out_channels = du.shape
    dg = xp.matmul(kernel_matrix(xp, du.dtype, transforms).T, du.reshape(du.shape[0], -1))
    return dg.reshape(3, 3, in_channels, out_channels)


# --- tile transforms on runs of tile rows -------------------------------------------------------------


def tile_row_runs(rows, tile_rows):
    """Split a slice of ``images * tile_rows`` tile rows into ``(images, first, stop)`` runs.

    Each run covers tile rows ``first:stop`` of every image in the slice ``images``: either
    some rows of one image, or all rows of several whole images (small images go many at a time).
    """
    start, stop = rows.start, rows.stop
    while start < stop:
        image, first = divmod(start, tile_rows)
        if first == 0 and stop - start >= tile_rows:
            count = (stop - start) // tile_rows
            yield slice(image, image + count), 0, tile_rows
            start += count * tile_rows
        else:
            last = min(tile_rows, first + stop - start)
            yield slice(image, image + 1), first, last
            start += last - first


def gather_tiles(xp, images, out, first, stop, matrix, step, tiles_w, pad_top=0, pad_left=0):
    """``out[p, q] = (matrix . d . matrix^T)[p, q]`` for every tile ``d`` of tile rows ``first:stop``.

    ``images`` is a batch of unpadded (k, H, W, C) channels-last images, ``out`` the
    (r, r, k, rows, tiles_w, C) block of their transformed tiles.  Tile ``(t, s)`` reads
    ``d[i, j] = image[step*t + i - pad_top, step*s + j - pad_left]`` for ``i, j < k`` with
    ``matrix`` (r, k), zero outside the image.  With ``B^T``, ``step = m`` and the convolution's
    padding it is the input transform; with ``A`` and ``k = step = m`` it is the transform of
    dy's tiles for dW.

    The rows these tiles read are first copied into a small zero-framed block (so padding costs
    no pass over the whole input, and the block is still in cache for the transform), with its
    columns sorted by phase: ``block[n, row, j % step, s + j // step]`` is padded column
    ``step*s + j``.  Then tap ``j`` of every tile in a row is one contiguous run, and each
    transform stage is one add or subtract over the whole block per output.
    """
    r, k = len(matrix), len(matrix[0])
    batch, height, width, channels = images.shape
    count = stop - first
    groups = tiles_w + (k - 1) // step
    block_h = step * (count - 1) + k
    top = step * first - pad_top                       # image row of the block's first row
    rows = slice(max(top, 0), min(top + block_h, height))
    inside = slice(rows.start - top, rows.stop - top)
    block = xp.empty((batch, block_h, step, groups, channels), dtype=out.dtype)
    block[:, :inside.start] = 0
    block[:, inside.stop:] = 0
    for phase in range(step):
        # Group g of this phase holds image column step*g + phase - pad_left.
        lo = min(groups, max(0, -(-(pad_left - phase) // step)))
        hi = max(lo, min(groups, -(-(width + pad_left - phase) // step)))
        block[:, inside, phase, :lo] = 0
        block[:, inside, phase, hi:] = 0
        column = step * lo + phase - pad_left
        block[:, inside, phase, lo:hi] = images[:, rows, column: column + step * (hi - lo) - step + 1: step]
    # Rows first: each tile row's k input rows combine into r rows (a strided slice each).
    rows_in = [block[:, i: step * (count - 1) + i + 1: step] for i in range(k)]
    combined = xp.empty((r, batch, count, step, groups, channels), dtype=out.dtype)
    unit = all(abs(c) in (0, 1) for row in matrix for c in row)      # no scratch needed
    scratch = None if unit else xp.empty(combined.shape[1:], dtype=out.dtype)
    for p, coefficients in enumerate(matrix):
        combine(xp, combined[p], coefficients, rows_in, scratch)
    # Then columns, all r row-combinations at once, straight into the transformed-tile buffer.
    cols_in = [combined[..., j % step, j // step: j // step + tiles_w, :] for j in range(k)]
    scratch = None if unit else xp.empty((r, batch, count, tiles_w, channels), dtype=out.dtype)
    for q, coefficients in enumerate(matrix):
        combine(xp, out[:, q], coefficients, cols_in, scratch)


def scatter_tiles(xp, m_tiles, images, first, stop, transforms, bias=None, relu=False):
    """Output transform ``Y = A^T M A`` of tile rows ``first:stop`` into (k, OH, OW, O) ``images``.

    ``m_tiles`` is the (a, a, k, rows, tiles_w, O) block of products for those rows.  Output
    pixel ``(m*t + i, m*s + j)`` gets ``Y[i, j]`` of tile ``(t, s)``; the last tile row or
    column writes only the pixels that exist.  ``bias`` is added, and ``relu`` applied, to
    these output rows while they are still in cache.
    """
    m, a = transforms.tile, transforms.size
    batch, out_h, out_w = images.shape[:3]
    unit = all(abs(c) in (0, 1) for row in transforms.AT for c in row)    # no scratch needed
    # Rows: reduced[i] = sum_xi AT[i, xi] M[xi], all a columns at once.
    reduced = xp.empty((m,) + m_tiles.shape[1:], dtype=images.dtype)
    scratch = None if unit else xp.empty(m_tiles.shape[1:], dtype=images.dtype)
    for i, coefficients in enumerate(transforms.AT):
        combine(xp, reduced[i], coefficients, [m_tiles[xi] for xi in range(a)], scratch)
    # Columns, written into the images: whole tile rows with all m output rows at once ...
    scratch = None if unit else xp.empty((m,) + m_tiles.shape[2:], dtype=images.dtype)
    whole = max(0, min(stop, out_h // m) - first)
    if whole:
        rows = images[:, m * first: m * (first + whole)].reshape(batch, whole, m, out_w, -1).transpose(2, 0, 1, 3, 4)
        for j, coefficients in enumerate(transforms.AT):
            target = rows[..., j::m, :]
            combine(xp, target, coefficients,
                    [reduced[:, nu, :, :whole, :target.shape[3]] for nu in range(a)], scratch)
    # ... and the output rows of a last, partial tile row one by one.
    for t in range(first + whole, stop):
        for i in range(min(m, out_h - m * t)):
            for j, coefficients in enumerate(transforms.AT):
                target = images[:, m * t + i, j::m]
                combine(xp, target, coefficients,
                        [reduced[i, nu, :, t - first, :target.shape[1]] for nu in range(a)],
                        None if unit else scratch[0, :, 0])
    if bias is not None or relu:
        written = images[:, m * first: min(m * stop, out_h)]
        if bias is not None:
            xp.add(written, bias, out=written)
        if relu:
            xp.maximum(written, 0, out=written)


# --- the convolution itself ----------------------------------------------------------------------------


def tile_grid(out_hw, tile):
    """Tiles per column and per row covering an output of ``out_hw``."""
    return -(-out_hw[0] // tile), -(-out_hw[1] // tile)


def images_per_chunk(n, per_image_elements, xp=np):
    """Images whose transformed tiles fit the workspace together (at least one, and enough
    runs of tile rows for every thread).  A GPU takes bigger chunks: fewer, larger kernels."""
    workspace = max(WORKSPACE_ELEMENTS, get_num_threads() * TRANSFORM_TILE_ELEMENTS) if xp is np \
        else GPU_WORKSPACE_ELEMENTS
    return max(1, min(n, workspace // max(1, per_image_elements)))


def buffer_view(buffer, shape):
    """A contiguous array of ``shape`` at the start of the flat ``buffer`` (the chunks of a layer reuse it)."""
    return buffer[:math.prod(shape)].reshape(shape)


def input_tiles(xp, x_nhwc, images, padding, out_hw, transforms, buffer):
    """``V = B^T d B`` for the tiles of some images: (a, a, images, tiles_h, tiles_w, C), written
    into the flat ``buffer``."""
    m, a = transforms.tile, transforms.size
    tiles_h, tiles_w = tile_grid(out_hw, m)
    count, c = images.stop - images.start, x_nhwc.shape[3]
    v = buffer_view(buffer, (a, a, count, tiles_h, tiles_w, c))

    def transform(rows):
        for run, first, stop in tile_row_runs(rows, tiles_h):
            gather_tiles(xp, x_nhwc[images.start + run.start: images.start + run.stop], v[:, :, run, first:stop],
                         first, stop, transforms.BT, m, tiles_w, *padding)

    map_tiles(transform, count * tiles_h, a * a * tiles_w * c, xp, TRANSFORM_TILE_ELEMENTS)
    return v


def output_tile_gradients(xp, dy_nhwc, images, transforms, buffer):
    """``dM = A dY A^T`` for the output tiles of some images: (a, a, images, tiles_h, tiles_w, O), written
    into the flat ``buffer``."""
    m, a = transforms.tile, transforms.size
    tiles_h, tiles_w = tile_grid(dy_nhwc.shape[1:3], m)
    count, o = images.stop - images.start, dy_nhwc.shape[3]
    dm = buffer_view(buffer, (a, a, count, tiles_h, tiles_w, o))
    a_matrix = transposed(transforms.AT)                                # A, (a, m)

    def transform(rows):
        for run, first, stop in tile_row_runs(rows, tiles_h):
            gather_tiles(xp, dy_nhwc[images.start + run.start: images.start + run.stop], dm[:, :, run, first:stop],
                         first, stop, a_matrix, m, tiles_w)

    map_tiles(transform, count * tiles_h, a * a * tiles_w * o, xp, TRANSFORM_TILE_ELEMENTS)
    return dm


def winograd_convolve(x_nhwc, u, padding, transforms, bias=None, relu=False):
    """3x3 stride-1 convolution of channels-last ``x_nhwc`` (N, H, W, C) with transformed weight
    ``u`` (a*a, C, O): returns the output (N, OH, OW, O), contiguous; ``bias`` and ``relu`` are
    applied in the output pass."""
    xp = xp_of(x_nhwc)
    m, a = transforms.tile, transforms.size
    n, h, w, c = x_nhwc.shape
    o = u.shape[2]
    out_hw = (output_size(h, 3, 1, padding[0], 1), output_size(w, 3, 1, padding[1], 1))
    tiles_h, tiles_w = tile_grid(out_hw, m)
    y = xp.empty((n, *out_hw, o), dtype=x_nhwc.dtype)
    step = images_per_chunk(n, a * a * tiles_h * tiles_w * max(c, o), xp)
    tiles_per_chunk = min(step, n) * tiles_h * tiles_w
    v_buffer = xp.empty(a * a * tiles_per_chunk * c, dtype=x_nhwc.dtype)
    products_buffer = xp.empty(a * a * tiles_per_chunk * o, dtype=x_nhwc.dtype)
    for start in range(0, n, step):
        images = slice(start, min(start + step, n))
        count = images.stop - images.start
        tiles = count * tiles_h * tiles_w
        v = input_tiles(xp, x_nhwc, images, padding, out_hw, transforms, v_buffer)
        products = buffer_view(products_buffer, (a * a, tiles, o))
        xp.matmul(v.reshape(a * a, tiles, c), u, out=products)       # the a*a GEMMs in one call
        blocks = products.reshape(a, a, count, tiles_h, tiles_w, o)
        target = y[images]

        def output_transform(rows):
            for run, first, stop in tile_row_runs(rows, tiles_h):
                scatter_tiles(xp, blocks[:, :, run, first:stop], target[run], first, stop, transforms, bias, relu)

        map_tiles(output_transform, count * tiles_h, a * a * tiles_w * o, xp, TRANSFORM_TILE_ELEMENTS)
    return y


class WinogradCache(NamedTuple):
    x: object             # the input (N, C, H, W); backward transforms its tiles again
    weight: object        # the weight, PyTorch shape (O, C, 3, 3)
    x_shape: tuple
    out_hw: tuple
    padding: tuple
    tile: int             # m of F(m x m, 3 x 3)
    has_bias: bool


def check_winograd_shape(x_shape, weight_shape, stride, padding, dilation, groups):
    """Raise ValueError unless the convolution is one that Winograd F(m, 3x3) computes here."""
    if len(weight_shape) != 4 or tuple(weight_shape[2:]) != (3, 3):
        raise ValueError(f"Winograd convolution needs a 3x3 kernel, got weight shape {tuple(weight_shape)}")
    if pair(stride) != (1, 1) or pair(dilation) != (1, 1) or groups != 1:
        raise ValueError(f"Winograd convolution needs stride 1, dilation 1 and groups 1, got stride={stride}, "
                         f"dilation={dilation}, groups={groups}")
    if weight_shape[1] != x_shape[1]:
        raise ValueError(f"input has {x_shape[1]} channels but the weight expects {weight_shape[1]}")
    if not all(0 <= p <= 2 for p in pair(padding)):
        raise ValueError(f"Winograd convolution supports padding 0, 1 or 2 per side, got {padding}")


def winograd_applies(x_shape, weight_shape, stride, padding, dilation, groups):
    """True when :func:`winograd_conv2d_forward` can compute this convolution."""
    try:
        check_winograd_shape(x_shape, weight_shape, stride, padding, dilation, groups)
    except ValueError:
        return False
    return True


def channels_last(x):
    """The (N, H, W, C) view of an NCHW-shaped array; one copy when it is not stored channels-last."""
    nhwc = x.transpose(0, 2, 3, 1)
    return nhwc if nhwc.flags.c_contiguous else xp_of(x).ascontiguousarray(nhwc)


def winograd_conv2d_forward(x, weight, bias=None, stride=1, padding=1, dilation=1, groups=1, tile=2, relu=False):
    """``y = conv2d(x, weight) + bias`` by Winograd F(tile x tile, 3x3) -> ``(y, cache)``.

    Same arguments and result as :func:`numres.functional.conv.conv2d_forward` (``y`` is
    (N, O, OH, OW), stored channels-last), for a 3x3 kernel with stride 1, dilation 1 and
    groups 1.  The bias is added in the output pass, chunk by chunk; ``relu=True`` returns
    ``max(y, 0)`` the same way (for a BatchNorm + ReLU folded into the convolution; the cache
    is the convolution's, and the caller owns the ReLU's backward).
    """
    transforms = transforms_for(tile)
    check_winograd_shape(x.shape, weight.shape, stride, padding, dilation, groups)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"input, weight and bias must share one dtype, got {x.dtype}, {weight.dtype} and "
                        f"{None if bias is None else bias.dtype}")
    padding = pair(padding)
    u = transform_weight(weight.transpose(2, 3, 1, 0), transforms)
    y = winograd_convolve(channels_last(x), u, padding, transforms, bias, relu)
    cache = WinogradCache(x, weight, tuple(x.shape), y.shape[1:3], padding, tile, bias is not None)
    return y.transpose(0, 3, 1, 2), cache


def winograd_conv2d_backward(dy, cache: WinogradCache, need_input_grad=True, *, need_weight_grad=True,
                             need_bias_grad=None):
    """Gradients ``(dx, dweight, dbias)`` from ``dy`` (N, O, OH, OW), as
    :func:`numres.functional.conv.conv2d_backward` returns them; a gradient that is not needed
    is None and costs nothing (``need_bias_grad`` follows ``need_weight_grad`` by default).

    ``dx = conv3x3(pad(dy, 2 - padding), flip(g)^T)`` (a Winograd forward);
    ``dweight = G^T [sum over tiles of V^T (A dY A^T)] G``, stored (3, 3, C, O).
    """
    xp = xp_of(dy)
    transforms = transforms_for(cache.tile)
    m, a = transforms.tile, transforms.size
    n, c, h, w = cache.x_shape
    o = cache.weight.shape[0]
    dy_nhwc = channels_last(dy)
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    dbias = dy_nhwc.reshape(-1, o).sum(axis=0) if cache.has_bias and need_bias_grad else None

    dx = None
    if need_input_grad:
        # The kernel flipped in both spatial axes, transformed as (a*a, C, O); the matmul reads
        # each position's transpose (O, C), which swaps the channel axes at no cost.
        u_flipped = transform_weight(cache.weight.transpose(2, 3, 1, 0), transforms, flipped=True)
        back_padding = (2 - cache.padding[0], 2 - cache.padding[1])
        dx = winograd_convolve(dy_nhwc, u_flipped.transpose(0, 2, 1), back_padding, transforms)
        dx = dx.transpose(0, 3, 1, 2)

    dweight = None
    if need_weight_grad:
        x_nhwc = channels_last(cache.x)
        tiles_h, tiles_w = tile_grid(cache.out_hw, m)
        step = images_per_chunk(n, a * a * tiles_h * tiles_w * max(c, o), xp)
        tiles_per_chunk = min(step, n) * tiles_h * tiles_w
        v_buffer = xp.empty(a * a * tiles_per_chunk * c, dtype=dy.dtype)
        dm_buffer = xp.empty(a * a * tiles_per_chunk * o, dtype=dy.dtype)
        du = (xp.empty if n else xp.zeros)((a * a, c, o), dtype=dy.dtype)
        part = xp.empty_like(du) if n > step else None
        for start in range(0, n, step):
            images = slice(start, min(start + step, n))
            tiles = (images.stop - images.start) * tiles_h * tiles_w
            v = input_tiles(xp, x_nhwc, images, cache.padding, cache.out_hw, transforms, v_buffer)
            dm = output_tile_gradients(xp, dy_nhwc, images, transforms, dm_buffer)
            v, dm = v.reshape(a * a, tiles, c), dm.reshape(a * a, tiles, o)
            if start == 0:
                xp.matmul(v.transpose(0, 2, 1), dm, out=du)          # sums over this chunk's tiles
            else:
                xp.matmul(v.transpose(0, 2, 1), dm, out=part)
                du += part
        dweight = weight_gradient_from(du, transforms).transpose(3, 2, 0, 1)
    return dx, dweight, dbias
