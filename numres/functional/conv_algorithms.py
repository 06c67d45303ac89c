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
scatter-add, but computes the output on a grid with padding columns and lines, ``Hq*Wq`` rows
for ``OH*OW`` wanted (neighbouring lines and images share their padding: 1.04x at 56x56, 1.07x at
28x28, 1.15x at 14x14, 1.31x at 7x7 for a 3x3 "same" layer), and its GEMMs have ``K = C`` instead
of ``9C``.  Measured (AMD EPYC with AVX-512, OpenBLAS SkylakeX kernel, float32, batch 8, medians
of 6 interleaved runs on a machine shared with other jobs), forward / backward relative to im2col:

    3x3 layer        one thread (CPU time)    two threads (wall, four runs at load 2.5-4)
    64 at 56         0.74 / 0.74              0.51-0.67 / 0.51-0.64
    128 at 28        0.80 / 0.84              0.50-0.68 / 0.72-0.78
    256 at 14        1.01 / 1.00              0.59-0.89 / 0.82-0.98
    512 at 7         1.25 / 1.21              0.33-0.73 / 0.99-1.17
    and at N=32, one thread: 16 at 32 0.48 / 0.33, 32 at 16 0.65 / 0.58, 64 at 8 0.79 / 0.76;
    1x1 layers: 1.00 / 0.95-1.10 (the same one GEMM)

So "auto" takes it (:func:`auto_prefers_implicit`) for stride-1 kernels larger than 1x1 with at
least 16 channels in and out per group, where the grid has at most 15% more rows than the
output (a 3x3 "same" layer down to 14x14), or at most 30% more for layers of at most 64 channels
(where im2col's copy weighs most).
Winograd's rule (one BLAS thread) is asked first.  Strided layers (the padded input split into
its stride x stride phases, each a stride-1 problem on a common grid) measured 0.95-1.08 /
0.72-0.91 of im2col's time at 56x56 with 64-128 channels, and 1.1-1.35 at 28x28 and 14x14, 1x1
stride-2 and the 7x7 stem (3 channels); "auto" leaves them to im2col (``set_conv_algorithm(
"implicit")`` and benchmark mode do consider them).  These were measured on a busy machine;
``benchmark=True`` (below) is the way to check a machine, and the benchmark's per-layer rows show
each algorithm's time.

Measuring instead.  ``set_conv_algorithm("auto", benchmark=True)`` times every algorithm that can
compute the layer, forward and backward, the first time each layer shape is seen (as
``torch.backends.cudnn.benchmark`` does) and keeps the fastest for that shape; machines differ
(vector width, cores, BLAS), and this lets each decide.  :func:`measured_choices` returns what it
chose and the times it measured.  The first step of a run then costs extra passes per new shape,
and the choice can differ between runs on a noisy machine.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings

import numpy as np

from ..backend import backend_of, synchronize, xp_of
from ..blas import current_blas_threads
from . import conv as im2col_conv
from .implicit_gemm import ImplicitCache, implicit_available, implicit_conv2d_backward, implicit_conv2d_forward, \
    implicit_pads
from .implicit_gemm import geometry as implicit_geometry
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


def _implicit_usable(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode, explicit=False):
    """The implicit path's zero padding when it can compute this layer here, else None: on NumPy
    with a CBLAS GEMM found (the first time it is missing, one warning says so); on another array
    module (CuPy: cuBLAS's gemm) only when asked for by name (``explicit``), never by "auto" (not
    measured on a GPU yet)."""
    if xp is not np:
        if not explicit or not hasattr(xp, "matmul"):
            return None
        return implicit_pads(x_shape, weight_shape, stride, padding, dilation, groups, padding_mode)
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
        usable = _implicit_usable(x_shape, weight_shape, stride, padding, dilation, groups, xp, padding_mode,
                                  explicit=True)
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
    dilation = im2col_conv.pair(dilation, "dilation", 1)
    out_channels, cg, kh, kw = weight_shape
    if kh * kw == 1 or min(cg, out_channels // groups) < 16:
        return False
    geo = implicit_geometry(x_shape, (kh, kw), (1, 1), pads, dilation)
    extra = geo.grid[0] * geo.grid[1] / (geo.out_hw[0] * geo.out_hw[1])
    return extra <= 1.15 or (extra <= 1.30 and max(x_shape[1], out_channels) <= 64)


def auto_prefers_implicit_backward(weight_shape, groups=1):
    """Whether "auto" lets implicit GEMM also compute the backward of a layer whose forward it computed.

    Measured on a 2-core EPYC (AVX-512, OpenBLAS SkylakeX, ResNet-50/-18 at batch 8, 224x224;
    ``benchmarks/results/cpu.md``), fwd / bwd ms, im2col against implicit: the forward wins everywhere
    it is chosen (64 at 56: 21/12; 128 at 28: 20/12; 256 at 14: 18/15), the backward only at 64
    channels (38 against 30), and loses from 128 up (28 against 34-42 at 28x28; 24 against 35 at
    14x14).  So from 128 channels the backward takes im2col's path, from the same saved input.
    """
    out_channels, cg = weight_shape[0], weight_shape[1]
    return max(cg * groups, out_channels) <= 64


def im2col_backward_cache(cache: ImplicitCache):
    """The im2col cache of the convolution ``cache`` describes (same input and weight), so im2col's
    backward can follow implicit GEMM's forward; None where im2col would need explicit padding."""
    (top, bottom), (left, right) = cache.pads
    if top != bottom or left != right or tuple(cache.stride) != (1, 1):
        return None
    return im2col_conv.ConvCache(cache.x, cache.weight, cache.x_shape, cache.out_hw, tuple(cache.weight.shape[2:]),
                                 (1, 1), (top, left), cache.dilation, cache.groups, cache.has_bias,
                                 forward_algorithm="implicit")


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


def measure_conv_algorithms(x, weight, bias, padding, ops=None, repeats=3, *, stride=1, dilation=1, groups=1,
                            algorithms=None):
    """Median seconds for forward + backward of each algorithm on this input, over ``repeats`` runs
    taken in turn (one of each, then again), after one warm-up run each: a noisy moment on a busy
    machine then hits every algorithm alike.

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
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(max(1, repeats)):
        for name, run in runs.items():
            synchronize(backend)
            start = time.perf_counter()
            run()
            synchronize(backend)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


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
        y, cache = implicit_conv2d_forward(x, weight, bias, stride, padding, dilation, groups, relu=relu)
        if _setting["algorithm"] == "auto" and not auto_prefers_implicit_backward(weight.shape, groups):
            cache = im2col_backward_cache(cache) or cache
        return y, cache
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
    if isinstance(cache, ImplicitCache):
        return "implicit"
    return "implicit fwd, im2col bwd" if getattr(cache, "forward_algorithm", "im2col") == "implicit" else "im2col"


def conv2d_backward(dy, cache, need_input_grad=True, *, ops=None, **options):
    """Gradients ``(dx, dweight, dbias)`` by the algorithm that computed the forward pass."""
    if isinstance(cache, WinogradCache):
        return winograd_conv2d_backward(dy, cache, need_input_grad, **options)
    if isinstance(cache, ImplicitCache):
        return implicit_conv2d_backward(dy, cache, need_input_grad, **options)
    backward = im2col_conv.conv2d_backward if ops is None else ops.conv2d_backward
    return backward(dy, cache, need_input_grad, **options)
