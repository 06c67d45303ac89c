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
(im2col or Winograd, :mod:`numres.functional.conv_algorithms`), and, for each 3x3 layer
shape, forward and backward times per algorithm (im2col, Winograd F(2,3) and F(4,3) where
they apply) beside PyTorch's.  Results go to
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
                          "winograd_conv2d_backward": algorithms_module.winograd_conv2d_backward}
    for name, function in winograd_originals.items():     # Winograd layers bypass the registered conv ops
        direction = name.rsplit("_", 1)[1]
        setattr(algorithms_module, name, timed(lambda a, label=conv_label(direction): label(a) + " (winograd)",
                                               function))
    originals = {"im2col": conv_module.im2col, "col2im": conv_module.col2im}
    conv_module.im2col = timed(lambda a: "im2col (inside conv)", originals["im2col"])
    conv_module.col2im = timed(lambda a: "col2im (inside conv)", originals["col2im"])
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
    applies (im2col; Winograd F(2,3) and F(4,3) on stride-1 layers), and of PyTorch's conv2d."""
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
        if applies:
            candidates += [("winograd F(2,3)", "winograd", 2), ("winograd F(4,3)", "winograd", 4)]
        row = {"layer": layer["layer"], "shape": f"{key[0][1]}->{key[1][0]} @{key[0][2]}x{key[0][3]} "
                                                 f"s{key[2][0]} g{conv.groups} N{key[0][0]}",
               "auto": layer["algorithm"], "ms": {}}
        dy = None
        for label, algorithm, tile in candidates:
            with CA.conv_algorithm(algorithm, winograd_tile=tile):
                forward = lambda: CA.conv2d_forward(x, weight, None, stride, padding, conv.dilation,  # noqa: E731
                                                    conv.groups)
                y, cache = forward()
                if dy is None:
                    dy = np.ascontiguousarray(rng.standard_normal(
                        (y.shape[0], y.shape[2], y.shape[3], y.shape[1])).astype(np.float32)).transpose(0, 3, 1, 2)
                CA.conv2d_backward(dy, cache)                        # warm-up
                forward_s, backward_s = [], []
                for _ in range(repeats):
                    start = time.perf_counter()
                    y, cache = forward()
                    forward_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    CA.conv2d_backward(dy, cache)
                    backward_s.append(time.perf_counter() - start)
            row["ms"][label] = {"forward": median_ms(forward_s), "backward": median_ms(backward_s)}
        xt = torch.from_numpy(x).requires_grad_(True)
        wt = torch.from_numpy(np.ascontiguousarray(nr.to_numpy(weight))).requires_grad_(True)
        dyt = torch.from_numpy(np.ascontiguousarray(dy))
        forward_s, backward_s = [], []
        for index in range(repeats + 1):
            start = time.perf_counter()
            yt = torch.nn.functional.conv2d(xt, wt, None, stride, padding, conv.dilation, conv.groups)
            middle = time.perf_counter()
            yt.backward(dyt)
            end = time.perf_counter()
            if index:
                forward_s.append(middle - start)
                backward_s.append(end - middle)
        row["ms"]["PyTorch"] = {"forward": median_ms(forward_s), "backward": median_ms(backward_s)}
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
        lines += ["", f"numres train step reaches {run['numres_train_gflops']:.0f} GFLOP/s "
                      f"({100 * run['numres_train_gflops'] / run['sgemm_peak_gflops']:.0f}% of the sgemm peak); "
                      f"PyTorch {run['torch_train_gflops']:.0f} GFLOP/s.", "",
                  "<details><summary>numres step breakdown (median ms per step)</summary>", "",
                  "Each `conv` row includes the im2col/col2im done inside it, which also have rows of "
                  "their own, so the shares overlap.", "",
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
    model, reference, x, target = build_pair(args)
    numres_jobs = numres_runners(model, x, target)
    torch_jobs = torch_runners(reference, x, target)
    peak = sgemm_peak_gflops()
    width = vector_width()
    print(f"CPU: {cpu_model()} ({width}); BLAS: {blas_info()}  sgemm peak {peak:.0f} GFLOP/s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

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
    copies = parts.get("im2col (inside conv)", 0) + parts.get("col2im (inside conv)", 0)
    breakdown_ms = {k: v * 1000 for k, v in parts.items()}
    breakdown_ms["GEMM and the rest of conv (conv minus im2col/col2im)"] = (conv_total - copies) * 1000
    del stem
    layers = layer_algorithms(model, x)
    algorithm_rows = [] if args.no_layers else time_3x3_algorithms(model, layers, max(1, args.repeats // 2))
    print_layers(layers, algorithm_rows)

    result = {
        "config": vars(args) | {"out": None},
        "machine": {"processor": cpu_model(), "vector_width": width, "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "timestamp": time.strftime("%Y-%m-%d %H:%M"),
        "blas": blas_info(), "torch_version": torch.__version__, "numpy_version": np.__version__,
        "env": {key: os.environ.get(key) for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT",
                                                     "OMP_WAIT_POLICY")},
        "sgemm_peak_gflops": peak,
        "timings": timings,
        "forward_macs": macs,
        "numres_train_gflops": train_flops / (timings["train_step"]["numres_ms"] / 1000) / 1e9,
        "torch_train_gflops": (train_flops + 2 * stem_dx_macs) / (timings["train_step"]["torch_ms"] / 1000) / 1e9,
        "breakdown_ms": breakdown_ms,
        "layers": layers,
        "algorithms_3x3": algorithm_rows,
    }
    limits.restore_original_limits()
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
