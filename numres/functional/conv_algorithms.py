"""Which algorithm computes a convolution: im2col + GEMM (the reference) or Winograd.

::

    nr.functional.set_conv_algorithm("im2col")     # every convolution: im2col + GEMM
    nr.functional.set_conv_algorithm("winograd")   # 3x3 stride-1 layers: Winograd F(2x2, 3x3)
    nr.functional.set_conv_algorithm("winograd", winograd_tile=4)   # ... or F(4x4, 3x3)
    nr.functional.set_conv_algorithm("auto")       # per layer shape, by the rule below (the default)
    with nr.functional.conv_algorithm("im2col"): ...                 # for one block of code

Winograd computes only 3x3 kernels with stride 1, dilation 1, groups 1 and zero padding of at
most 2; every other convolution takes the im2col path (:mod:`numres.functional.conv`), whatever
the setting.  im2col stays the readable reference: both are tested against PyTorch and against
each other.  The choice is made in forward, and backward follows it (the cache says which).

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

Measuring instead.  ``set_conv_algorithm("auto", benchmark=True)`` times both algorithms,
forward and backward, the first time each layer shape is seen (as ``torch.backends.cudnn.benchmark``
does) and keeps the faster for that shape; machines differ (vector width, cores, BLAS), and
this lets each decide.  The first step of a run then costs two extra passes per new shape, and
the choice can differ between runs on a noisy machine.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ..backend import backend_of, synchronize, xp_of
from ..blas import current_blas_threads
from . import conv as im2col_conv
from .winograd import WinogradCache, transforms_for, winograd_applies, winograd_conv2d_backward, \
    winograd_conv2d_forward

ALGORITHMS = ("im2col", "winograd", "auto")

_setting = {"algorithm": "auto", "winograd_tile": 2, "benchmark": False}
_measured: dict = {}           # layer shape -> the algorithm that measured faster ("auto", benchmark=True)


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
        _setting["winograd_tile"] = int(winograd_tile)
    if benchmark is not None:
        if not isinstance(benchmark, bool):
            raise TypeError(f"benchmark must be True or False, got {benchmark!r}")
        _measured.clear()
        _setting["benchmark"] = benchmark
    _setting["algorithm"] = algorithm


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


def choose_conv_algorithm(x_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, xp=np,
                          padding_mode="zeros") -> str:
    """``"winograd"`` or ``"im2col"``: what the current setting computes this convolution with."""
    setting = get_conv_algorithm()
    if setting == "im2col":
        return "im2col"
    pads = _winograd_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode)
    if pads is None:
        return "im2col"
    if setting == "winograd":
        return "winograd"
    key = _shape_key(x_shape, weight_shape, pads, xp)
    if _setting["benchmark"] and key in _measured:
        return _measured[key]
    out_hw = (x_shape[2] + 2 * pads[0] - 2, x_shape[3] + 2 * pads[1] - 2)
    winograd = xp is np and current_blas_threads() == 1 and \
        auto_prefers_winograd(x_shape[0], weight_shape[1], weight_shape[0], out_hw, get_winograd_tile())
    return "winograd" if winograd else "im2col"


def auto_prefers_winograd(n, in_channels, out_channels, out_hw, tile=2):
    """The measured rule of "auto" (see the module's notes) for a 3x3 stride-1 layer on the CPU."""
    pixels = n * out_hw[0] * out_hw[1]
    covered = (-(-out_hw[0] // tile) * tile) * (-(-out_hw[1] // tile) * tile) / (out_hw[0] * out_hw[1])
    return (min(in_channels, out_channels) >= 16 and pixels >= 512 and covered <= 1.15
            and pixels * in_channels * out_channels >= 1 << 23)


def _shape_key(x_shape, weight_shape, pads, xp):
    return (id(xp), tuple(x_shape), tuple(weight_shape), pads, _setting["winograd_tile"])


def measure_conv_algorithms(x, weight, bias, padding, ops=None, repeats=1):
    """Seconds for forward + backward of each algorithm on this input (after one warm-up run each)."""
    backend = backend_of(x)
    forward = im2col_conv.conv2d_forward if ops is None else ops.conv2d_forward
    backward = im2col_conv.conv2d_backward if ops is None else ops.conv2d_backward
    runs = {
        "im2col": lambda: backward(*forward(x, weight, bias, 1, padding)),
        "winograd": lambda: winograd_conv2d_backward(
            *winograd_conv2d_forward(x, weight, bias, 1, padding, tile=get_winograd_tile())),
    }
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
    ``relu=True`` returns ``max(y, 0)`` (Winograd applies it in its output pass).  Under
    ``set_conv_algorithm("auto", benchmark=True)`` the first forward of a new layer shape times
    both algorithms first (:func:`measure_conv_algorithms`).
    """
    padding_mode = options.get("padding_mode", "zeros")
    xp = xp_of(x)
    if _setting["algorithm"] == "auto" and _setting["benchmark"]:
        pads = _winograd_pads(x.shape, weight.shape, stride, padding, dilation, groups, padding_mode)
        key = None if pads is None else _shape_key(x.shape, weight.shape, pads, xp)
        if key is not None and key not in _measured:
            seconds = measure_conv_algorithms(x, weight, bias, pads, ops)
            _measured[key] = min(seconds, key=seconds.get)
    if choose_conv_algorithm(x.shape, weight.shape, stride, padding, dilation, groups, xp,
                             padding_mode) == "winograd":
        return winograd_conv2d_forward(x, weight, bias, stride, winograd_padding(padding), dilation, groups,
                                       tile=get_winograd_tile(), relu=relu)
    forward = im2col_conv.conv2d_forward if ops is None else ops.conv2d_forward
    y, cache = forward(x, weight, bias, stride, padding, dilation, groups, **options)
    if relu:
        xp.maximum(y, 0, out=y)
    return y, cache


def algorithm_of(cache) -> str:
    """``"winograd"`` or ``"im2col"``: the algorithm whose forward made ``cache`` (a Conv2d's
    ``saved_cache()`` after a forward pass, say; a benchmark names each layer's algorithm so)."""
    return "winograd" if isinstance(cache, WinogradCache) else "im2col"


def conv2d_backward(dy, cache, need_input_grad=True, *, ops=None, **options):
    """Gradients ``(dx, dweight, dbias)`` by the algorithm that computed the forward pass."""
    if isinstance(cache, WinogradCache):
        return winograd_conv2d_backward(dy, cache, need_input_grad, **options)
    backward = im2col_conv.conv2d_backward if ops is None else ops.conv2d_backward
    return backward(dy, cache, need_input_grad, **options)
