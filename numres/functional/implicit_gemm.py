"""Implicit-GEMM convolution: no im2col, no col2im.

Reference: :func:`numres.functional.conv.conv2d_forward` / ``conv2d_backward`` (im2col + GEMM,
whose math it keeps).  What changes is that no patch matrix is built.

Slabs.  Pad the channels-last input once, ``P`` (N, Hp, Wp, C), and read it as a matrix of
``N*Hp*Wp`` rows, one per padded pixel.  Put the output on the same padded grid: output pixel
``(n, oh, ow)`` is row ``r = n*Hp*Wp + oh*Wp + ow``.  A stride-1 convolution then reads, for kernel
tap ``(i, j)``, input row ``r + i*dh*Wp + j*dw`` (``dh, dw`` the dilation): the rows one tap meets
are a *contiguous slab* of ``P``, shifted by a constant.  So, per group, with ``W_ij`` the
``(C, O)`` slice of the weight stored ``(kh, kw, C, O)``::

    Y[0:M] += P[off_ij : off_ij + M] @ W_ij          off_ij = i*dh*Wp + j*dw,  kh*kw GEMMs

``M = (N-1)*Hp*Wp + (OH-1)*Wp + OW`` covers every valid output row, and ``off_ij + M`` never
passes the end of ``P``.  Rows of the padded grid outside the ``OH x OW`` window are computed and
thrown away.  The "taps" variant shares the padding between neighbours (:func:`geometry`): a
line is ``left`` zeros and ``W`` pixels, and a read past its end lands in the next line's zeros,
so a 3x3 "same" layer computes ``(H+1)(W+1)`` rows for ``H*W`` outputs (4% more at 56x56, 15% at
14x14, 31% at 7x7) instead of ``(H+2)(W+2)`` (7%, 31%, 65%).  The accumulation
needs BLAS's ``beta = 1`` and leading dimensions, which ``numpy.matmul`` lacks; the calls go to
``cblas_sgemm``/``cblas_dgemm`` of the BLAS NumPy loaded (:func:`numres.blas.cblas_gemm`), on
NumPy's own buffers.

Backward, with ``dYp`` the output gradient on the padded grid (zero outside the window)::

    dW_ij             = P[off_ij : off_ij + M]^T @ dYp[0:M]       (K = every pixel)
    dP[off_ij : +M]  += dYp[0:M] @ W_ij^T                         (col2im's scatter-add, done by beta = 1)
    dx                = the interior of dP

Two ways to run the taps (``variant``):

* ``"taps"``: the ``kh*kw`` GEMMs above, with ``K = C`` (per group);
* ``"rows"``: a partial im2col along the kernel's width only.  ``Q[r] = (P[r], P[r+dw], ...,
  P[r+(kw-1)dw])`` is ``kw`` copies of the input (against ``kh*kw`` for im2col), and the
  convolution is ``kh`` GEMMs with ``K = kw*C``: ``Y[0:M] += Q[i*dh*Wp : +M] @ W_i``, ``W_i`` the
  ``(kw*C, O)`` row ``i`` of the stored weight.  The weight gradient reads the same ``Q``
  (``dW_i = Q[i*dh*Wp : +M]^T @ dYp``) and the input gradient builds the same thing from ``dYp``,
  ``Qd[r] = (dYp[r], dYp[r-dw], ...)``, with the weight turned: ``dP[i*dh*Wp:] += Qd @ Wt_i``.
  Larger ``K`` runs the GEMM nearer its peak and reads/writes ``Y`` ``kh`` times instead of
  ``kh*kw``; the price is the copies.

Stride.  A stride-``s`` convolution reads padded pixel ``(s*oh + i*dh, s*ow + j*dw)``.  Split the
padded input into its ``sh*sw`` phases (phase ``(a, b)`` holds the pixels at ``(a + sh*q, b + sw*u)``),
each laid on the same ``Hq x Wq = ceil(Hp/sh) x ceil(Wp/sw)`` grid, one phase after another in
one row matrix.  Tap ``(i, j)`` then reads phase ``(i*dh mod sh, j*dw mod sw)`` shifted by
``(i*dh // sh, j*dw // sw)``: again a slab, at a constant offset, and the same GEMMs run on it
(:func:`geometry`).  The phase split is one copy of the input (im2col's patch matrix for a 3x3
stride-2 layer is 2.25 times the input).  ``variant="rows"`` is stride 1 only.

Threads.  Each of numres's threads takes a range of rows and runs single-threaded GEMMs on
cache-sized blocks of it, OpenBLAS set to one thread meanwhile (:func:`split_rows`).

Which is faster depends on the layer (:mod:`numres.functional.conv_algorithms` chooses, and
docs/implicit_gemm.md has the measurements).  Padding modes other than zeros stay with im2col.
:func:`implicit_conv2d_forward_xp` is the same on any array module (CuPy: cuBLAS).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import xp_of
from ..blas import cblas_gemm, current_blas_threads, single_threaded_blas, single_threaded_blas_available
from ..parallel import get_num_threads, map_tiles, run_parts
from .conv import conv_padding, pair

VARIANTS = ("taps", "rows")
WORKSPACE_ELEMENTS = 1 << 22      # elements of Q (the "rows" variant's partial im2col) built at once


class ImplicitCache(NamedTuple):
    x: object             # the input, (N, C, H, W) shaped (re-padded in backward: no extra activation kept)
    weight: object        # PyTorch shape (O, C/groups, kh, kw)
    x_shape: tuple
    out_hw: tuple
    pads: tuple           # ((top, bottom), (left, right)) zero padding
    dilation: tuple
    groups: int
    has_bias: bool
    variant: str          # "taps" or "rows"
    stride: tuple = (1, 1)


def implicit_available(dtype=np.float32) -> bool:
    """True when the BLAS NumPy loaded has a CBLAS GEMM for ``dtype`` (float32 or float64)."""
    gemm = cblas_gemm()
    return gemm is not None and gemm.function(np.dtype(dtype)) is not None


def implicit_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode="zeros", *,
                  allow_stride=True):
    """The ``((top, bottom), (left, right))`` zero padding when the implicit path can compute this
    convolution (zero padding, a non-empty 4-D batch; stride 1 unless ``allow_stride``), else None.
    ``padding`` is anything conv2d takes (an int, a pair, "same", "valid") or already
    ``((top, bottom), (left, right))``."""
    try:
        stride, dilation = pair(stride, "stride", 1), pair(dilation, "dilation", 1)
        if padding_mode != "zeros" or len(x_shape) != 4 or x_shape[0] == 0 or \
                (stride != (1, 1) and not allow_stride):
            return None
        if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
                isinstance(side, (tuple, list)) for side in padding):
            pads = tuple(pair(side, "padding") for side in padding)     # already ((top, bottom), (left, right))
        else:
            pads = conv_padding(padding, tuple(weight_shape[2:]), stride, dilation)
    except (TypeError, ValueError):
        return None                                    # the im2col path names the problem
    (top, bottom), (left, right) = pads
    for size, before, after, k, d in ((x_shape[2], top, bottom, weight_shape[2], dilation[0]),
                                      (x_shape[3], left, right, weight_shape[3], dilation[1])):
        if size + before + after - d * (k - 1) < 1:
            return None
    return pads


def _gemm(dtype):
    gemm = cblas_gemm()
    function = None if gemm is None else gemm.function(np.dtype(dtype))
    if function is None:
        raise RuntimeError(f"implicit-GEMM convolution needs cblas_sgemm/cblas_dgemm in NumPy's BLAS for "
                           f"{np.dtype(dtype)}, and none was found; use set_conv_algorithm('im2col')")
    return function


_ROW, _N, _T = 101, 111, 112
WEIGHT_GRADIENT_PARTS = 4       # at most this many partial dW GEMMs (as many as threads numres is meant for)
WEIGHT_GRADIENT_PART_ROWS = 4096   # ... each over at least this many pixel rows
BLOCK_ELEMENTS = 1 << 17       # output elements per block of rows (512 KiB of float32): stays in L2 over the taps


def gemm_workers() -> int:
    """How many of numres's threads split the slab GEMMs' rows, each running single-threaded GEMMs
    (0: none; one GEMM per tap, which BLAS threads itself).

    As many as NumPy's BLAS has threads now (:func:`numres.blas.current_blas_threads`), capped by
    numres's own thread count, where numres can set OpenBLAS's thread count; 0 where it cannot,
    or where numres has one thread and BLAS more.  ``blas_threads(1)`` gives 1.
    """
    blas = current_blas_threads()
    if blas is None or not single_threaded_blas_available():
        return 0
    workers = min(blas, get_num_threads())
    return 0 if workers == 1 and blas > 1 else max(1, workers)


def split_rows(total, function, block_rows):
    """Run ``function(lo, hi, block)`` on ranges covering ``[0, total)``: one range per GEMM worker,
    each doing its rows ``block`` at a time, with OpenBLAS on one thread meanwhile
    (:func:`numres.blas.single_threaded_blas`); or, without workers, one call
    ``function(0, total, total)`` whose GEMMs BLAS threads itself."""
    workers = gemm_workers()
    if workers == 0:
        function(0, total, max(1, total))
    elif workers == 1:
        function(0, total, block_rows)               # BLAS is on one thread already
    else:
        bounds = sorted({total * part // workers for part in range(workers + 1)})     # no empty ranges
        with single_threaded_blas():
            run_parts(lambda index: function(bounds[index], bounds[index + 1], block_rows), len(bounds) - 1)


def weight_gradient_parts(rows: int) -> int:
    """How many ranges of pixel rows the weight gradient's K is cut into: by the shape alone.

    Each range's partial ``dW`` is a GEMM of its own, and the partials are summed in a fixed order,
    so the bits of ``dW`` depend on the shape only, never on how many threads happen to run: a
    seeded run resumed in another process (or with another thread count) stays bit-identical.
    """
    return max(1, min(WEIGHT_GRADIENT_PARTS, rows // WEIGHT_GRADIENT_PART_ROWS))


def split_fixed(total, function, parts):
    """Run ``function(lo, hi, hi - lo)`` on ``parts`` ranges covering ``[0, total)`` whose bounds do not
    depend on the thread count: on numres's pool with single-threaded BLAS where there are GEMM workers,
    else one after the other, each GEMM threaded by BLAS (which splits M and N, never K)."""
    bounds = [total * part // parts for part in range(parts + 1)]

    def run(index):
        function(bounds[index], bounds[index + 1], max(1, bounds[index + 1] - bounds[index]))

    if gemm_workers() > 1:
        with single_threaded_blas():
            run_parts(run, parts)
    else:
        for index in range(parts):
            run(index)


# --- the padded grid ---------------------------------------------------------------------------------

def _line_runs(lines, per_image, line_elements, function):
    """Call ``function(image, first, stop)`` on runs of lines ``[first, stop)`` of one image, on all cores.

    ``lines = N * per_image``; the line ranges are split over threads and cut at image boundaries
    (so a batch of one image is still split).
    """
    def run(part):
        start, stop = part.start, part.stop
        while start < stop:
            image = start // per_image
            end = min(stop, (image + 1) * per_image)
            function(image, start - image * per_image, end - image * per_image)
            start = end
    map_tiles(run, lines, line_elements, np, tile_elements=1 << 18)


def _frame(target, first, stop, source, top, left, height, width):
    """Lines ``[first, stop)`` of a padded frame: ``source`` lines ``[0, height)`` placed at line
    ``top``, column ``left``; zero everywhere else.  ``target`` is those lines of the frame."""
    lo, hi = max(first, top), min(stop, top + height)
    if hi <= lo:
        target[...] = 0
        return
    target[:lo - first] = 0
    target[hi - first:] = 0
    inner = target[lo - first:hi - first]
    inner[:, :left] = 0
    inner[:, left + width:] = 0
    inner[:, left:left + width] = source[lo - top:hi - top]


def pad_rows(x, pads):
    """``x`` (N, C, H, W) as the padded channels-last grid ``(N, Hp, Wp, C)``, C-contiguous (no copy
    when there is no padding and ``x`` is stored channels-last)."""
    (top, bottom), (left, right) = pads
    x_nhwc = x.transpose(0, 2, 3, 1)
    if top == bottom == left == right == 0:
        return np.ascontiguousarray(x_nhwc)
    n, h, w, c = x_nhwc.shape
    hp, wp = h + top + bottom, w + left + right
    padded = np.empty((n, hp, wp, c), dtype=x.dtype)
    _line_runs(n * hp, hp, wp * c, lambda image, first, stop: _frame(
        padded[image, first:stop], first, stop, x_nhwc[image], top, left, h, w))
    return padded


def crop_rows(grid, out_hw, bias=None, relu=False, origin=(0, 0)):
    """The ``(N, OH, OW, O)`` window at ``origin`` of the padded grid ``grid`` (N, Hp, Wp, O), as a
    new contiguous array, with ``bias`` added and ReLU applied on the way (one pass)."""
    n, _, _, o = grid.shape
    oh, ow = out_hw
    top, left = origin
    y = np.empty((n, oh, ow, o), dtype=grid.dtype)

    def copy(image, first, stop):
        target = y[image, first:stop]
        source = grid[image, top + first:top + stop, left:left + ow]
        if bias is not None:
            np.add(source, bias, out=target)
        else:
            target[...] = source
        if relu:
            np.maximum(target, 0, out=target)

    _line_runs(n * oh, oh, ow * o, copy)
    return y


def grid_gradient(dy, hp, wp):
    """``dy`` (N, O, OH, OW) on the padded grid ``(N, Hp, Wp, O)``: zero outside the output window."""
    n, o, oh, ow = dy.shape
    dy_nhwc = dy.transpose(0, 2, 3, 1)
    grid = np.empty((n, hp, wp, o), dtype=dy.dtype)
    _line_runs(n * hp, hp, wp * o, lambda image, first, stop: _frame(
        grid[image, first:stop], first, stop, dy_nhwc[image], 0, 0, oh, ow))
    return grid


def _width_copies(grid_rows, kw, dw, groups, shift):
    """``Q[r] = (grid[r + s*0], grid[r + s*dw], ..., grid[r + s*(kw-1)*dw])`` as ``(R, groups, kw, Cg)``,
    ``s = +1`` (forward, weight gradient) or ``-1`` (input gradient; rows before the start are 0)."""
    rows, c = grid_rows.shape
    cg = c // groups
    q = np.empty((rows, groups, kw, cg), dtype=grid_rows.dtype)
    source = grid_rows.reshape(rows, groups, cg)

    def fill(part):
        for j in range(kw):
            offset = shift * j * dw
            lo, hi = part.start, part.stop
            first, last = max(lo, -offset), min(hi, rows - offset)
            if first > lo:
                q[lo:first, :, j] = 0
            if last < hi:
                q[max(last, lo):hi, :, j] = 0
            if last > first:
                q[first:last, :, j] = source[first + offset:last + offset]

    map_tiles(fill, rows, kw * c, np, tile_elements=1 << 18)
    return q


def _chunks(n, per_image):
    images = max(1, WORKSPACE_ELEMENTS // max(1, per_image))
    return [slice(start, min(start + images, n)) for start in range(0, n, images)]


# --- the grid's geometry, stride included -----------------------------------------------------------

class Geometry(NamedTuple):
    """Where a convolution's taps read, on the (phase-split) padded grid."""
    padded: tuple         # (Hp, Wp): the padded input
    grid: tuple           # (Hq, Wq): the grid each image (or phase of it) is laid on, and the output's
    out_hw: tuple         # (OH, OW)
    phases: int           # sh * sw
    rows: int             # N * Hq * Wq: rows of one phase (and of the output grid)
    m: int                # one past the last valid output row
    offsets: tuple        # per tap (i, j): its first input row in the phase-major row matrix
    input_rows: int       # rows of the input matrix (and of its gradient)
    shared: bool          # stride 1 with padding shared between neighbouring lines and images


def geometry(x_shape, kernel, stride, pads, dilation, shared=True) -> Geometry:
    """Where each tap reads, on a grid of ``Hq x Wq`` per image.

    Stride 1, ``shared``: a line of the grid is ``left`` zeros, the ``W`` pixels and zeros up to
    ``Wq = max(W + max(left, right), OW)``; a line past the end of one line is the start of the
    next, so the *right* padding of one line is the left padding of the next (and the bottom
    padding of one image the top padding of the next): ``(H + 1) x (W + 1)`` per image for a 3x3
    "same" layer instead of ``(H + 2) x (W + 2)``, 1.31x the output's rows at 7x7 instead of 1.65x.
    The matrix ends with enough zero rows for the last taps.

    Stride ``s``: tap ``(i, j)`` at padded offset ``(t_h, t_w) = (i*dh, j*dw)`` reads phase
    ``(t_h mod sh, t_w mod sw)`` of the padded input, shifted by ``(t_h // sh, t_w // sw)``; every
    phase is laid on the same ``ceil(Hp/sh) x ceil(Wp/sw)`` grid, so output row ``r`` reads row
    ``r + shift`` of the tap's phase.
    """
    n, _, h, w = x_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    (top, bottom), (left, right) = pads
    hp, wp = h + top + bottom, w + left + right
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    shared = shared and (sh, sw) == (1, 1)
    if shared:
        hq, wq = max(h + max(top, bottom), oh), max(w + max(left, right), ow)
    else:
        hq, wq = -(-hp // sh), -(-wp // sw)
    rows = n * hq * wq
    offsets = tuple(((i * dh % sh) * sw + j * dw % sw) * rows + (i * dh // sh) * wq + j * dw // sw
                    for i in range(kh) for j in range(kw))
    m = (n - 1) * hq * wq + (oh - 1) * wq + ow
    input_rows = max(rows, m + max(offsets)) if shared else sh * sw * rows
    return Geometry((hp, wp), (hq, wq), (oh, ow), sh * sw, rows, m, offsets, input_rows, shared)


def _phase_slices(size, before, stride, phase, length):
    """For one phase of one axis: ``(q0, x0, count)``: phase positions ``q0 .. q0+count`` hold input
    positions ``x0, x0 + stride, ...`` (padded position ``phase + stride*q`` is input ``... - before``)."""
    q0 = max(0, -(-(before - phase) // stride))
    x0 = phase + stride * q0 - before
    count = 0 if x0 >= size else min(length - q0, -(-(size - x0) // stride))
    return q0, x0, max(0, count)


def phase_rows(x, pads, stride, geo: Geometry):
    """The input as the row matrix the taps read, ``(geo.input_rows, C)``: the padded input on the
    shared grid (stride 1), or split into its ``sh*sw`` phases on a common grid (zeros where a phase
    runs past the padded input)."""
    n, c, h, w = x.shape
    (top, _), (left, _) = pads
    hq, wq = geo.grid
    x_nhwc = x.transpose(0, 2, 3, 1)
    if geo.shared:
        if (hq, wq) == (h, w) and geo.input_rows == geo.rows:
            return np.ascontiguousarray(x_nhwc).reshape(geo.rows, c)          # no padding: x itself
        flat = np.empty((geo.input_rows, c), dtype=x.dtype)
        grid = flat[:geo.rows].reshape(n, hq, wq, c)
        _line_runs(n * hq, hq, wq * c, lambda image, first, stop: _frame(
            grid[image, first:stop], first, stop, x_nhwc[image], top, left, h, w))
        flat[geo.rows:] = 0
        return flat
    if stride == (1, 1):
        return pad_rows(x, pads).reshape(geo.rows, c)
    return _phases(np, x_nhwc, pads, stride, geo)


def _phases(xp, x_nhwc, pads, stride, geo: Geometry):
    """The ``sh*sw`` phases of the input on their common grid, as rows ``(sh*sw*geo.rows, C)``: phase
    ``(a, b)`` holds the padded input's pixels ``(a + sh*q, b + sw*u)``, zeros past its edge."""
    n, h, w, c = x_nhwc.shape
    (top, _), (left, _) = pads
    hq, wq = geo.grid
    sh, sw = stride
    phases = xp.zeros((sh, sw, n, hq, wq, c), dtype=x_nhwc.dtype)
    for a in range(sh):
        q0, x0, nq = _phase_slices(h, top, sh, a, hq)
        for b in range(sw):
            u0, y0, nu = _phase_slices(w, left, sw, b, wq)
            if nq and nu:
                phases[a, b, :, q0:q0 + nq, u0:u0 + nu] = x_nhwc[:, x0::sh, y0::sw][:, :nq, :nu]
    return phases.reshape(sh * sw * geo.rows, c)


def unphase_rows(phase_grad, x_shape, pads, stride, geo: Geometry):
    """dL/dx (N, H, W, C), contiguous, from the gradient of :func:`phase_rows`'s output (each input
    pixel sits in one phase, at one place)."""
    n, c, h, w = x_shape
    (top, _), (left, _) = pads
    if stride == (1, 1):
        grid = phase_grad[:geo.rows].reshape(n, geo.grid[0], geo.grid[1], c)
        return grid if geo.grid == (h, w) else crop_rows(grid, (h, w), origin=(top, left))
    return _unphases(np, phase_grad, x_shape, pads, stride, geo)


def _unphases(xp, phase_grad, x_shape, pads, stride, geo: Geometry):
    """The adjoint of :func:`_phases`: dL/dx (N, H, W, C) gathered back from the phases' gradient rows."""
    n, c, h, w = x_shape
    (top, _), (left, _) = pads
    hq, wq = geo.grid
    sh, sw = stride
    phases = phase_grad.reshape(sh, sw, n, hq, wq, c)
    dx = xp.empty((n, h, w, c), dtype=phase_grad.dtype)
    for a in range(sh):
        q0, x0, nq = _phase_slices(h, top, sh, a, hq)
        for b in range(sw):
            u0, y0, nu = _phase_slices(w, left, sw, b, wq)
            if nq and nu:
                dx[:, x0::sh, y0::sw][:, :nq, :nu] = phases[a, b, :, q0:q0 + nq, u0:u0 + nu]
    return dx


# --- forward -----------------------------------------------------------------------------------------

def implicit_conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, relu=False,
                            variant="taps"):
    """``y = conv2d(x, weight) + bias`` by slab GEMMs -> ``(y, cache)``; zero padding only, and stride 1
    for ``variant="rows"``.

    ``y`` is (N, O, OH, OW), stored channels-last; ``relu=True`` returns ``max(y, 0)``, applied in
    the pass that reads the output window off the grid.
    """
    if variant not in VARIANTS:
        raise ValueError(f"implicit-GEMM variant must be one of {VARIANTS}, got {variant!r}")
    if xp_of(x) is not np:
        return implicit_conv2d_forward_xp(x, weight, bias, stride, padding, dilation, groups, relu=relu)
    stride_pair = pair(stride, "stride", 1)
    pads = implicit_pads(x.shape, weight.shape, stride, padding, dilation, groups, allow_stride=variant == "taps")
    if pads is None:
        raise ValueError("the implicit-GEMM path computes zero-padded convolutions of a non-empty 4-D batch "
                         f"(stride 1 for variant='rows'); got input {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}, variant {variant!r}")
    gemm = _gemm(x.dtype)
    dh, dw = pair(dilation, "dilation", 1)
    out_channels, cg, kh, kw = weight.shape
    og = out_channels // groups
    n, c, h, w = x.shape
    geo = geometry(x.shape, (kh, kw), stride_pair, pads, (dh, dw), shared=variant == "taps")
    hq, wq = geo.grid
    oh, ow = geo.out_hw
    stored = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))   # (kh, kw, cg, O)
    out = np.empty((n, hq, wq, out_channels), dtype=x.dtype)
    size = x.dtype.itemsize
    w_ptr, o_ptr = stored.ctypes.data, out.ctypes.data
    if variant == "taps":
        grid = phase_rows(x, pads, stride_pair, geo)
        g_ptr, offsets = grid.ctypes.data, geo.offsets

        def rows(lo, hi, block):
            for a in range(lo, hi, block):
                count = min(block, hi - a)
                for tap, offset in enumerate(offsets):
                    for g in range(groups):
                        gemm(_ROW, _N, _N, count, og, cg, 1.0, g_ptr + ((a + offset) * c + g * cg) * size, c,
                             w_ptr + (tap * cg * out_channels + g * og) * size, out_channels,
                             0.0 if tap == 0 else 1.0, o_ptr + (a * out_channels + g * og) * size, out_channels)

        split_rows(geo.m, rows, max(64, BLOCK_ELEMENTS // out_channels))
    else:
        rows_of = pad_rows(x, pads).reshape(geo.rows, c)
        per_image = hq * wq
        for images in _chunks(n, per_image * kw * c):
            r0, count = images.start * per_image, images.stop - images.start
            q = _width_copies(rows_of[r0:r0 + count * per_image], kw, dw, groups, 1)
            m = (count - 1) * per_image + (oh - 1) * wq + ow
            q_ptr, k = q.ctypes.data, kw * cg
            for i in range(kh):
                offset = i * dh * wq
                for g in range(groups):
                    gemm(_ROW, _N, _N, m, og, k, 1.0, q_ptr + (offset * kw * c + g * k) * size, kw * c,
                         w_ptr + (i * kw * cg * out_channels + g * og) * size, out_channels,
                         0.0 if i == 0 else 1.0, o_ptr + (r0 * out_channels + g * og) * size, out_channels)
    y = out if (oh, ow) == (hq, wq) and bias is None and not relu else crop_rows(out, (oh, ow), bias, relu)
    cache = ImplicitCache(x, weight, tuple(x.shape), (oh, ow), pads, (dh, dw), groups, bias is not None, variant,
                          stride_pair)
    return y.transpose(0, 3, 1, 2), cache


# --- backward ----------------------------------------------------------------------------------------

def implicit_conv2d_backward(dy, cache: ImplicitCache, need_input_grad=True, *, need_weight_grad=True,
                             need_bias_grad=None):
    """Gradients ``(dx, dweight, dbias)`` from ``dy`` (N, O, OH, OW), by the slabs of the forward pass.

    As :func:`numres.functional.conv.conv2d_backward`: a gradient not asked for is None and costs
    nothing; ``dweight`` has the weight's shape and is stored ``(kh, kw, C/groups, O)``.
    """
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    if xp_of(dy) is not np:
        return implicit_conv2d_backward_xp(dy, cache, need_input_grad, need_weight_grad=need_weight_grad,
                                           need_bias_grad=need_bias_grad)
    gemm = _gemm(dy.dtype)
    weight, groups, variant, stride = cache.weight, cache.groups, cache.variant, cache.stride
    out_channels, cg, kh, kw = weight.shape
    og = out_channels // groups
    n, c, h, w = cache.x_shape
    dh, dw = cache.dilation
    geo = geometry(cache.x_shape, (kh, kw), stride, cache.pads, cache.dilation, shared=variant == "taps")
    hq, wq = geo.grid
    oh, ow = geo.out_hw
    per_image = hq * wq
    m = geo.m
    size = dy.dtype.itemsize
    dbias = dy.sum(axis=(0, 2, 3)) if cache.has_bias and need_bias_grad else None
    if not (need_input_grad or need_weight_grad):
        return None, None, dbias
    dgrid = grid_gradient(dy, hq, wq)                                 # (n, hq, wq, O), zero outside the window
    d_ptr = dgrid.ctypes.data
    dweight = dx = None
    if need_weight_grad:
        dstored = np.empty((kh, kw, cg, out_channels), dtype=dy.dtype)
        dw_ptr = dstored.ctypes.data
        if variant == "taps":
            grid = phase_rows(cache.x, cache.pads, stride, geo)
            g_ptr, offsets = grid.ctypes.data, geo.offsets
            partials = {}

            def pixels(lo, hi, block):
                # This range's share of every dW_ij = P[off + lo : off + hi]^T @ dYp[lo:hi] (K split over threads).
                target = dstored if lo == 0 else np.empty_like(dstored)
                if lo > 0:
                    partials[lo] = target
                t_ptr = target.ctypes.data
                for a in range(lo, hi, block):
                    count = min(block, hi - a)
                    for tap, offset in enumerate(offsets):
                        for g in range(groups):
                            gemm(_ROW, _T, _N, cg, og, count, 1.0, g_ptr + ((a + offset) * c + g * cg) * size, c,
                                 d_ptr + (a * out_channels + g * og) * size, out_channels, 0.0 if a == lo else 1.0,
                                 t_ptr + (tap * cg * out_channels + g * og) * size, out_channels)

            split_fixed(m, pixels, weight_gradient_parts(m))
            for lo in sorted(partials):                 # a fixed order: the sum does not depend on timing
                dstored += partials[lo]
        else:
            grid = pad_rows(cache.x, cache.pads)
            rows_of = grid.reshape(geo.rows, c)
            k = kw * cg
            for index, images in enumerate(_chunks(n, per_image * kw * c)):
                r0, count = images.start * per_image, images.stop - images.start
                q = _width_copies(rows_of[r0:r0 + count * per_image], kw, dw, groups, 1)
                mc = (count - 1) * per_image + (oh - 1) * wq + ow
                q_ptr = q.ctypes.data
                for i in range(kh):
                    for g in range(groups):
                        gemm(_ROW, _T, _N, k, og, mc, 1.0, q_ptr + (i * dh * wq * kw * c + g * k) * size, kw * c,
                             d_ptr + (r0 * out_channels + g * og) * size, out_channels,
                             0.0 if index == 0 else 1.0,
                             dw_ptr + (i * kw * cg * out_channels + g * og) * size, out_channels)
        dweight = dstored.transpose(3, 2, 0, 1)
        del grid                                  # the padded input is not needed for dx: lower peak memory
    if need_input_grad:
        total = geo.input_rows
        dgrid_x = np.empty((total, c), dtype=dy.dtype)
        x_ptr = dgrid_x.ctypes.data
        stored = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))    # (kh, kw, cg, O)
        if variant == "taps":
            w_ptr, offsets = stored.ctypes.data, geo.offsets

            def input_rows(lo, hi, block):
                # dP[a:b] = sum over taps of dYp[a - off : b - off] @ W_ij^T, the dYp rows clipped to [0, m).
                for a in range(lo, hi, block):
                    b = min(a + block, hi)
                    spans = [(tap, offset, max(a - offset, 0), min(b - offset, m))
                             for tap, offset in enumerate(offsets)]
                    spans = [span for span in spans if span[3] > span[2]]
                    beta = 0.0
                    if not spans or spans[0][2] + spans[0][1] > a or spans[0][3] + spans[0][1] < b:
                        dgrid_x[a:b] = 0                   # no tap, or the first one, covers the whole block
                        beta = 1.0
                    for tap, offset, s0, s1 in spans:
                        for g in range(groups):
                            gemm(_ROW, _N, _T, s1 - s0, cg, og, 1.0, d_ptr + (s0 * out_channels + g * og) * size,
                                 out_channels, w_ptr + (tap * cg * out_channels + g * og) * size, out_channels,
                                 beta, x_ptr + ((s0 + offset) * c + g * cg) * size, c)
                        beta = 1.0

            split_rows(total, input_rows, max(64, BLOCK_ELEMENTS // c))
        else:
            # dP[r] = sum_i Qd[r - i*dh*Wp] @ Wt_i, Qd[r] = (dYp[r], dYp[r-dw], ...), Wt_i[(j, o), c] = W[i, j, c, o].
            turned = np.ascontiguousarray(
                stored.reshape(kh, kw, cg, groups, og).transpose(0, 3, 1, 4, 2))   # (kh, groups, kw, og, cg)
            t_ptr, k = turned.ctypes.data, kw * og
            drows = dgrid.reshape(geo.rows, out_channels)
            for images in _chunks(n, per_image * kw * out_channels):
                r0, count = images.start * per_image, images.stop - images.start
                chunk_rows = count * per_image
                qd = _width_copies(drows[r0:r0 + chunk_rows], kw, dw, groups, -1)
                q_ptr = qd.ctypes.data
                for i in range(kh):
                    offset = i * dh * wq
                    for g in range(groups):
                        gemm(_ROW, _N, _N, chunk_rows - offset, cg, k, 1.0, q_ptr + g * k * size, kw * out_channels,
                             t_ptr + ((i * groups + g) * k * cg) * size, cg, 0.0 if i == 0 else 1.0,
                             x_ptr + ((r0 + offset) * c + g * cg) * size, c)
        dx = unphase_rows(dgrid_x, cache.x_shape, cache.pads, stride, geo).transpose(0, 3, 1, 2)
    return dx, dweight, dbias


# --- any array module: CuPy through cuBLAS, the rest through matmul ----------------------------------------
#
# The same slabs, written once against ``xp``: on CuPy each slab GEMM is cuBLAS's gemm with
# ``beta = 1`` on views of the row matrices (a slab of a C-contiguous matrix is C-contiguous, so
# cuBLAS reads it in place); on any other module (NumPy, the guard backend the tests use) it is
# ``matmul`` plus an in-place add.  No host round-trips: shapes and offsets are Python integers.
# Not chosen by "auto" on a GPU until it has been measured there; ``set_conv_algorithm("implicit")``
# selects it.


def _cupy_cublas(xp):
    if getattr(xp, "__name__", "") != "cupy":
        return None
    try:
        from cupy import cublas
    except ImportError:                              # pragma: no cover (an old CuPy)
        return None
    return cublas


def slab_gemm(xp, a, b, out, accumulate, trans_a=False, trans_b=False):
    """``out = op(a) @ op(b)``, or ``out += op(a) @ op(b)`` when ``accumulate``: cuBLAS's gemm with
    beta = 1 on CuPy, ``matmul`` and an add elsewhere."""
    cublas = _cupy_cublas(xp)
    if cublas is not None:
        cublas.gemm("T" if trans_a else "N", "T" if trans_b else "N", a, b, out=out,
                    beta=1.0 if accumulate else 0.0)
        return
    product = xp.matmul(a.T if trans_a else a, b.T if trans_b else b)
    if accumulate:
        out += product
    else:
        out[...] = product


def _grid_xp(xp, x, pads, stride, geo: Geometry):
    """:func:`phase_rows` for any array module."""
    n, c, h, w = x.shape
    (top, _), (left, _) = pads
    hq, wq = geo.grid
    x_nhwc = x.transpose(0, 2, 3, 1)
    if geo.shared:
        flat = xp.zeros((geo.input_rows, c), dtype=x.dtype)
        flat[:geo.rows].reshape(n, hq, wq, c)[:, top:top + h, left:left + w] = x_nhwc
        return flat
    return _phases(xp, x_nhwc, pads, stride, geo)


def implicit_conv2d_forward_xp(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, relu=False):
    """:func:`implicit_conv2d_forward` on any array module (see the notes above this function)."""
    xp = xp_of(x)
    stride_pair = pair(stride, "stride", 1)
    pads = implicit_pads(x.shape, weight.shape, stride, padding, dilation, groups)
    if pads is None:
        raise ValueError("the implicit-GEMM path computes zero-padded convolutions of a non-empty 4-D batch; "
                         f"got input {tuple(x.shape)}, weight {tuple(weight.shape)}, padding {padding}")
    dilation = pair(dilation, "dilation", 1)
    out_channels, cg, kh, kw = weight.shape
    og = out_channels // groups
    n = x.shape[0]
    geo = geometry(x.shape, (kh, kw), stride_pair, pads, dilation)
    (hq, wq), (oh, ow), m = geo.grid, geo.out_hw, geo.m
    grid = _grid_xp(xp, x, pads, stride_pair, geo)
    stored = xp.ascontiguousarray(weight.transpose(2, 3, 1, 0))      # (kh, kw, cg, O)
    out = xp.empty((geo.rows, out_channels), dtype=x.dtype)
    for tap, offset in enumerate(geo.offsets):
        i, j = divmod(tap, kw)
        for g in range(groups):
            slab_gemm(xp, grid[offset:offset + m, g * cg:(g + 1) * cg], stored[i, j, :, g * og:(g + 1) * og],
                      out[:m, g * og:(g + 1) * og], tap > 0)
    y = xp.ascontiguousarray(out.reshape(n, hq, wq, out_channels)[:, :oh, :ow])
    if bias is not None:
        y += bias
    if relu:
        xp.maximum(y, 0, out=y)
    cache = ImplicitCache(x, weight, tuple(x.shape), (oh, ow), pads, dilation, groups, bias is not None, "taps",
                          stride_pair)
    return y.transpose(0, 3, 1, 2), cache


def implicit_conv2d_backward_xp(dy, cache: ImplicitCache, need_input_grad=True, *, need_weight_grad=True,
                                need_bias_grad=None):
    """:func:`implicit_conv2d_backward` on any array module."""
    xp = xp_of(dy)
    need_bias_grad = need_weight_grad if need_bias_grad is None else need_bias_grad
    out_channels, cg, kh, kw = cache.weight.shape
    og, groups = out_channels // cache.groups, cache.groups
    n, c, h, w = cache.x_shape
    geo = geometry(cache.x_shape, (kh, kw), cache.stride, cache.pads, cache.dilation)
    (hq, wq), (oh, ow), m = geo.grid, geo.out_hw, geo.m
    dbias = dy.sum(axis=(0, 2, 3)) if cache.has_bias and need_bias_grad else None
    if not (need_input_grad or need_weight_grad):
        return None, None, dbias
    dgrid = xp.zeros((n, hq, wq, out_channels), dtype=dy.dtype)
    dgrid[:, :oh, :ow] = dy.transpose(0, 2, 3, 1)
    drows = dgrid.reshape(geo.rows, out_channels)
    stored = xp.ascontiguousarray(cache.weight.transpose(2, 3, 1, 0))
    dweight = dx = None
    if need_weight_grad:
        grid = _grid_xp(xp, cache.x, cache.pads, cache.stride, geo)
        dstored = xp.empty((kh, kw, cg, out_channels), dtype=dy.dtype)
        for tap, offset in enumerate(geo.offsets):
            i, j = divmod(tap, kw)
            for g in range(groups):
                slab_gemm(xp, grid[offset:offset + m, g * cg:(g + 1) * cg], drows[:m, g * og:(g + 1) * og],
                          dstored[i, j, :, g * og:(g + 1) * og], False, trans_a=True)
        dweight = dstored.transpose(3, 2, 0, 1)
        del grid
    if need_input_grad:
        dflat = xp.zeros((geo.input_rows, c), dtype=dy.dtype)
        for tap, offset in enumerate(geo.offsets):
            i, j = divmod(tap, kw)
            for g in range(groups):
                slab_gemm(xp, drows[:m, g * og:(g + 1) * og], stored[i, j, :, g * og:(g + 1) * og],
                          dflat[offset:offset + m, g * cg:(g + 1) * cg], True, trans_b=True)
        (top, _), (left, _) = cache.pads
        if geo.shared:
            dx = xp.ascontiguousarray(dflat[:geo.rows].reshape(n, hq, wq, c)[:, top:top + h, left:left + w])
        else:
            dx = _unphases(xp, dflat, cache.x_shape, cache.pads, cache.stride, geo)
        dx = dx.transpose(0, 3, 1, 2)
    return dx, dweight, dbias
