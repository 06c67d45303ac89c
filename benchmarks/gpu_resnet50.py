"""numres on CuPy against PyTorch CUDA (eager, cuDNN) for ResNet-50 training and inference.

    python3 benchmarks/gpu_resnet50.py                       # batch 32, 64, 128 at 224x224; TF32 off and on

For each TF32 setting, batch size and mode (``train``: forward, cross-entropy, backward and an
SGD step with momentum and weight decay; ``inference``: an eval-mode forward without saving
anything for backward) it times numres (CuPy backend, its CUDA kernels, channels-last
activations; in ``train`` also the same step replayed as a CUDA graph) and PyTorch in eager mode
with cuDNN (``cudnn.benchmark`` on), once with NCHW and once with channels_last memory.  Both
frameworks run in this process on the same GPU, in float32 (``--dtype``) with the same TF32
setting for matmuls and convolutions.

Reported per run: images/s (median over ``--repeats`` timed windows of ``--steps`` steps, timed
with CUDA events), the time ratio numres / PyTorch (1.0 = as fast; the issue's targets are at
most 1.25 for training and 1.0 for inference), and peak GPU memory: numres's high-water mark of
bytes in use (a CuPy memory hook) and bytes held by its memory pool, PyTorch's
``max_memory_allocated`` and ``max_memory_reserved`` (target: numres at most 1.3x).
The JSON goes to ``benchmarks/results/gpu_resnet50_<card>.json``, naming the card.

On a machine without an NVIDIA GPU, CuPy or CUDA-enabled PyTorch it stops with a message
saying which is missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--tf32", choices=["off", "on", "both"], default="both")
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay of the numres step")
    parser.add_argument("--out", default=RESULTS)
    return parser.parse_args(argv)


def require_gpu():
    """CuPy, a visible GPU and CUDA-enabled PyTorch, or a clear exit."""
    problems = []
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            problems.append("CuPy sees no CUDA device")
    except Exception as exc:        # ImportError, or a CUDA driver error
        problems.append(f"CuPy is not usable ({type(exc).__name__}: {exc})")
    try:
        import torch
        if not torch.cuda.is_available():
            problems.append(f"PyTorch {torch.__version__} has no CUDA device (a CPU-only build, or no GPU)")
    except ImportError as exc:
        problems.append(f"PyTorch is not installed ({exc})")
    if problems:
        sys.exit("gpu_resnet50.py needs an NVIDIA GPU with CuPy and CUDA-enabled PyTorch: " + "; ".join(problems)
                 + ".  Install with: pip install -e '.[bench,cuda12]' (or cuda13) on a GPU machine.")


def card_info():
    import cupy
    import torch
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {"name": name, "torch_name": torch.cuda.get_device_name(),
            "compute_capability": cupy.cuda.Device().compute_capability,
            "memory_bytes": int(props["totalGlobalMem"]), "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def set_tf32(enabled):
    import torch

    import numres.cuda
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    numres.cuda.set_tf32(enabled)


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


def time_window(run, steps, repeats, warmup, sync_stream=None):
    """Median seconds per step over ``repeats`` windows of ``steps`` calls, timed with CUDA events."""
    import cupy
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(steps):
            run()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end) / 1000.0 / steps)
    return statistics.median(samples)


def bench_numres(mode, batch, args, graph=False):
    import cupy
    import numpy as np

    import numres as nr
    from numres.cuda import graph as cuda_graph

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    nr.manual_seed(0)
    model = nr.resnet50(backend="cupy", dtype=args.dtype)
    rng = np.random.default_rng(0)
    x = nr.backend.convert(np.ascontiguousarray(
        rng.standard_normal((batch, args.size, args.size, 3), dtype=np.float32)).transpose(0, 3, 1, 2).astype(
        args.dtype), "cupy")
    target = cupy.asarray(rng.integers(0, 1000, batch))
    if mode == "inference":
        model.eval()

        def run():
            with nr.no_grad():
                model(x)
    else:
        crit = nr.nn.CrossEntropyLoss(backend="cupy", dtype=args.dtype)
        opt = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def run():
            cuda_graph.train_step(model, crit, opt, x, target)
        if graph:
            run()                                               # the eager step a capture needs
            step = cuda_graph.CapturedTrainStep(model, crit, opt, x, target)
            run = lambda: step(x, target)                        # noqa: E731
    seconds = time_window(run, args.steps, args.repeats, args.warmup)
    cupy.cuda.Device().synchronize()
    resident = pool.used_bytes()                                 # weights, grads, momentum, inputs, caches
    hook = peak_hook()
    with hook:                                                   # one more step, untimed, to measure memory
        run()
        cupy.cuda.Device().synchronize()
    memory = {"numres_peak_in_use_bytes_during_one_step": resident + hook.peak,
              "cupy_pool_total_bytes": pool.total_bytes()}
    return seconds, memory


def bench_torch(mode, batch, layout, args):
    import numpy as np
    import torch

    import torch_reference

    torch.backends.cudnn.benchmark = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = torch_reference.build("resnet50").to("cuda", dtype).to(memory_format=memory_format)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32), device="cuda",
                     dtype=dtype).contiguous(memory_format=memory_format)
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
    seconds = time_window(run, args.steps, args.repeats, args.warmup)
    torch.cuda.synchronize()
    memory = {"torch_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
              "torch_max_memory_reserved_bytes": torch.cuda.max_memory_reserved()}
    return seconds, memory


def main(argv=None):
    args = parse_args(argv)
    require_gpu()
    card = card_info()
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.tf32]
    runs = []
    for tf32 in settings:
        set_tf32(tf32)
        for batch in args.batch_sizes:
            for mode in args.modes:
                entry = {"tf32": tf32, "batch": batch, "mode": mode, "size": args.size, "dtype": args.dtype}
                seconds, memory = bench_numres(mode, batch, args)
                entry["numres_images_per_s"] = batch / seconds
                entry.update(memory)
                if mode == "train" and not args.no_graph:
                    try:
                        graph_seconds, _ = bench_numres(mode, batch, args, graph=True)
                        entry["numres_graph_images_per_s"] = batch / graph_seconds
                    except Exception as exc:         # report, do not lose the other numbers
                        entry["numres_graph_error"] = f"{type(exc).__name__}: {exc}"
                for layout in ("nchw", "channels_last"):
                    torch_seconds, torch_memory = bench_torch(mode, batch, layout, args)
                    entry[f"torch_{layout}_images_per_s"] = batch / torch_seconds
                    entry[f"ratio_vs_torch_{layout}"] = seconds / torch_seconds
                    entry.update({f"{key}_{layout}": value for key, value in torch_memory.items()})
                best = min(("nchw", "channels_last"), key=lambda lay: 1 / entry[f"torch_{lay}_images_per_s"])
                entry["ratio_vs_best_torch"] = entry[f"ratio_vs_torch_{best}"]
                entry["memory_ratio_vs_torch_allocated"] = (entry["numres_peak_in_use_bytes_during_one_step"]
                                                            / entry[f"torch_max_memory_allocated_bytes_{best}"])
                runs.append(entry)
                print(f"tf32={'on ' if tf32 else 'off'} batch={batch:4d} {mode:9s} "
                      f"numres {entry['numres_images_per_s']:8.1f} img/s | torch nchw "
                      f"{entry['torch_nchw_images_per_s']:8.1f} cl {entry['torch_channels_last_images_per_s']:8.1f} | "
                      f"time ratio {entry['ratio_vs_best_torch']:.2f} | "
                      f"memory ratio {entry['memory_ratio_vs_torch_allocated']:.2f}", flush=True)
    report = {"benchmark": "gpu_resnet50", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "host": platform.node(), "python": platform.python_version(), "card": card,
              "settings": {"steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                           "torch_cudnn_benchmark": True,
                           "numres_kernels": os.environ.get("NUMRES_CUDA_KERNELS", "1")},
              "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", card["name"].lower()).strip("_")
    path = os.path.join(args.out, f"gpu_resnet50_{slug}.json")
    from numres.io import atomic_write
    atomic_write(path, lambda stream: stream.write(json.dumps(report, indent=2).encode()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
