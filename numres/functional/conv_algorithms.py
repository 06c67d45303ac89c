"""Which algorithm computes a convolution: im2col + GEMM (the reference), Winograd, or implicit GEMM.

::

    nr.functional.set_conv_algorithm("im2col")     # every convolution: im2col + GEMM
    nr.functional.set_conv_algorithm("winograd")   # 3x3 stride-1 layers: Winograd F(2x2, 3x3)
    nr.functional.set_conv_algorithm("winograd", winograd_tile=4)   # ... or F(4x4, 3x3)
    nr.functional.set_conv_algorithm("implicit")   # zero-padded layers: slab GEMMs, no patch matrix
    nr.functional.set_conv_algorithm("auto")       # per layer shape, by the rule below (the default)
    with nr.functional.conv_algorithm("im2col"): ...                 # for one block of code

Winograd computes only 3x3 kernels with stride 1, dilation 1, groups 1 and zero padding of at
most 2; every other convolution takes the im2col path (:mod:`numres.functional.conv`), whatever
the setting.  Implicit GEMM (:mod:`numres.functional.implicit_gemm`) computes layers with zero
padding, any kernel size, stride, dilation and groups, by ``kh*kw`` GEMMs on slabs of the padded input
through NumPy's own CBLAS; where NumPy's BLAS has no ``cblas_sgemm``/``cblas_dgemm`` numres says so
once and uses im2col.  im2col stays the readable reference: all three are tested against PyTorch
and against each other.  The choice is made in forward, and backward follows it (the cache says which).

Implicit GEMM in "auto".  It saves im2col's copy (9x the input for a 3x3 kernel) and col2im's
scatter-add, but computes the output on the padded grid, ``Hp*Wp`` rows for ``OH*OW`` wanted (1.07x
at 56x56, 1.15x at 28x28, 1.31x at 14x14, 1.65x at 7x7), and its GEMMs have ``K = C`` instead of
``9C``.  Measured (CPU time of one thread, AMD EPYC with AVX-512, OpenBLAS SkylakeX kernel, float32,
median of 6 interleaved runs on a machine shared with other jobs, so +-10-20%), forward / backward
relative to im2col::

    64 at 56, N=8     0.63 / 0.65         256 at 14, N=8     1.22 / 1.23
    128 at 28, N=8    1.02 / 0.90         512 at 7, N=8      1.58 / 1.59
    32 at 56, N=32    0.69 / 0.57         64 at 8, N=32      1.14 / 1.03
    16 at 32, N=32    0.50 / 0.37         1x1 layers         1.00-1.02 / 0.89-1.09 (the same GEMM)
    32 at 16, N=32    0.74 / 0.67

Strided layers (the padded input split into its stride x stride phases, each a stride-1 problem on a
common grid) measured 0.95-1.08 / 0.72-0.91 of im2col's time at 56x56 with 64-128 channels, and
1.1-1.35 at 28x28 and 14x14, 1x1 stride-2 and the 7x7 stem (3 channels); "auto" leaves them to
im2col (``set_conv_algorithm("implicit")`` and benchmark mode do consider them).

So "auto" takes it (:func:`auto_prefers_implicit`) for stride-1 kernels larger than 1x1 with at least 16
channels in and out per group, where the padded grid has at most 15% more rows than the output,
or at most 30% more with at most 64 channels (where im2col's copy weighs most).  Winograd's rule
(one BLAS thread) is asked first.  These are one-thread measurements on a busy machine; two-thread
timings there were too noisy to decide by, so ``benchmark=True`` (below) is the way to check a
machine, and the benchmark's per-layer rows show each algorithm's time.

The "auto" rule.  Winograd F(2,3) does 2.25x fewer multiplications, but its transforms are
elementwise passes over memory whose cost grows with C + O while the GEMM work saved grows with
C * O, its 16 GEMMs are smaller, its weight transform costs 16*C*O whatever the batch, and a
7x7 output needs 8x8 of 2x2 tiles.  Measured (CPU time of one thread, Xeon with AVX-512, float32,
best of 3; a shared machine, so +-10-20% between runs), forward / backward time relative to
im2col + GEMM, for C -> C channels at side x side pixels and batch N::

    wins                                        ties or losses
    64 at 56, N=8      0.59-0.76 / 0.70-0.73    64 at 14, N=8         1.06-1.17 / 0.93-1.11
    128 at 28, N=8     0.65-0.67 / 0.70-0.76    128 at 14, N=8        1.02-1.06 / 0.95-1.01
    256 at 14, N=8     0.84-0.85 / 0.82-0.84    512 at 4, N=32        0.96 / 1.03
    64 at 28, N=8      0.90 / 0.92              512 at 7, N=8         1.21 / 1.25
    32 at 56, N=8      0.99 / 0.81              512 at 2, N=32        1.62 / 1.63
    64 at 16, N=32     0.70 / 0.64              3 -> 16 at 224, N=8   2.79 / 1.28
    128 at 8, N=32     0.83 / 0.77
    256 at 8, N=32     0.79 / 0.74
    256 at 4, N=32     0.92 / 0.94
    16 at 32, N=32     1.09 / 0.79
    16 at 32, N=128    0.96 / 0.66
    32 at 16, N=32     1.00 / 0.70
    64 at 8, N=32      0.95 / 0.67

These were one-thread measurements, and that is where Winograd wins: its transforms are split
over threads (map_tiles), but as NumPy calls of about 64K elements, and calls that small measured
no faster on two threads than on one here (256K-element calls did: 25 -> 14 ms); runs of 1M
transformed elements instead of 256K brought two-thread Winograd to 1.29/1.11 (64 at 56),
1.07/1.07 (128 at 28) and 0.90/0.90 (256 at 14) in a later quiet run.  With the two BLAS threads of a
2-core Xeon (AVX-512, OpenBLAS SkylakeX kernel, a quiet machine, median of 5), forward / backward
relative to im2col + GEMM at N=8 were 2.16/1.80 (64 at 56), 1.48/1.56 (128 at 28), 1.34/1.37 (256 at
14) and 1.27/1.20 (512 at 7), against 0.97/0.98, 0.90/0.92, 0.94/0.95 and 1.10/1.08 on one thread in
the same run.  So "auto" considers Winograd only while NumPy's BLAS runs on one thread
(:func:`numres.blas.current_blas_threads`), as in ``numres train --threads 1`` or one rank per core
under MPI; with more threads it keeps im2col.

F(4,3) never beat F(2,3) (0.70-0.82x, 0.70-0.78x, 1.19-1.27x, 1.76-1.88x on the first, second,
third and 512-at-7 layers).  So "auto" takes F(2,3) (:func:`auto_prefers_winograd`) where both
channel counts are at least 16, the batch has at least 512 output pixels (N*OH*OW) to spread the
weight transform over, the layer does at least 2**23 multiply-adds per tap (N*OH*OW*C*O) so that
NumPy's per-call costs fade, and the tiles cover at most 15% more than the output.  It does so on
the NumPy backend only: on a GPU the registered im2col kernels and cuBLAS stay in charge until
Winograd is measured there.  The rule does not depend on timing, so a run is reproducible;
:func:`choose_conv_algorithm` tells which algorithm a layer gets.  With many cores the balance
may move (the 16 smaller GEMMs thread less well than im2col's one large GEMM): measure with the
benchmark mode below.

Measuring instead.  ``set_conv_algorithm("auto", benchmark=True)`` times every algorithm that can
compute the layer, forward and backward, the first time each layer shape is seen (as
``torch.backends.cudnn.benchmark`` does) and keeps the fastest for that shape; machines differ
(vector width, cores, BLAS), and this lets each decide.  :func:`measured_choices` returns what it
chose and the times it measured.  The first step of a run then costs extra passes per new shape,
and the choice can differ between runs on a noisy machine.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np

from ..backend import backend_of, synchronize, xp_of
from ..blas import current_blas_threads
from . import conv as im2col_conv
from .implicit_gemm import ImplicitCache, implicit_available, implicit_conv2d_backward, implicit_conv2d_forward, \
    implicit_pads
from .winograd import WinogradCache, transforms_for, winograd_applies, winograd_conv2d_backward, \
    winograd_conv2d_forward

ALGORITHMS = ("im2col", "winograd", "implicit", "auto")

_setting = {"algorithm": "auto", "winograd_tile": 2, "benchmark": False}
_measured: dict = {}           # layer shape -> the algorithm that measured fastest ("auto", benchmark=True)
_timings: dict = {}            # layer shape -> {algorithm: seconds} behind that choice
_warned = set()


def set_conv_algorithm(algorithm: str, *, winograd_tile: int | None = None, benchmark: bool | None = None) -> None:
    """Choose how convolutions are computed from now on: ``"im2col"``, ``"winograd"`` or ``"auto"``.

    ``winograd_tile`` (2 or 4) picks F(2x2, 3x3) or F(4x4, 3x3) for the layers that take
    Winograd; ``benchmark=True`` makes ``"auto"`` time both algorithms on the first forward pass
    of each layer shape instead of following the rule.  Both keep their value when not given;
    setting either forgets earlier measurements.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"convolution algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if winograd_tile is not None:
        transforms_for(winograd_tile)                  # a clear error for a tile size we lack
        if int(winograd_tile) != _setting["winograd_tile"]:
            _measured.clear()
            _timings.clear()
        _setting["winograd_tile"] = int(winograd_tile)
    if benchmark is not None:
        if not isinstance(benchmark, bool):
            raise TypeError(f"benchmark must be True or False, got {benchmark!r}")
        _measured.clear()
        _timings.clear()
        _setting["benchmark"] = benchmark
    _setting["algorithm"] = algorithm


def measured_choices() -> list:
    """What ``benchmark=True`` measured so far: ``[{"input", "weight", "stride", "padding", "dilation",
    "groups", "choice", "seconds": {algorithm: forward + backward seconds}}]``, one per layer shape."""
    rows = []
    for key, choice in _measured.items():
        _, x_shape, weight_shape, stride, pads, dilation, groups, _ = key
        rows.append({"input": list(x_shape), "weight": list(weight_shape), "stride": list(stride),
                     "padding": [list(p) for p in pads], "dilation": list(dilation), "groups": groups,
                     "choice": choice, "seconds": dict(_timings.get(key, {}))})
    return rows


def get_conv_algorithm() -> str:
    """The current setting: ``"im2col"``, ``"winograd"`` or ``"auto"``."""
    return _setting["algorithm"]


def get_winograd_tile() -> int:
    """The output tile ``m`` of F(m x m, 3x3) used where Winograd is chosen."""
    return _setting["winograd_tile"]


@contextlib.contextmanager
def conv_algorithm(algorithm: str, *, winograd_tile: int | None = None, benchmark: bool | None = None):
    """``with conv_algorithm("winograd"): ...`` sets the algorithm inside the block only."""
    saved = dict(_setting)
    set_conv_algorithm(algorithm, winograd_tile=winograd_tile, benchmark=benchmark)
    try:
        yield
    finally:
        _setting.update(saved)


def winograd_padding(padding, padding_mode="zeros"):
    """The (ph, pw) zero padding of a 3x3 stride-1 layer, or None where Winograd cannot apply it."""
    if padding_mode != "zeros":
        return None
    try:
        (top, bottom), (left, right) = im2col_conv.conv_padding(padding, (3, 3), (1, 1), (1, 1))
    except (TypeError, ValueError):
        return None                                   # the im2col path names the problem
    return (top, left) if (top, left) == (bottom, right) else None


def _winograd_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode):
    """The (ph, pw) padding when Winograd can compute this convolution (a non-empty batch), else None."""
    pads = winograd_padding(padding, padding_mode)
    if pads is None or len(x_shape) != 4 or x_shape[0] == 0:
        return None
    return pads if winograd_applies(x_shape, weight_shape, stride, pads, dilation, groups) else None


def _implicit_usable(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode):
    """The implicit path's zero padding when it can compute this layer here (NumPy, stride 1, a CBLAS
    GEMM found), else None; the first time the CBLAS GEMM is missing, one warning says so."""
    if xp is not np:
        return None
    pads = implicit_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode)
    if pads is not None and not implicit_available():
        if "cblas" not in _warned:
            _warned.add("cblas")
            warnings.warn("numres: NumPy's BLAS exports no cblas_sgemm/cblas_dgemm that numres can find, so "
                          "implicit-GEMM convolution is unavailable; those layers use im2col", RuntimeWarning,
                          stacklevel=3)
        return None
    return pads


def _candidates(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode):
    """``{algorithm: padding}`` of every algorithm that can compute this layer (im2col always can)."""
    found = {"im2col": padding}
    wpads = _winograd_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode)
    if wpads is not None:
        found["winograd"] = wpads
    ipads = _implicit_usable(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode)
    if ipads is not None:
        found["implicit"] = ipads
    return found


def choose_conv_algorithm(x_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, xp=np,
                          padding_mode="zeros") -> str:
    """``"im2col"``, ``"winograd"`` or ``"implicit"``: what the current setting computes this convolution with."""
    setting = get_conv_algorithm()
    if setting == "im2col":
        return "im2col"
    if setting == "winograd":
        pads = _winograd_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode)
        return "im2col" if pads is None else "winograd"
    if setting == "implicit":
        usable = _implicit_usable(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode)
        return "im2col" if usable is None else "implicit"
    candidates = _candidates(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode)
    if len(candidates) == 1:
        return "im2col"
    key = _shape_key(x_shape, weight_shape, stride, padding, dilation, groups, xp)
    if _setting["benchmark"] and key in _measured:
        return _measured[key]
    if "winograd" in candidates:
        pads = candidates["winograd"]
        out_hw = (x_shape[2] + 2 * pads[0] - 2, x_shape[3] + 2 * pads[1] - 2)
        if xp is np and current_blas_threads() == 1 and \
                auto_prefers_winograd(x_shape[0], weight_shape[1], weight_shape[0], out_hw, get_winograd_tile()):
            return "winograd"
    if "implicit" in candidates and im2col_conv.pair(stride, "stride", 1) == (1, 1) and \
            auto_prefers_implicit(x_shape, weight_shape, candidates["implicit"], dilation, groups):
        return "implicit"
    return "im2col"


def auto_prefers_implicit(x_shape, weight_shape, pads, dilation=1, groups=1):
    """The measured rule of "auto" for implicit GEMM (see the module's notes), on a stride-1 layer
    with zero padding ``((top, bottom), (left, right))``."""
    dh, dw = im2col_conv.pair(dilation, "dilation", 1)
    out_channels, cg, kh, kw = weight_shape
    if kh * kw == 1 or min(cg, out_channels // groups) < 16:
        return False
    (top, bottom), (left, right) = pads
    hp, wp = x_shape[2] + top + bottom, x_shape[3] + left + right
    extra = hp * wp / ((hp - dh * (kh - 1)) * (wp - dw * (kw - 1)))
    return extra <= 1.15 or (extra <= 1.30 and max(x_shape[1], out_channels) <= 64)


def auto_prefers_winograd(n, in_channels, out_channels, out_hw, tile=2):
    """The measured rule of "auto" (see the module's notes) for a 3x3 stride-1 layer on the CPU."""
    pixels = n * out_hw[0] * out_hw[1]
    covered = (-(-out_hw[0] // tile) * tile) * (-(-out_hw[1] // tile) * tile) / (out_hw[0] * out_hw[1])
    return (min(in_channels, out_channels) >= 16 and pixels >= 512 and covered <= 1.15
            and pixels * in_channels * out_channels >= 1 << 23)


def _shape_key(x_shape, weight_shape, stride, padding, dilation, groups, xp):
    try:
        pads = im2col_conv.conv_padding(padding, tuple(weight_shape[2:]), im2col_conv.pair(stride, "stride", 1),
                                        im2col_conv.pair(dilation, "dilation", 1))
    except (TypeError, ValueError):
        pads = padding
    return (id(xp), tuple(x_shape), tuple(weight_shape), im2col_conv.pair(stride, "stride", 1), pads,
            im2col_conv.pair(dilation, "dilation", 1), groups, _setting["winograd_tile"])


def measure_conv_algorithms(x, weight, bias, padding, ops=None, repeats=1, *, stride=1, dilation=1, groups=1,
                            algorithms=None):
    """Seconds for forward + backward of each algorithm on this input (after one warm-up run each).

    ``algorithms`` maps each algorithm to time to the padding it takes (by default im2col and
    Winograd, both with ``padding``).
    """
    backend = backend_of(x)
    forward = im2col_conv.conv2d_forward if ops is None else ops.conv2d_forward
    backward = im2col_conv.conv2d_backward if ops is None else ops.conv2d_backward
    algorithms = algorithms or {"im2col": padding, "winograd": padding}
    makers = {
        "im2col": lambda pads: lambda: backward(*forward(x, weight, bias, stride, pads, dilation, groups)),
        "winograd": lambda pads: lambda: winograd_conv2d_backward(
            *winograd_conv2d_forward(x, weight, bias, 1, pads, tile=get_winograd_tile())),
        "implicit": lambda pads: lambda: implicit_conv2d_backward(
            *implicit_conv2d_forward(x, weight, bias, stride, pads, dilation, groups)),
    }
    runs = {name: makers[name](pads) for name, pads in algorithms.items()}
    seconds = {}
    for name, run in runs.items():
        run()
        synchronize(backend)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(backend)
        seconds[name] = (time.perf_counter() - start) / repeats
    return seconds


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, ops=None, relu=False,
                   **options):
    """:func:`numres.functional.conv.conv2d_forward` by the algorithm :func:`choose_conv_algorithm` picks.

    ``ops`` is the op namespace of the caller's backend (:func:`numres.functional.ops_for`), so a
    registered kernel (CUDA) computes the im2col path; by default the generic op does.
    ``relu=True`` returns ``max(y, 0)`` (Winograd and implicit GEMM apply it in their output pass).  Under
    ``set_conv_algorithm("auto", benchmark=True)`` the first forward of a new layer shape times
    every algorithm that can compute it first (:func:`measure_conv_algorithms`).
    """
    padding_mode = options.get("padding_mode", "zeros")
    xp = xp_of(x)
    if _setting["algorithm"] == "auto" and _setting["benchmark"]:
        key = _shape_key(x.shape, weight.shape, stride, padding, dilation, groups, xp)
        if key not in _measured:
            candidates = _candidates(x.shape, weight.shape, stride, padding, dilation, groups, xp, padding_mode)
            if len(candidates) > 1:
                seconds = measure_conv_algorithms(x, weight, bias, padding, ops, stride=stride, dilation=dilation,
                                                  groups=groups, algorithms=candidates)
                _measured[key] = min(seconds, key=seconds.get)
                _timings[key] = seconds
    algorithm = choose_conv_algorithm(x.shape, weight.shape, stride, padding, dilation, groups, xp, padding_mode)
    if algorithm == "winograd":
        return winograd_conv2d_forward(x, weight, bias, stride, winograd_padding(padding), dilation, groups,
                                       tile=get_winograd_tile(), relu=relu)
    if algorithm == "implicit":
        return implicit_conv2d_forward(x, weight, bias, stride, padding, dilation, groups, relu=relu)
    forward = im2col_conv.conv2d_forward if ops is None else ops.conv2d_forward
    y, cache = forward(x, weight, bias, stride, padding, dilation, groups, **options)
    if relu:
        xp.maximum(y, 0, out=y)
    return y, cache


def algorithm_of(cache) -> str:
    """``"winograd"``, ``"implicit"`` or ``"im2col"``: the algorithm whose forward made ``cache`` (a Conv2d's
    ``saved_cache()`` after a forward pass, say; a benchmark names each layer's algorithm so)."""
    if isinstance(cache, WinogradCache):
        return "winograd"
    return "implicit" if isinstance(cache, ImplicitCache) else "im2col"


def conv2d_backward(dy, cache, need_input_grad=True, *, ops=None, **options):
    """Gradients ``(dx, dweight, dbias)`` by the algorithm that computed the forward pass."""
    if isinstance(cache, WinogradCache):
        return winograd_conv2d_backward(dy, cache, need_input_grad, **options)
    if isinstance(cache, ImplicitCache):
        return implicit_conv2d_backward(dy, cache, need_input_grad, **options)
    backward = im2col_conv.conv2d_backward if ops is None else ops.conv2d_backward
    return backward(dy, cache, need_input_grad, **options)
