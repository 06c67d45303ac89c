"""numres against PyTorch on the CPU: ResNet forward (eval and train mode) and a full SGD train step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/cpu_resnet.py --model resnet50 --batch 8 --size 224

Both frameworks run in this one process, in alternation, on the same number of threads
(BLAS, PyTorch's intra-op pool and numres's own pool are all limited to ``--threads``).
The report gives medians over ``--repeats`` runs and the ratio numres / PyTorch, the
GFLOP/s numres reaches against the sgemm peak measured in the same run, a breakdown
of numres's step by layer kind (each convolution shape, BN, ReLU, pooling,
im2col/col2im, GEMM share), peak memory (each framework in a child process of its
own, so the peaks do not mix), the BLAS kernel in use and the CPU's vector width (AVX2 or
AVX-512, from /proc/cpuinfo), the convolution algorithm numres chose for every layer
(im2col, Winograd or implicit GEMM, :mod:`numres.functional.conv_algorithms`), and, for each 3x3
layer shape, forward and backward times per algorithm (im2col, implicit GEMM, Winograd F(2,3) and
F(4,3) where they apply) beside PyTorch's.

Two floors put numres's train step in proportion:

* **the step's GEMMs alone**: every GEMM the chosen algorithms call in one train step (recorded
  with their shapes: NumPy matmuls, the implicit path's CBLAS calls one per tap, the classifier's),
  replayed back to back on preallocated operands; the step as a multiple of it says how much
  time goes to everything that is not a GEMM;
* **the step's FLOPs at the sgemm peak**: the direct convolutions' and the classifier's FLOPs
  (forward, input and weight gradients) at the large-sgemm rate measured in the same run; the step
  as a multiple of it says how far numres is from what the hardware's BLAS allows.

Import order.  numres's train step is also timed in two child processes, one that imports numres
first and one that imports NumPy first (and runs a GEMM) without OPENBLAS_THREAD_TIMEOUT set; the
two should match (:func:`numres.blas.settle_thread_timeout`).  Results go to
``benchmarks/results/cpu_<model>_b<batch>_s<size>.json``; ``cpu.md`` and ``cpu.png``
there are rebuilt from every such file.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# Before NumPy loads OpenBLAS (numres sets the same default on import; see numres/__init__.py).
USER_THREAD_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps-for-memory", type=int, default=3)
    parser.add_argument("--memory-child", choices=["numres", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="only rebuild cpu.md and cpu.png from the JSON")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-algorithm timings of the 3x3 layers")
    parser.add_argument("--no-import-order", action="store_true",
                        help="skip the two child processes that time numres imported before/after NumPy")
    parser.add_argument("--conv-algorithm", default="auto", choices=["auto", "im2col", "implicit", "winograd"],
                        help="numres's convolution algorithm (set_conv_algorithm)")
    parser.add_argument("--conv-benchmark", action="store_true",
                        help="auto times every algorithm per layer shape (set_conv_algorithm('auto', benchmark=True))")
    return parser.parse_args(argv)


def limit_threads(count):
    import threadpoolctl
    import torch

    import numres
    numres.allocator.retain_freed_memory()

    torch.set_num_threads(count)
    numres.parallel.set_num_threads(count)
    return threadpoolctl.threadpool_limits(limits=count)


def blas_info():
    import threadpoolctl
    return [{key: entry.get(key) for key in ("internal_api", "version", "architecture", "num_threads", "filepath")}
            for entry in threadpoolctl.threadpool_info() if entry.get("user_api") == "blas"]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_width():
    """The widest x86 vector extension the CPU reports ("AVX-512", "AVX2", ...), from /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
            else:
                return "unknown"
    except OSError:
        return "unknown"
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return "SSE2 or older"


def median_ms(samples):
    return statistics.median(samples) * 1000.0


def sgemm_peak_gflops(size=2048, repeats=5):
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    b = a.copy()
    a @ b
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(samples) / 1e9


# --- the two frameworks -------------------------------------------------------------------------

def build_pair(args):
    import torch
    import torch_reference

    import numres as nr

    nr.manual_seed(0)
    model = getattr(nr, args.model)()
    reference = torch_reference.build(args.model)
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(nr.to_numpy(v)))
                               for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    target = rng.integers(0, 1000, args.batch)
    return model, reference, x, target


def numres_runners(model, x, target):
    import numres as nr

    criterion = nr.nn.CrossEntropyLoss()
    optimizer = nr.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def eval_forward():
        model.eval()
        with nr.no_grad():
            model(x)

    def train_forward():
        model.train()
        with nr.no_grad():
            model(x)

    def train_step():
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(x), target)
        model.backward(criterion.backward(), need_input_grad=False)
        optimizer.step()
        return loss

    return {"eval_forward": eval_forward, "train_forward": train_forward, "train_step": train_step}


def torch_runners(model, x, target):
    import torch

    x = torch.from_numpy(x)
    target = torch.from_numpy(target)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def train_forward():
        model.train()
        with torch.no_grad():
            model(x)

    def train_step():
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return {"eval_forward": eval_forward, "train_forward": train_forward, "train_step": train_step}


def time_alternating(numres_jobs, torch_jobs, repeats):
    samples = {(framework, phase): [] for framework in ("numres", "torch") for phase in numres_jobs}
    for phase in numres_jobs:                       # warm up: allocators, BLAS buffers, thread pools
        numres_jobs[phase]()
        torch_jobs[phase]()
    for _ in range(repeats):
        for phase in numres_jobs:
            for framework, jobs in (("numres", numres_jobs), ("torch", torch_jobs)):
                start = time.perf_counter()
                jobs[phase]()
                samples[(framework, phase)].append(time.perf_counter() - start)
    return samples


# --- where numres's time goes ---------------------------------------------------------------------

def forward_macs(model, x):
    """Multiply-accumulates of the convolutions and the classifier in one forward pass."""
    import numres as nr

    macs = []

    def count(module, inputs, output):
        if isinstance(module, nr.nn.Conv2d):
            o, cg, kh, kw = module.weight.shape
            macs.append(output.shape[0] * output.shape[2] * output.shape[3] * o * cg * kh * kw)
        else:
            macs.append(output.shape[0] * module.in_features * module.out_features)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nr.nn.Conv2d, nr.nn.Linear))]
    with nr.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return sum(macs)


def breakdown(model, step, repeats):
    """Median seconds per op kind over ``repeats`` instrumented steps (conv split by shape)."""
    import numres.functional as F
    from numres.functional import conv as conv_module
    from numres.functional.dispatch import register_kernel, unregister_kernel

    totals = collections.defaultdict(list)
    current = collections.Counter()

    def timed(label_of, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            current[label_of(args)] += time.perf_counter() - start
            return result
        return wrapper

    def conv_label(direction):
        def label(args):
            if direction == "forward":
                x, weight = args[0], args[1]
                stride = args[3] if len(args) > 3 else 1
                shape = f"{x.shape[1]}->{weight.shape[0]} k{weight.shape[2]} s{stride if isinstance(stride, int) else stride[0]} @{x.shape[2]}"
            else:
                cache = args[1]
                cache = getattr(cache, "conv_cache", cache)          # a folded pair's cache holds the conv's
                stride = getattr(cache, "stride", (1, 1))[0]          # a Winograd cache: 3x3 stride 1
                shape = (f"{cache.x_shape[1]}->{cache.weight.shape[0]} k{cache.weight.shape[2]} s{stride} "
                         f"@{cache.x_shape[2]}")
            return f"conv {shape} {direction}"
        return label

    kinds = {
        "conv2d_forward": conv_label("forward"), "conv2d_backward": conv_label("backward"),
        "batchnorm_train_forward": lambda a: "batchnorm forward", "batchnorm_backward": lambda a: "batchnorm backward",
        "relu_backward": lambda a: "relu backward", "add_relu_forward": lambda a: "residual add+relu",
        "add": lambda a: "residual gradient add",
        "maxpool2d_forward": lambda a: "maxpool", "maxpool2d_backward": lambda a: "maxpool",
        "adaptive_avgpool2d_forward": lambda a: "avgpool", "adaptive_avgpool2d_backward": lambda a: "avgpool",
        "linear_forward": lambda a: "linear", "linear_backward": lambda a: "linear",
    }
    for name, label in kinds.items():
        register_kernel("numpy", name, timed(label, getattr(F, name)))
    from numres.functional import conv_algorithms as algorithms_module
    winograd_originals = {"winograd_conv2d_forward": algorithms_module.winograd_conv2d_forward,
                          "winograd_conv2d_backward": algorithms_module.winograd_conv2d_backward,
                          "implicit_conv2d_forward": algorithms_module.implicit_conv2d_forward,
                          "implicit_conv2d_backward": algorithms_module.implicit_conv2d_backward}
    for name, function in winograd_originals.items():     # Winograd and implicit layers bypass the registered ops
        direction = name.rsplit("_", 1)[1]
        kind = name.split("_", 1)[0]
        setattr(algorithms_module, name, timed(lambda a, label=conv_label(direction), kind=kind: f"{label(a)} ({kind})",
                                               function))
    originals = {"im2col": conv_module.im2col, "col2im": conv_module.col2im}
    conv_module.im2col = timed(lambda a: "im2col (inside conv)", originals["im2col"])
    conv_module.col2im = timed(lambda a: "col2im (inside conv)", originals["col2im"])
    from numres.functional import implicit_gemm as implicit_module
    grid_copies = {name: getattr(implicit_module, name) for name in ("phase_rows", "crop_rows", "grid_gradient")}
    for name, function in grid_copies.items():             # the implicit path's copies onto and off its grid
        setattr(implicit_module, name, timed(lambda a: "implicit grid copies (inside conv)", function))
    try:
        for _ in range(repeats):
            current.clear()
            start = time.perf_counter()
            step()
            current["total step"] = time.perf_counter() - start
            for key, value in current.items():
                totals[key].append(value)
    finally:
        for name in kinds:
            unregister_kernel("numpy", name)
        conv_module.im2col, conv_module.col2im = originals["im2col"], originals["col2im"]
        for name, function in grid_copies.items():
            setattr(implicit_module, name, function)
        for name, function in winograd_originals.items():
            setattr(algorithms_module, name, function)
    return {key: statistics.median(values) for key, values in totals.items()}


# --- which convolution algorithm each layer takes, and each algorithm's time on the 3x3 layers ---------

def _cache_algorithm(cache):
    from numres.functional.conv_algorithms import algorithm_of
    from numres.functional.fused import FoldedConvCache
    return cache.algorithm if isinstance(cache, FoldedConvCache) else algorithm_of(cache)


def layer_algorithms(model, x):
    """``[{layer, input, weight, stride, algorithm}]`` for every Conv2d, from the caches of one
    training-mode forward (what the train step runs; the caches are dropped afterwards)."""
    import numres as nr

    shapes = {}
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nr.nn.Conv2d)]
    handles = [m.register_forward_hook(lambda mod, inputs, out, name=name: shapes.__setitem__(name, inputs[0].shape))
               for name, m in convs]
    model.train()
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, conv in convs:
        layers.append({"layer": name, "input": list(shapes[name]), "weight": list(conv.weight.shape),
                       "stride": list(conv.stride), "padding": list(conv._plain_padding() or conv.padding),
                       "algorithm": _cache_algorithm(conv.saved_cache())})
    for module in model.modules():
        module._free_cache()
    return layers


def time_3x3_algorithms(model, layers, repeats):
    """For each distinct 3x3 layer shape: median forward and backward ms of every algorithm that
    applies (im2col; implicit GEMM, Winograd F(2,3) and F(4,3) on stride-1 layers), and of PyTorch's
    conv2d.  The algorithms run interleaved, repeat by repeat, so a noisy moment hits them alike."""
    import torch

    import numres as nr
    from numres.functional import conv_algorithms as CA

    convs = dict(model.named_modules())
    rows, seen = [], set()
    rng = np.random.default_rng(0)
    for layer in layers:
        conv = convs[layer["layer"]]
        if tuple(layer["weight"][2:]) != (3, 3):
            continue
        key = (tuple(layer["input"]), tuple(layer["weight"]), tuple(layer["stride"]), conv.groups)
        if key in seen:
            continue
        seen.add(key)
        x = np.ascontiguousarray(rng.standard_normal(
            (key[0][0], key[0][2], key[0][3], key[0][1])).astype(np.float32)).transpose(0, 3, 1, 2)
        weight, stride, padding = conv.weight.data, conv.stride, conv._plain_padding()
        applies = CA.winograd_padding(padding) is not None and CA.winograd_applies(
            x.shape, weight.shape, stride, padding, conv.dilation, conv.groups)
        candidates = [("im2col", "im2col", None)]
        if CA.implicit_available() and CA.implicit_pads(x.shape, weight.shape, stride, padding, conv.dilation,
                                                        conv.groups) is not None:
            candidates.append(("implicit", "implicit", None))
        if applies:
            candidates += [("winograd F(2,3)", "winograd", 2), ("winograd F(4,3)", "winograd", 4)]
        row = {"layer": layer["layer"], "shape": f"{key[0][1]}->{key[1][0]} @{key[0][2]}x{key[0][3]} "
                                                 f"s{key[2][0]} g{conv.groups} N{key[0][0]}",
               "auto": layer["algorithm"], "ms": {}}
        dy, runs = None, {}
        for label, algorithm, tile in candidates:
            def forward(algorithm=algorithm, tile=tile):
                with CA.conv_algorithm(algorithm, winograd_tile=tile):
                    return CA.conv2d_forward(x, weight, None, stride, padding, conv.dilation, conv.groups)
            y, cache = forward()
            if dy is None:
                dy = np.ascontiguousarray(rng.standard_normal(
                    (y.shape[0], y.shape[2], y.shape[3], y.shape[1])).astype(np.float32)).transpose(0, 3, 1, 2)
            CA.conv2d_backward(dy, cache)                            # warm-up
            runs[label] = forward
        xt = torch.from_numpy(x).requires_grad_(True)
        wt = torch.from_numpy(np.ascontiguousarray(nr.to_numpy(weight))).requires_grad_(True)
        dyt = torch.from_numpy(np.ascontiguousarray(dy))

        def torch_backward(yt):
            xt.grad = wt.grad = None
            yt.backward(dyt)

        steps = {label: (forward, lambda result: CA.conv2d_backward(dy, result[1])) for label, forward in runs.items()}
        steps["PyTorch"] = (lambda: torch.nn.functional.conv2d(xt, wt, None, stride, padding, conv.dilation,
                                                               conv.groups), torch_backward)
        torch_backward(steps["PyTorch"][0]())                        # warm-up
        times = {label: ([], []) for label in steps}
        for _ in range(repeats):                                     # interleaved: noise hits every algorithm alike
            for label, (forward, backward) in steps.items():
                start = time.perf_counter()
                result = forward()
                middle = time.perf_counter()
                backward(result)
                times[label][0].append(middle - start)
                times[label][1].append(time.perf_counter() - middle)
        for label, (forward_s, backward_s) in times.items():
            row["ms"][label] = {"forward": median_ms(forward_s), "backward": median_ms(backward_s)}
        rows.append(row)
    return rows


def print_layers(layers, algorithm_rows):
    print("convolution algorithm per layer (train step):")
    for layer in layers:
        print(f"  {layer['layer']:28s} {layer['input'][1]:>4}->{layer['weight'][0]:<4} k{layer['weight'][2]} "
              f"s{layer['stride'][0]} @{layer['input'][2]:<4} {layer['algorithm']}")
    if algorithm_rows:
        print("3x3 layers, forward / backward ms per algorithm:")
        for row in algorithm_rows:
            times = "   ".join(f"{label} {t['forward']:.1f}/{t['backward']:.1f}" for label, t in row["ms"].items())
            print(f"  {row['shape']:32s} (numres: {row['auto']})  {times}")


# --- floors: the step's GEMMs alone, and its FLOPs at the sgemm peak -----------------------------------

def _transposed(array):
    """True when ``array``'s last two axes are a transposed C-contiguous matrix (BLAS reads it as 'T')."""
    return array.ndim >= 2 and not array.flags.c_contiguous and array.swapaxes(-1, -2).flags.c_contiguous


def record_gemms(step):
    """Every GEMM one call of ``step`` makes, in order: ``("matmul", a_shape, a_T, b_shape, b_T, dtype)`` for
    NumPy matmuls (im2col, Winograd, the classifier) and ``("cblas", trans_a, trans_b, m, n, k, beta, dtype)``
    for the implicit path's CBLAS calls (recorded one per tap: its row split over threads is switched off)."""
    import numres.functional as F
    from numres.functional import implicit_gemm as IG
    from numres.functional.dispatch import register_kernel, unregister_kernel

    records = []
    real_matmul, real_gemm, real_workers = np.matmul, IG._gemm, IG.gemm_workers

    def matmul(a, b, *args, **kwargs):
        records.append(("matmul", a.shape, _transposed(a), b.shape, _transposed(b), a.dtype.name))
        return real_matmul(a, b, *args, **kwargs)

    def gemm_for(dtype):
        function = real_gemm(dtype)

        def recorded(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            records.append(("cblas", trans_a, trans_b, m, n, k, beta, np.dtype(dtype).name))
            return function(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return recorded

    def linear_forward(x, weight, bias=None):             # x @ weight.T: the `@` operator bypasses np.matmul
        records.append(("matmul", x.shape, False, weight.shape[::-1], True, x.dtype.name))
        return F.linear_forward(x, weight, bias)

    def linear_backward(dy, cache, need_input_grad=True, **kwargs):
        x, weight, _ = cache
        if kwargs.get("need_weight_grad", True):
            records.append(("matmul", dy.shape[::-1], True, x.shape, False, dy.dtype.name))
        if need_input_grad:
            records.append(("matmul", dy.shape, False, weight.shape, False, dy.dtype.name))
        return F.linear_backward(dy, cache, need_input_grad, **kwargs)

    np.matmul, IG._gemm, IG.gemm_workers = matmul, gemm_for, (lambda: 0)
    register_kernel("numpy", "linear_forward", linear_forward)
    register_kernel("numpy", "linear_backward", linear_backward)
    try:
        step()
    finally:
        np.matmul, IG._gemm, IG.gemm_workers = real_matmul, real_gemm, real_workers
        unregister_kernel("numpy", "linear_forward")
        unregister_kernel("numpy", "linear_backward")
    return records


def gemm_replay(records):
    """A function that runs every recorded GEMM once on preallocated operands (views of three scratch
    buffers per dtype, laid out as recorded), and the GEMMs' FLOPs."""
    from numres.blas import cblas_gemm

    def operand(flat, shape, transposed):
        if transposed:
            shape = tuple(shape[:-2]) + (shape[-1], shape[-2])
        view = flat[:int(np.prod(shape))].reshape(shape)
        return view.swapaxes(-1, -2) if transposed else view

    shapes, flops = [], 0
    for record in records:
        if record[0] == "matmul":
            _, a_shape, a_t, b_shape, b_t, dtype = record
            out_shape = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
            sizes = (int(np.prod(a_shape)), int(np.prod(b_shape)), int(np.prod(out_shape)))
            flops += 2 * int(np.prod(out_shape)) * a_shape[-1]
        else:
            _, trans_a, trans_b, m, n, k, beta, dtype = record
            sizes = (m * k, k * n, m * n)
            flops += 2 * m * n * k
        shapes.append((record, dtype, sizes))
    scratch = {}
    for _, dtype, sizes in shapes:
        have = scratch.get(dtype, (0, 0, 0))
        scratch[dtype] = tuple(max(h, s) for h, s in zip(have, sizes))
    buffers = {dtype: tuple(np.full(size, 0.5, dtype=dtype) for size in sizes) for dtype, sizes in scratch.items()}
    gemm = cblas_gemm()
    calls = []
    for record, dtype, _ in shapes:
        flat_a, flat_b, flat_c = buffers[dtype]
        if record[0] == "matmul":
            _, a_shape, a_t, b_shape, b_t, _ = record
            a, b = operand(flat_a, a_shape, a_t), operand(flat_b, b_shape, b_t)
            out_shape = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
            out = operand(flat_c, out_shape, False)
            calls.append(lambda a=a, b=b, out=out: np.matmul(a, b, out=out))
        else:
            _, trans_a, trans_b, m, n, k, beta, _ = record
            function = gemm.function(dtype)
            lda, ldb = (m if trans_a == 112 else k), (k if trans_b == 112 else n)
            pointers = (flat_a.ctypes.data, flat_b.ctypes.data, flat_c.ctypes.data)
            calls.append(lambda f=function, r=record, p=pointers, lda=lda, ldb=ldb: f(
                101, r[1], r[2], r[3], r[4], r[5], 1.0, p[0], lda, p[1], ldb, r[6], p[2], r[4]))

    def replay():
        for call in calls:
            call()
    return replay, flops


def floor_rows(step, step_ms, train_flops, peak_gflops, repeats):
    """The two floors (see the module's notes) and the step as a multiple of each."""
    records = record_gemms(step)
    replay, gemm_flops = gemm_replay(records)
    replay()                                                   # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        replay()
        samples.append(time.perf_counter() - start)
    gemm_ms = median_ms(samples)
    peak_ms = train_flops / (peak_gflops * 1e9) * 1000
    counts = collections.Counter(record[0] for record in records)
    return {"gemms_alone_ms": gemm_ms, "gemm_calls": dict(counts), "gemm_gflop": gemm_flops / 1e9,
            "gemms_alone_gflops": gemm_flops / (gemm_ms / 1000) / 1e9,
            "step_over_gemms_alone": step_ms / gemm_ms,
            "flops_at_peak_ms": peak_ms, "step_over_flops_at_peak": step_ms / peak_ms}


# --- the same train step, numres imported before and after NumPy -----------------------------------------

IMPORT_ORDER_CHILD = """
import json, os, sys, time
if {numpy_first}:
    import numpy
    numpy.ones((256, 256), numpy.float32) @ numpy.ones((256, 256), numpy.float32)    # OpenBLAS loaded and started
import numres
sys.path[:0] = {paths!r}
import cpu_resnet
print(json.dumps(cpu_resnet.import_order_child({model!r}, {batch}, {size}, {threads}, {repeats}, {algorithm!r})))
"""


def import_order_child(model_name, batch, size, threads, repeats, algorithm="auto"):
    """Run in a child process: median ms of numres's train step alone (no PyTorch imported)."""
    import ctypes

    import threadpoolctl

    import numres as nr
    from numres import blas
    nr.allocator.retain_freed_memory()
    threadpoolctl.threadpool_limits(limits=threads)
    nr.parallel.set_num_threads(threads)
    nr.functional.set_conv_algorithm(algorithm)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    target = rng.integers(0, 1000, batch)
    step = numres_runners(getattr(nr, model_name)(), x, target)["train_step"]
    step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    timeout = None
    if blas._loaded_openblas():
        library = ctypes.CDLL(blas._loaded_openblas()[0])
        if hasattr(library, "openblas_thread_timeout"):
            library.openblas_thread_timeout.restype = ctypes.c_uint
            timeout = int(library.openblas_thread_timeout())
    return {"train_step_ms": median_ms(samples), "samples_ms": [s * 1000 for s in samples],
            "openblas_thread_timeout": timeout}


def measure_import_orders(args):
    """``{"numres first": ..., "numpy first": ...}``: the train step timed in one child process each."""
    env = dict(os.environ)
    if USER_THREAD_TIMEOUT is None:
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)          # as a user's shell would have it
    results = {}
    for label, numpy_first in (("numres first", False), ("numpy first", True)):
        code = IMPORT_ORDER_CHILD.format(numpy_first=numpy_first, paths=[ROOT, HERE, os.path.join(ROOT, "tests")],
                                         model=args.model, batch=args.batch, size=args.size, threads=args.threads,
                                         repeats=args.repeats, algorithm=args.conv_algorithm)
        output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                                cwd=ROOT).stdout
        results[label] = json.loads(output.strip().splitlines()[-1])
    return results


# --- peak memory, each framework alone in a child process ---------------------------------------------

def memory_child(args):
    """Run in a child process: peak RSS of ``--steps-for-memory`` train steps of one framework alone
    (the numres child never imports PyTorch)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    target = rng.integers(0, 1000, args.batch)
    if args.memory_child == "numres":
        import threadpoolctl

        import numres as nr
        nr.allocator.retain_freed_memory()
        threadpoolctl.threadpool_limits(limits=args.threads)
        nr.parallel.set_num_threads(args.threads)
        step = numres_runners(getattr(nr, args.model)(), x, target)["train_step"]
    else:
        import torch
        import torch_reference

        import numres as nr
        nr.allocator.retain_freed_memory()
        torch.set_num_threads(args.threads)
        step = torch_runners(torch_reference.build(args.model), x, target)["train_step"]
    baseline = current_rss_mb()
    for _ in range(args.steps_for_memory):
        step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": baseline}))


def peak_rss_mb():
    """This process's resident-set high-water mark (VmHWM; ru_maxrss would include the parent's
    peak, which Linux carries across fork and exec)."""
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_memory(args):
    results = {}
    for framework in ("numres", "torch"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", framework, "--model", args.model,
                   "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
                   "--steps-for-memory", str(args.steps_for_memory)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[framework] = json.loads(output.strip().splitlines()[-1])
    return results


# --- reporting --------------------------------------------------------------------------------------------

def write_reports(directory):
    """Rebuild cpu.md (a table per configuration) and cpu.png from every cpu_*.json in ``directory``."""
    runs = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(directory, "cpu_*.json")))]
    if not runs:
        return
    lines = ["# numres vs PyTorch on the CPU", "",
             "Generated by `benchmarks/cpu_resnet.py`; medians, numres / PyTorch ratios (below 1 means numres is faster).",
             ""]
    for run in runs:
        config = run["config"]
        lines += [f"## {config['model']}, batch {config['batch']}, {config['size']}x{config['size']}, float32, "
                  f"{config['threads']} threads",
                  "",
                  f"Machine: {run['machine']['processor']} ({run['machine'].get('vector_width', 'vector width not recorded')}), "
                  f"BLAS: " +
                  ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})" for b in run["blas"]) +
                  f", sgemm peak {run['sgemm_peak_gflops']:.0f} GFLOP/s, torch {run['torch_version']}, "
                  f"{run['timestamp']}",
                  "Environment: " + ", ".join(f"{k}={v}" if v is not None else f"{k} unset"
                                              for k, v in run.get("env", {}).items()), "",
                  "| phase | numres ms | PyTorch ms | ratio |", "|---|---|---|---|"]
        for phase, row in run["timings"].items():
            lines.append(f"| {phase.replace('_', ' ')} | {row['numres_ms']:.0f} | {row['torch_ms']:.0f} | "
                         f"{row['ratio']:.2f} |")
        if run.get("memory"):
            mem = run["memory"]
            lines.append(f"| peak RSS (MB), train step | {mem['numres']['peak_rss_mb']:.0f} | "
                         f"{mem['torch']['peak_rss_mb']:.0f} | {mem['ratio']:.2f} |")
        if run.get("floors"):
            floors = run["floors"]
            lines += [f"| floor: the step's GEMMs alone ({sum(floors['gemm_calls'].values())} calls, "
                      f"{floors['gemm_gflop']:.1f} GFLOP at {floors['gemms_alone_gflops']:.0f} GFLOP/s) | "
                      f"{floors['gemms_alone_ms']:.0f} | | step = {floors['step_over_gemms_alone']:.2f}x |",
                      f"| floor: the step's FLOPs at the sgemm peak | {floors['flops_at_peak_ms']:.0f} | | "
                      f"step = {floors['step_over_flops_at_peak']:.2f}x |"]
        if run.get("import_order"):
            for label, row in run["import_order"].items():
                lines.append(f"| train step, child process, {label} (OpenBLAS timeout "
                             f"{row.get('openblas_thread_timeout')}) | {row['train_step_ms']:.0f} | | |")
        lines += ["", f"numres train step reaches {run['numres_train_gflops']:.0f} GFLOP/s "
                      f"({100 * run['numres_train_gflops'] / run['sgemm_peak_gflops']:.0f}% of the sgemm peak); "
                      f"PyTorch {run['torch_train_gflops']:.0f} GFLOP/s.", "",
                  "<details><summary>numres step breakdown (median ms per step)</summary>", "",
                  "Each `conv` row includes the im2col/col2im (or implicit GEMM's grid copies) done inside it, "
                  "which also have rows of their own, so the shares overlap.", "",
                  "| part | ms | share |", "|---|---|---|"]
        total = run["breakdown_ms"]["total step"]
        for key, value in sorted(run["breakdown_ms"].items(), key=lambda item: -item[1]):
            if key != "total step":
                lines.append(f"| {key} | {value:.1f} | {100 * value / total:.1f}% |")
        lines += [f"| total step | {total:.1f} | 100% |", "", "</details>", ""]
        if run.get("layers"):
            lines += ["<details><summary>convolution algorithm per layer</summary>", "",
                      "| layer | in -> out | kernel | stride | input side | algorithm |", "|---|---|---|---|---|---|"]
            for layer in run["layers"]:
                lines.append(f"| {layer['layer']} | {layer['input'][1]} -> {layer['weight'][0]} | "
                             f"{layer['weight'][2]}x{layer['weight'][3]} | {layer['stride'][0]} | {layer['input'][2]} | "
                             f"{layer['algorithm']} |")
            lines += ["", "</details>", ""]
        if run.get("algorithms_3x3"):
            labels = []
            for row in run["algorithms_3x3"]:
                labels += [label for label in row["ms"] if label not in labels]
            lines += ["3x3 layers, forward / backward median ms per algorithm (numres: the algorithm its train step used):", "",
                      "| layer shape | numres | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
            for row in run["algorithms_3x3"]:
                cells = [f"{row['ms'][label]['forward']:.1f} / {row['ms'][label]['backward']:.1f}"
                         if label in row["ms"] else "-" for label in labels]
                lines.append(f"| {row['shape']} | {row['auto']} | " + " | ".join(cells) + " |")
            lines.append("")
    with open(os.path.join(directory, "cpu.md"), "w") as stream:
        stream.write("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(max(6, 2.2 * len(runs) * 1.5), 4))
    labels, numres_ms, torch_ms = [], [], []
    for run in runs:
        config = run["config"]
        for phase, row in run["timings"].items():
            labels.append(f"{config['model']} b{config['batch']} {config['size']}\n{phase.replace('_', ' ')}")
            numres_ms.append(row["numres_ms"])
            torch_ms.append(row["torch_ms"])
    positions = np.arange(len(labels))
    axis.bar(positions - 0.2, numres_ms, 0.4, label="numres (NumPy)")
    axis.bar(positions + 0.2, torch_ms, 0.4, label="PyTorch CPU")
    axis.set_xticks(positions, labels, fontsize=6)
    axis.set_ylabel("median ms")
    axis.set_title("numres vs PyTorch, CPU, float32")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(directory, "cpu.png"), dpi=120)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.report_only:
        write_reports(args.out)
        return 0
    import torch

    limits = limit_threads(args.threads)
    import numres as nr
    nr.functional.set_conv_algorithm(args.conv_algorithm, benchmark=args.conv_benchmark)
    model, reference, x, target = build_pair(args)
    numres_jobs = numres_runners(model, x, target)
    torch_jobs = torch_runners(reference, x, target)
    peak = sgemm_peak_gflops()
    width = vector_width()
    print(f"CPU: {cpu_model()} ({width}); BLAS: {blas_info()}  sgemm peak {peak:.0f} GFLOP/s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    from numres.cpu_info import slow_blas_warning
    slow_blas = slow_blas_warning()
    if slow_blas:
        print(slow_blas, flush=True)
    settings = nr.config.show()                    # every numres setting in force, recorded with the numbers

    samples = time_alternating(numres_jobs, torch_jobs, args.repeats)
    timings = {}
    for phase in numres_jobs:
        ours, theirs = median_ms(samples[("numres", phase)]), median_ms(samples[("torch", phase)])
        timings[phase] = {"numres_ms": ours, "torch_ms": theirs, "ratio": ours / theirs,
                          "numres_samples_ms": [s * 1000 for s in samples[("numres", phase)]],
                          "torch_samples_ms": [s * 1000 for s in samples[("torch", phase)]]}
        print(f"{phase:14s} numres {ours:8.1f} ms   torch {theirs:8.1f} ms   ratio {ours / theirs:.2f}", flush=True)

    macs = forward_macs(model, x)
    stem = model.conv1
    stem_dx_macs = args.batch * (args.size // 2) ** 2 * 64 * 3 * 49      # skipped: nobody needs dL/dimage
    train_flops = 2 * (3 * macs - stem_dx_macs)
    parts = breakdown(model, numres_jobs["train_step"], max(1, args.repeats // 2))
    conv_total = sum(v for k, v in parts.items() if k.startswith("conv "))
    copies = parts.get("im2col (inside conv)", 0) + parts.get("col2im (inside conv)", 0) + \
        parts.get("implicit grid copies (inside conv)", 0)
    breakdown_ms = {k: v * 1000 for k, v in parts.items()}
    breakdown_ms["GEMM and the rest of conv (conv minus im2col/col2im/grid copies)"] = (conv_total - copies) * 1000
    del stem
    floors = floor_rows(numres_jobs["train_step"], timings["train_step"]["numres_ms"], train_flops, peak,
                        args.repeats)
    print(f"floors: the step's GEMMs alone {floors['gemms_alone_ms']:.1f} ms ({floors['gemm_calls']}, "
          f"{floors['gemms_alone_gflops']:.0f} GFLOP/s) -> step {floors['step_over_gemms_alone']:.2f}x; "
          f"its FLOPs at the sgemm peak {floors['flops_at_peak_ms']:.1f} ms -> step "
          f"{floors['step_over_flops_at_peak']:.2f}x", flush=True)
    layers = layer_algorithms(model, x)
    algorithm_rows = [] if args.no_layers else time_3x3_algorithms(model, layers, max(1, args.repeats // 2))
    print_layers(layers, algorithm_rows)
    from numres.functional.conv_algorithms import measured_choices

    result = {
        "config": vars(args) | {"out": None},
        "machine": {"processor": cpu_model(), "vector_width": width, "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "timestamp": time.strftime("%Y-%m-%d %H:%M"),
        "blas": blas_info(), "torch_version": torch.__version__, "numpy_version": np.__version__,
        "env": {key: os.environ.get(key) for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT",
                                                     "OMP_WAIT_POLICY")},
        "sgemm_peak_gflops": peak,
        "numres_settings": settings,
        "slow_blas_warning": slow_blas,
        "timings": timings,
        "forward_macs": macs,
        "numres_train_gflops": train_flops / (timings["train_step"]["numres_ms"] / 1000) / 1e9,
        "torch_train_gflops": (train_flops + 2 * stem_dx_macs) / (timings["train_step"]["torch_ms"] / 1000) / 1e9,
        "breakdown_ms": breakdown_ms,
        "layers": layers,
        "algorithms_3x3": algorithm_rows,
        "floors": floors,
        "conv_setting": {"algorithm": args.conv_algorithm, "benchmark": args.conv_benchmark,
                         "measured_choices": measured_choices()},
    }
    limits.restore_original_limits()
    if not args.no_import_order:
        result["import_order"] = measure_import_orders(args)
        for label, row in result["import_order"].items():
            print(f"train step in a child process, {label}: {row['train_step_ms']:.1f} ms "
                  f"(OpenBLAS thread timeout {row['openblas_thread_timeout']})", flush=True)
    if not args.no_memory:
        memory = measure_memory(args)
        memory["ratio"] = memory["numres"]["peak_rss_mb"] / memory["torch"]["peak_rss_mb"]
        result["memory"] = memory
        print(f"peak RSS: numres {memory['numres']['peak_rss_mb']:.0f} MB, torch {memory['torch']['peak_rss_mb']:.0f} MB, "
              f"ratio {memory['ratio']:.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cpu_{args.model}_b{args.batch}_s{args.size}.json")
    with open(path, "w") as stream:
        json.dump(result, stream, indent=1)
    write_reports(args.out)
    print(f"numres train step: {result['numres_train_gflops']:.0f} GFLOP/s of {peak:.0f} peak; wrote {path}")
    for key, value in sorted(breakdown_ms.items(), key=lambda item: -item[1])[:14]:
        print(f"  {key:60s} {value:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
