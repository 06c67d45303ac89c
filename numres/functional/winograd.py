"""Winograd convolution F(m x m, 3 x 3) for 3x3, stride-1 layers: forward beside both backward passes.

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

* input gradient: a 3x3 stride-1 convolution is its own kind of adjoint.  ``dx`` is ``dy``
  padded by ``2 - padding`` and convolved with the kernel flipped in both spatial axes and
  with its two channel axes swapped, which is again a Winograd forward;
* weight gradient: ``y`` is linear in ``U``, and the transpose of each step gives::

      dM[xi,nu] = (A dY A^T)[xi,nu]                   (T, O)    dy's tiles transformed with A
      dU[xi,nu] = V[xi,nu]^T @ dM[xi,nu]              (C, O)    batched matmul, sums over tiles
      dg        = G^T dU G

docs/winograd.md derives both with a worked 4x4 tile.

Layout and cost.  As in :mod:`numres.functional.conv`, activations are NCHW-shaped and stored
channels-last, weights are stored ``(3, 3, I, O)``, and the batch is worked through in chunks
whose transformed tiles fit :data:`numres.functional.conv.WORKSPACE_ELEMENTS`.  The transforms
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

from typing import NamedTuple

from ..backend import xp_of
from ..parallel import map_tiles
from .conv import WORKSPACE_ELEMENTS, output_size, pad_nhwc, pair


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


def transposed(matrix):
    """The transpose of a nested-tuple matrix."""
    return tuple(zip(*matrix))


def transforms_for(tile):
    if tile not in TRANSFORMS:
        raise ValueError(f"Winograd output tile must be one of {sorted(TRANSFORMS)} (F(2x2,3x3) or "
                         f"F(4x4,3x3)), got {tile!r}")
    return TRANSFORMS[tile]


# --- the one building block: out = sum_j coefficient_j * array_j --------------------------------------


def combine(xp, out, coefficients, arrays):
    """``out[...] = sum_j coefficients[j] * arrays[j]``, skipping zero coefficients.

    Coefficients +1 and -1 (all of F(2,3)'s input and output transforms) cost one add or
    subtract each; any other coefficient costs a multiply into a scratch buffer first.
    """
    terms = [(c, a) for c, a in zip(coefficients, arrays) if c != 0]
    (first, a0), rest = terms[0], terms[1:]
    if rest and first == 1 and rest[0][0] in (1, -1):
        second, a1 = rest.pop(0)
        (xp.add if second == 1 else xp.subtract)(a0, a1, out=out)
    elif rest and first == -1 and rest[0][0] == 1:
        _, a1 = rest.pop(0)
        xp.subtract(a1, a0, out=out)
    elif first == 1:
        out[...] = a0
    else:
        xp.multiply(a0, first, out=out)
    scratch = None
    for c, a in rest:
        if c == 1:
            xp.add(out, a, out=out)
        elif c == -1:
            xp.subtract(out, a, out=out)
        else:
            if scratch is None:
                scratch = xp.empty(out.shape, dtype=out.dtype)
            xp.multiply(a, c, out=scratch)
            xp.add(out, scratch, out=out)


def sandwich(xp, matrix, source, out):
    """``out[p, q] = sum_{i,j} matrix[p][i] * matrix[q][j] * source[i, j]`` for small (k, k, ...) arrays.

    ``matrix`` is (r, k), ``source`` (k, k, ...), ``out`` (r, r, ...): the kernel transform
    ``G g G^T`` and its transpose ``G^T dU G``.
    """
    k = source.shape[1]
    rows = xp.empty((len(matrix), k) + source.shape[2:], dtype=out.dtype)
    for p, coefficients in enumerate(matrix):
        combine(xp, rows[p], coefficients, [source[i] for i in range(len(coefficients))])
    for p in range(len(matrix)):
        for q, coefficients in enumerate(matrix):
            combine(xp, out[p, q], coefficients, [rows[p][j] for j in range(k)])
    return out


def transform_weight(weight_khwio, transforms):
    """``U = G g G^T`` for a weight stored (3, 3, I, O) -> contiguous ``(a*a, I, O)``."""
    xp = xp_of(weight_khwio)
    a = transforms.size
    _, _, in_channels, out_channels = weight_khwio.shape
    u = xp.empty((a, a, in_channels, out_channels), dtype=weight_khwio.dtype)
    sandwich(xp, transforms.G, weight_khwio, u)
    return u.reshape(a * a, in_channels, out_channels)


def weight_gradient_from(du, transforms):
    """``dg = G^T dU G`` for ``dU`` (a*a, I, O) -> contiguous (3, 3, I, O)."""
    xp = xp_of(du)
    a = transforms.size
    du = du.reshape(a, a, *du.shape[1:])
    dg = xp.empty((3, 3) + du.shape[2:], dtype=du.dtype)
    return sandwich(xp, transposed(transforms.G), du, dg)


# --- tile transforms on runs of tile rows -------------------------------------------------------------


def tile_row_runs(rows, tile_rows):
    """Split a slice of ``images * tile_rows`` tile rows into ``(image, first, stop)`` runs within one image."""
    start, stop = rows.start, rows.stop
    while start < stop:
        image, first = divmod(start, tile_rows)
        last = min(tile_rows, first + stop - start)
        yield image, first, last
        start += last - first


def gather_tiles(xp, image, out, first, stop, matrix, step, tiles_w):
    """``out[p, q] = (matrix . d . matrix^T)[p, q]`` for every tile ``d`` of tile rows ``first:stop``.

    ``image`` is one (H', W', C) channels-last image (padded), ``out`` a (r, r, rows, tiles_w, C)
    block of the transformed tiles; tile ``(t, s)`` reads ``image[step*t + i, step*s + j]`` for
    ``i, j < k`` with ``matrix`` (r, k).  With ``B^T`` and ``step = m`` it is the input
    transform; with ``A`` and ``k = step = m`` it is the transform of dy's tiles for dW.
    """
    r, k = len(matrix), len(matrix[0])
    count = stop - first
    # Rows first: each tile row's k input rows combine into r rows (a strided slice each).
    rows_in = [image[step * first + i: step * (stop - 1) + i + 1: step] for i in range(k)]
    combined = xp.empty((r, count) + image.shape[1:], dtype=out.dtype)
    for p, coefficients in enumerate(matrix):
        combine(xp, combined[p], coefficients, rows_in)
    # Then columns, written straight into the transformed-tile buffer.
    for p in range(r):
        cols_in = [combined[p][:, j: step * (tiles_w - 1) + j + 1: step] for j in range(k)]
        for q, coefficients in enumerate(matrix):
            combine(xp, out[p, q], coefficients, cols_in)


def scatter_tiles(xp, m_tiles, image, first, stop, transforms):
    """Output transform ``Y = A^T M A`` of tile rows ``first:stop`` into one (OH, OW, O) image.

    ``m_tiles`` is the (a, a, rows, tiles_w, O) block of products for those rows.  Output
    pixel ``(m*t + i, m*s + j)`` gets ``Y[i, j]`` of tile ``(t, s)``; the last tile row or
    column writes only the pixels that exist.
    """
    m, a = transforms.tile, transforms.size
    out_h, out_w = image.shape[:2]
    count = stop - first
    reduced = xp.empty((m, a, count) + m_tiles.shape[3:], dtype=image.dtype)
    for i, coefficients in enumerate(transforms.AT):
        for nu in range(a):
            combine(xp, reduced[i, nu], coefficients, [m_tiles[xi, nu] for xi in range(a)])
    for i in range(m):
        target_rows = image[m * first + i: min(m * stop, out_h): m]
        for j, coefficients in enumerate(transforms.AT):
            target = target_rows[:, j::m]
            height, width = target.shape[:2]
            combine(xp, target, coefficients, [reduced[i, nu][:height, :width] for nu in range(a)])


# --- the convolution itself ----------------------------------------------------------------------------


def tile_grid(out_hw, tile):
    """Tiles per column and per row covering an output of ``out_hw``."""
    return -(-out_hw[0] // tile), -(-out_hw[1] // tile)


def images_per_chunk(n, per_image_elements):
    """Images whose transformed tiles fit the workspace together (at least one)."""
    return max(1, min(n, WORKSPACE_ELEMENTS // max(1, per_image_elements)))


def input_tiles(xp, x_nhwc, images, padding, out_hw, transforms):
    """``V = B^T d B`` for the tiles of some images: (a, a, images, tiles_h, tiles_w, C)."""
    m, a = transforms.tile, transforms.size
    tiles_h, tiles_w = tile_grid(out_hw, m)
    count, c = images.stop - images.start, x_nhwc.shape[3]
    # Pad by the convolution's padding, plus zeros at the end so the last tile is whole.
    extra_h = tiles_h * m + 2 - (x_nhwc.shape[1] + 2 * padding[0])
    extra_w = tiles_w * m + 2 - (x_nhwc.shape[2] + 2 * padding[1])
    padded = pad_nhwc(x_nhwc[images], padding[0], padding[1], extra_h=extra_h, extra_w=extra_w)
    v = xp.empty((a, a, count, tiles_h, tiles_w, c), dtype=x_nhwc.dtype)

    def transform(rows):
        for image, first, stop in tile_row_runs(rows, tiles_h):
            gather_tiles(xp, padded[image], v[:, :, image, first:stop], first, stop, transforms.BT, m, tiles_w)

    map_tiles(transform, count * tiles_h, a * a * tiles_w * c, xp)
    return v


def winograd_convolve(x_nhwc, u, padding, transforms, out=None):
    """3x3 stride-1 convolution of channels-last ``x_nhwc`` (N, H, W, C) with transformed weight
    ``u`` (a*a, C, O): returns the output (N, OH, OW, O), contiguous (``out`` if given)."""
    xp = xp_of(x_nhwc)
    m, a = transforms.tile, transforms.size
    n, h, w, c = x_nhwc.shape
    o = u.shape[2]
    out_hw = (output_size(h, 3, 1, padding[0], 1), output_size(w, 3, 1, padding[1], 1))
    tiles_h, tiles_w = tile_grid(out_hw, m)
    y = xp.empty((n, *out_hw, o), dtype=x_nhwc.dtype) if out is None else out
    per_image = a * a * tiles_h * tiles_w * max(c, o)
    step = images_per_chunk(n, per_image)
    products = None
    for start in range(0, n, step):
        images = slice(start, min(start + step, n))
        count = images.stop - images.start
        v = input_tiles(xp, x_nhwc, images, padding, out_hw, transforms)
        tiles = count * tiles_h * tiles_w
        if products is None or products.shape[1] != tiles:
            products = xp.empty((a * a, tiles, o), dtype=x_nhwc.dtype)
        xp.matmul(v.reshape(a * a, tiles, c), u, out=products)       # the a*a GEMMs in one call
        del v
        blocks = products.reshape(a, a, count, tiles_h, tiles_w, o)
        target = y[images]

        def output_transform(rows):
            for image, first, stop in tile_row_runs(rows, tiles_h):
                scatter_tiles(xp, blocks[:, :, image, first:stop], target[image], first, stop, transforms)

        map_tiles(output_transform, count * tiles_h, a * a * tiles_w * o, xp)
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


def winograd_conv2d_forward(x, weight, bias=None, stride=1, padding=1, dilation=1, groups=1, tile=2):
    """``y = conv2d(x, weight) + bias`` by Winograd F(tile x tile, 3x3) -> ``(y, cache)``.

    Same arguments and result as :func:`numres.functional.conv.conv2d_forward` (``y`` is
    (N, O, OH, OW), stored channels-last), for a 3x3 kernel with stride 1, dilation 1 and
    groups 1.
    """
    transforms = transforms_for(tile)
    check_winograd_shape(x.shape, weight.shape, stride, padding, dilation, groups)
    padding = pair(padding)
    u = transform_weight(weight.transpose(2, 3, 1, 0), transforms)
    y = winograd_convolve(channels_last(x), u, padding, transforms)
    if bias is not None:
        y += bias
    cache = WinogradCache(x, weight, tuple(x.shape), y.shape[1:3], padding, tile, bias is not None)
    return y.transpose(0, 3, 1, 2), cache


def winograd_conv2d_backward(dy, cache: WinogradCache, need_input_grad=True, need_weight_grad=True):
    """Gradients ``(dx, dweight, dbias)`` from ``dy`` (N, O, OH, OW), as
    :func:`numres.functional.conv.conv2d_backward` returns them.

    ``dx = conv3x3(pad(dy, 2 - padding), flip(g)^T)`` (a Winograd forward);
    ``dweight = G^T [sum over tiles of V^T (A dY A^T)] G``, stored (3, 3, C, O).
    """
    xp = xp_of(dy)
    transforms = transforms_for(cache.tile)
    m, a = transforms.tile, transforms.size
    n, c, h, w = cache.x_shape
    o = cache.weight.shape[0]
    dy_nhwc = channels_last(dy)
    dbias = dy_nhwc.reshape(-1, o).sum(axis=0) if cache.has_bias else None

    dx = None
    if need_input_grad:
        # The kernel flipped in both spatial axes, with input and output channels swapped: (3, 3, O, C).
        flipped = cache.weight.transpose(2, 3, 1, 0)[::-1, ::-1].transpose(0, 1, 3, 2)
        u_flipped = transform_weight(flipped, transforms)
        back_padding = (2 - cache.padding[0], 2 - cache.padding[1])
        dx = winograd_convolve(dy_nhwc, u_flipped, back_padding, transforms).transpose(0, 3, 1, 2)

    dweight = None
    if need_weight_grad:
        x_nhwc = channels_last(cache.x)
        tiles_h, tiles_w = tile_grid(cache.out_hw, m)
        extra_h, extra_w = tiles_h * m - cache.out_hw[0], tiles_w * m - cache.out_hw[1]
        step = images_per_chunk(n, a * a * tiles_h * tiles_w * max(c, o))
        du = xp.empty((a * a, c, o), dtype=dy.dtype)
        part = None
        inverse_output = transposed(transforms.AT)                      # A, (a, m)
        for start in range(0, n, step):
            images = slice(start, min(start + step, n))
            count = images.stop - images.start
            v = input_tiles(xp, x_nhwc, images, cache.padding, cache.out_hw, transforms)
            dy_padded = pad_nhwc(dy_nhwc[images], 0, 0, extra_h=extra_h, extra_w=extra_w)
            dm = xp.empty((a, a, count, tiles_h, tiles_w, o), dtype=dy.dtype)

            def transform_dy(rows):
                for image, first, stop in tile_row_runs(rows, tiles_h):
                    gather_tiles(xp, dy_padded[image], dm[:, :, image, first:stop], first, stop,
                                 inverse_output, m, tiles_w)

            map_tiles(transform_dy, count * tiles_h, a * a * tiles_w * o, xp)
            tiles = count * tiles_h * tiles_w
            v_t = v.reshape(a * a, tiles, c).transpose(0, 2, 1)
            if start == 0:
                xp.matmul(v_t, dm.reshape(a * a, tiles, o), out=du)   # sums over this chunk's tiles
            else:
                if part is None:
                    part = xp.empty_like(du)
                xp.matmul(v_t, dm.reshape(a * a, tiles, o), out=part)
                du += part
            del v, dm
        dweight = weight_gradient_from(du, transforms).transpose(3, 2, 0, 1)
    return dx, dweight, dbias
