"""Peak memory of a training step's backward, with caches freed as backward goes (the default) or kept.

    python benchmarks/backward_memory.py --model resnet50 --batch 8 --size 224

Each module lets its forward cache go when its own backward has finished, so the saved
activations of the last stages are gone by the time the first stages run their backward.
``retain_graph=True`` keeps every cache until the next forward, which is how numres behaved
before caches were freed; running the same step both ways measures what freeing saves.

Each way runs in a child process of its own (one float32 train step: forward, loss, backward),
and two measures are taken there:

* **traced**: the largest total of live NumPy allocations during backward, from ``tracemalloc``
  (NumPy reports its array buffers to it).  It counts arrays only and does not depend on the
  allocator, so it is the exact measure of what freeing changes.
* **VmHWM**: the process's peak resident size (model, Python, BLAS buffers and all), with
  glibc's default allocator settings, so freed blocks can go back to the system.

Results go to ``benchmarks/results/backward_memory_<model>_b<batch>_s<size>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MIB = 2 ** 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", choices=["free", "retain"], help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    return parser.parse_args(argv)


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> dict:
    """One train step in this process; the numbers as a dict (printed as JSON for the parent)."""
    import tracemalloc

    import numpy as np

    sys.path.insert(0, ROOT)
    import numres as nr

    nr.manual_seed(0)
    model = getattr(nr, args.model)(num_classes=1000, dtype="float32")
    criterion = nr.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    target = rng.integers(0, 1000, args.batch)
    tracemalloc.start()
    criterion(model(x), target)
    after_forward, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    model.backward(criterion.backward(), need_input_grad=False, retain_graph=args.child == "retain")
    _, backward_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"held_after_forward_bytes": after_forward, "backward_traced_peak_bytes": backward_peak,
            "vm_hwm_bytes": vm_hwm_bytes()}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for mode in ("retain", "free"):
        command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch", str(args.batch),
                   "--size", str(args.size), "--child", mode]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    before, after = results["retain"], results["free"]
    report = {
        "model": args.model, "batch": args.batch, "size": args.size, "dtype": "float32",
        "kept_caches (before)": before, "freed_caches (after)": after,
        "traced_peak_saving": 1 - after["backward_traced_peak_bytes"] / before["backward_traced_peak_bytes"],
        "vm_hwm_saving": 1 - after["vm_hwm_bytes"] / before["vm_hwm_bytes"],
    }
    for label, key in (("traced peak during backward", "backward_traced_peak_bytes"),
                       ("process peak (VmHWM)", "vm_hwm_bytes")):
        print(f"{label:28s}: kept caches {before[key] / MIB:8.0f} MiB   freed caches {after[key] / MIB:8.0f} MiB"
              f"   ({100 * (1 - after[key] / before[key]):.0f}% less)")
    print(f"{'arrays held after forward':28s}: {after['held_after_forward_bytes'] / MIB:8.0f} MiB")
    if not args.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, f"backward_memory_{args.model}_b{args.batch}_s{args.size}.json")
        with open(path, "w") as stream:
            json.dump(report, stream, indent=2)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
