"""numres on CuPy against PyTorch CUDA (eager, cuDNN) for ResNet-50 training and inference.

    python3 benchmarks/gpu_resnet50.py --quick --time-budget 180      # what scripts/gpu_check.sh runs
    python3 benchmarks/gpu_resnet50.py --batch-sizes 64 --precisions fp32 --modes train --iters 20

Settings, most important first: for each precision (``fp32``: full float32 everywhere, then
``tf32``: TF32 tensor cores allowed in float32 GEMMs and convolutions, on both sides), each batch
size (default 64, then 256) and each mode (``train``: forward, cross-entropy, backward, SGD step
with momentum and weight decay; ``inference``: eval-mode forward, nothing kept for backward), it
times numres (CuPy backend, its CUDA kernels, channels-last activations) and PyTorch in eager mode
with cuDNN (``cudnn.benchmark`` on), once with NCHW and once with channels_last memory; all at
224x224 in float32, in this process, on the same GPU.

Reported per setting: milliseconds per step (median of ``--iters`` timed steps after ``--warmup``
untimed ones, each timed with CUDA events), images/s, the time ratio numres / PyTorch for each
layout and against the faster one (targets: train <= 1.25, inference <= 1.0), the seconds the first
step took (kernel compilation, cuDNN autotuning), and peak GPU memory from the model's creation to
the end of the warm-up: numres's high-water mark of bytes in use (a CuPy memory hook) against
``torch.cuda.max_memory_allocated`` (target: numres <= 1.3x).

**Time budget.**  ``--time-budget SECONDS`` bounds the whole run, compile time included: a
measurement starts only if the estimate of its cost (from the ones before it) fits in what is
left, a timed loop stops early at the deadline (at least one timed step), and what did not fit is
listed under ``skipped`` in the JSON.  An interrupt (SIGINT, as ``timeout --signal=INT`` sends)
still writes the JSON with what was measured.  ``--quick`` is 1 warm-up and 3 timed steps.

The JSON names the card, driver, CUDA runtime, CuPy, NumPy, torch and cuDNN versions; by default
it goes to ``benchmarks/results/gpu/<card>/benchmark_<UTC time>.json`` (``--json`` overrides).
Without an NVIDIA GPU, CuPy or a CUDA build of PyTorch it stops and says which is missing.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "gpu")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

FRAMEWORKS = ("numres", "torch_nchw", "torch_channels_last")
TARGETS = {"train": 1.25, "inference": 1.0, "memory": 1.3}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32"])
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--json", default=None, help="where to write the results (default: see above)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 1, 3
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be at least 1 and --warmup at least 0")
    return args


def require_gpu():
    """CuPy, a visible GPU and a CUDA build of PyTorch, or a clear exit."""
    problems = []
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            problems.append("CuPy sees no CUDA device")
    except Exception as exc:        # noqa: BLE001 - ImportError, or a CUDA driver error
        problems.append(f"CuPy is not usable ({type(exc).__name__}: {exc})")
    try:
        import torch
        if not torch.cuda.is_available():
            problems.append(f"PyTorch {torch.__version__} has no CUDA device (a CPU-only build, or no GPU)")
    except ImportError as exc:
        problems.append(f"PyTorch is not installed ({exc})")
    if problems:
        sys.exit("gpu_resnet50.py needs an NVIDIA GPU with CuPy and a CUDA build of PyTorch: " + "; ".join(problems)
                 + ".  scripts/gpu_probe.py says exactly what is missing.")


def card_info():
    import cupy
    import numpy
    import torch
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"name": name, "compute_capability": cupy.cuda.Device().compute_capability,
            "memory_bytes": int(props["totalGlobalMem"]), "multiprocessors": int(props["multiProcessorCount"]),
            "driver_cuda_version": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__, "numpy": numpy.__version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version()}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown_gpu"


def set_precision(precision):
    """TF32 on or off on both sides: torch's matmul and cuDNN flags, numres's cuBLAS math mode."""
    import torch

    import numres.cuda
    enabled = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    numres.cuda.set_tf32(enabled)


class Deadline:
    """The end of the time budget (None: no budget)."""

    def __init__(self, seconds):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def peak_hook():
    """A CuPy memory hook tracking the high-water mark of pool bytes handed out while it is active
    (relative to when it was entered: frees of older arrays count down)."""
    import cupy

    class PeakBytes(cupy.cuda.MemoryHook):
        name = "numres-benchmark-peak-bytes"

        def __init__(self):
            super().__init__()
            self.in_use = self.peak = 0

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("mem_ptr"):
                self.in_use += kwargs["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            self.in_use -= kwargs["mem_size"]

    return PeakBytes()


def measure(run, args, deadline, synchronize, after_warmup=None):
    """First step (compiles), warm-up, then timed steps with CUDA events; stops timing at the deadline
    (after at least one timed step).  ``after_warmup()`` is called between the warm-up and the timing."""
    import cupy
    began = time.monotonic()
    run()
    synchronize()
    first = time.monotonic() - began
    for _ in range(args.warmup):
        if deadline.left() < 2 * first:
            break
        run()
    synchronize()
    if after_warmup is not None:
        after_warmup()
    samples = []
    for _ in range(args.iters):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end))
        if deadline.left() < 2 * samples[-1] / 1000.0:
            break
    return {"ms_per_step": statistics.median(samples), "timed_steps": len(samples), "first_step_s": first,
            "seconds": time.monotonic() - began}


def bench_numres(mode, batch, args, deadline):
    import cupy
    import numpy as np

    import numres as nr

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    hook = peak_hook()
    hook.__enter__()                        # from before the model exists, as torch's peak counts its weights
    hook_on = [True]

    def stop_hook():
        if hook_on[0]:
            hook.__exit__(None, None, None)
            hook_on[0] = False

    try:
        nr.manual_seed(0)
        model = nr.resnet50(backend="cupy", dtype="float32")
        rng = np.random.default_rng(0)
        x = nr.backend.convert(np.ascontiguousarray(rng.standard_normal(
            (batch, args.size, args.size, 3), dtype=np.float32)).transpose(0, 3, 1, 2), "cupy")
        target = cupy.asarray(rng.integers(0, 1000, batch))
        if mode == "inference":
            model.eval()

            def run():
                with nr.no_grad():
                    model(x)
        else:
            crit = nr.nn.CrossEntropyLoss(backend="cupy", dtype="float32")
            opt = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

            def run():
                opt.zero_grad()
                crit(model(x), target)
                model.backward(crit.backward())
                opt.step()
        result = measure(run, args, deadline, cupy.cuda.Device().synchronize, after_warmup=stop_hook)
    finally:
        stop_hook()
    result["peak_bytes"] = hook.peak
    result["pool_total_bytes"] = pool.total_bytes()
    return result


def bench_torch(mode, batch, layout, args, deadline):
    import cupy
    import numpy as np
    import torch

    import torch_reference

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.backends.cudnn.benchmark = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = torch_reference.build("resnet50").to("cuda", torch.float32).to(memory_format=memory_format)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32),
                     device="cuda").contiguous(memory_format=memory_format)
    target = torch.tensor(rng.integers(0, 1000, batch), device="cuda")
    if mode == "inference":
        model.eval()

        def run():
            with torch.inference_mode():
                model(x)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    result = measure(run, args, deadline, torch.cuda.synchronize)
    result["peak_bytes"] = torch.cuda.max_memory_allocated()
    result["reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


def plan(args):
    """``(batch, precision, mode)`` in the order they run, most important first: every fp32 setting
    (the issue's targets compare like with like) before any TF32 one, the smaller batch first."""
    return [(batch, precision, mode) for precision in args.precisions for batch in args.batch_sizes
            for mode in args.modes]


def estimate(costs, framework, batch, mode):
    """Seconds a measurement is expected to take, from those already made (scaled by batch size)."""
    known = [(b, seconds) for (f, b, m), seconds in costs.items() if f == framework and m == mode]
    if not known:
        known = [(b, seconds) for (f, b, m), seconds in costs.items() if f == framework]
    if not known:
        return 20.0 if framework == "numres" else 10.0          # first of its kind: compiles, autotunes
    b, seconds = max(known, key=lambda item: item[1] / item[0])
    return seconds * max(1.0, batch / b)


def summarise(entry):
    """Images/s, ratios and target checks of one setting (needs numres and at least one torch layout)."""
    batch = entry["batch"]
    for framework in FRAMEWORKS:
        if framework in entry:
            entry[framework]["images_per_s"] = 1000.0 * batch / entry[framework]["ms_per_step"]
    layouts = [f for f in FRAMEWORKS[1:] if f in entry]
    if "numres" not in entry or not layouts:
        return entry
    ours = entry["numres"]
    for layout in layouts:
        entry[f"time_ratio_vs_{layout}"] = ours["ms_per_step"] / entry[layout]["ms_per_step"]
    best = min(layouts, key=lambda layout: entry[layout]["ms_per_step"])
    entry["best_torch"] = best
    entry["time_ratio_vs_best_torch"] = entry[f"time_ratio_vs_{best}"]
    entry["memory_ratio_vs_best_torch"] = ours["peak_bytes"] / entry[best]["peak_bytes"]
    entry["meets_time_target"] = entry["time_ratio_vs_best_torch"] <= TARGETS[entry["mode"]]
    entry["meets_memory_target"] = entry["memory_ratio_vs_best_torch"] <= TARGETS["memory"]
    return entry


def table(runs) -> str:
    """A Markdown table of the settings measured (``-`` where a number is missing)."""
    gib = 2.0 ** 30

    def number(entry, framework, key, scale=1.0, digits=1):
        value = entry.get(framework, {}).get(key) if framework else None
        return "-" if value is None else f"{value / scale:.{digits}f}"

    def ratio(entry, key):
        return f"{entry[key]:.2f}" if key in entry else "-"

    lines = ["| batch | precision | mode | numres ms | torch NCHW ms | torch CL ms | time ratio vs best torch | "
             "numres peak GiB | best torch peak GiB | memory ratio |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in runs:
        best = e.get("best_torch")
        lines.append(f"| {e['batch']} | {e['precision']} | {e['mode']} | {number(e, 'numres', 'ms_per_step')} | "
                     f"{number(e, 'torch_nchw', 'ms_per_step')} | {number(e, 'torch_channels_last', 'ms_per_step')} | "
                     f"{ratio(e, 'time_ratio_vs_best_torch')} | {number(e, 'numres', 'peak_bytes', gib, 2)} | "
                     f"{number(e, best, 'peak_bytes', gib, 2)} | {ratio(e, 'memory_ratio_vs_best_torch')} |")
    return "\n".join(lines)


def write_report(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from numres.io import atomic_write
    atomic_write(path, lambda stream: stream.write(json.dumps(report, indent=2, default=str).encode()))
    print(f"wrote {path}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    require_gpu()
    deadline = Deadline(args.time_budget)
    began = time.monotonic()
    card = card_info()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.json or os.path.join(RESULTS, slug(card["name"]), f"benchmark_{stamp}.json")
    print(f"gpu_resnet50: {card['name']}, CUDA runtime {card['cuda_runtime_version']}, CuPy {card['cupy']}, "
          f"torch {card['torch']} (cuDNN {card['cudnn']}); budget "
          f"{'none' if args.time_budget is None else f'{args.time_budget:.0f}s'}", flush=True)
    runs, skipped, errors, costs = [], [], [], {}
    interrupted = False
    try:
        for batch, precision, mode in plan(args):
            set_precision(precision)
            entry = {"batch": batch, "precision": precision, "mode": mode, "size": args.size, "dtype": "float32"}
            for framework in FRAMEWORKS:
                needed = estimate(costs, framework, batch, mode)
                if framework != "numres" and "numres" not in entry:
                    break                                       # no numres number: torch alone compares nothing
                if needed > deadline.left():
                    skipped.append({"batch": batch, "precision": precision, "mode": mode, "framework": framework,
                                    "reason": f"time budget: needs ~{needed:.0f}s, {deadline.left():.0f}s left"})
                    continue
                try:
                    if framework == "numres":
                        entry[framework] = bench_numres(mode, batch, args, deadline)
                    else:
                        entry[framework] = bench_torch(mode, batch, framework[len("torch_"):], args, deadline)
                    costs[(framework, batch, mode)] = entry[framework]["seconds"]
                except Exception as exc:        # noqa: BLE001 - report it, keep the other numbers
                    errors.append({"batch": batch, "precision": precision, "mode": mode, "framework": framework,
                                   "error": f"{type(exc).__name__}: {exc}"})
                    print(f"  {framework} b{batch} {precision} {mode}: ERROR {type(exc).__name__}: {exc}", flush=True)
            if any(f in entry for f in FRAMEWORKS):
                runs.append(summarise(entry))
                parts = [f"{f} {entry[f]['ms_per_step']:.1f} ms" for f in FRAMEWORKS if f in entry]
                ratio = entry.get("time_ratio_vs_best_torch")
                memory = entry.get("memory_ratio_vs_best_torch")
                print(f"b{batch:<4d} {precision} {mode:9s} " + " | ".join(parts)
                      + (f" | time ratio {ratio:.2f}, memory ratio {memory:.2f}" if ratio is not None else ""),
                      flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("gpu_resnet50: interrupted; writing what was measured", flush=True)
    report = {"benchmark": "gpu_resnet50", "when": stamp, "host": platform.node(), "card": card,
              "settings": {"warmup": args.warmup, "iters": args.iters, "quick": args.quick,
                           "time_budget_s": args.time_budget, "torch_cudnn_benchmark": True, "size": args.size,
                           "numres_kernels": os.environ.get("NUMRES_CUDA_KERNELS", "1"),
                           "numres_peak": "CuPy memory hook over model creation, first step and warm-up",
                           "torch_peak": "torch.cuda.max_memory_allocated over the same span"},
              "targets": TARGETS, "runs": runs, "skipped": skipped, "errors": errors,
              "interrupted": interrupted, "elapsed_s": time.monotonic() - began}
    write_report(path, report)
    if runs:
        print(table(runs), flush=True)
    complete = [run for run in runs if "time_ratio_vs_best_torch" in run]
    print(f"gpu_resnet50: {len(complete)} settings compared, {len(skipped)} measurements skipped for time, "
          f"{len(errors)} errors", flush=True)
    return 0 if complete and not errors and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
