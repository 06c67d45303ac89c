"""How closely numres's ResNet-50 matches PyTorch: worst relative errors of one forward/backward.

    python3 benchmarks/parity_resnet50.py                 # 2x3x64x64, train and eval mode
    python3 benchmarks/parity_resnet50.py --size 224      # the ImageNet size (slower in float64)

numres and the torchvision-structured reference of tests/torch_reference.py get identical
weights (BN affine parameters and running statistics randomized, so none is trivially
1 or 0), the same input batch and the same random dL/dlogits.  For float64 and float32 we
report, as ``max|numres - torch| / max|torch|`` per tensor:

* logits, the input gradient, the worst parameter gradient (with its name), and the worst
  BN running statistic after the step (train mode);
* for float32, also each framework's error against the float64 reference, because in
  train mode the float32 gradients of both frameworks are ill-conditioned at this size.

Results are printed and written to ``benchmarks/results/parity_resnet50.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

import numres as nr  # noqa: E402
import torch_reference as R  # noqa: E402
from numres.io import atomic_write  # noqa: E402

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "parity_resnet50.json"))
    return parser.parse_args(argv)


def build_pair(name, dtype, train, seed, torch_dtype=None):
    nr.manual_seed(seed)
    model = getattr(nr, name)(dtype=dtype)
    R.randomize_batchnorms(model, seed + 1)
    reference = R.build(name).to(TORCH_DTYPES[torch_dtype or dtype])
    R.load_numres_state(reference, model)
    model.train(train)
    reference.train(train)
    return model, reference


def summarize(errors):
    """Worst error per kind: logits, input gradient, parameter gradients (with name), buffers."""
    grads = {k[len("grad "):]: v for k, v in errors.items() if k.startswith("grad ")}
    buffers = {k[len("buffer "):]: v for k, v in errors.items() if k.startswith("buffer ")}
    worst_grad = max(grads, key=grads.get)
    summary = {"logits": errors["logits"], "input_grad": errors["input gradient"],
               "worst_param_grad": grads[worst_grad], "worst_param_grad_name": worst_grad,
               "median_param_grad": float(np.median(list(grads.values())))}
    if buffers:
        worst_buffer = max(buffers, key=buffers.get)
        summary.update(worst_running_stat=buffers[worst_buffer], worst_running_stat_name=worst_buffer)
    return summary


def measure(args, dtype, train):
    rng = np.random.default_rng(args.seed + 2)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(dtype)
    upstream = rng.standard_normal((args.batch, 1000)).astype(dtype)
    model, reference = build_pair(args.model, dtype, train, args.seed)
    start = time.perf_counter()
    ours = R.numres_pass(model, x, upstream)
    seconds = time.perf_counter() - start
    theirs = R.torch_pass(reference, x, upstream)
    result = {"vs_torch_same_dtype": summarize(R.compare_passes(ours, theirs)), "numres_seconds": seconds}
    if dtype == "float32":
        _, truth_model = build_pair(args.model, dtype, train, args.seed, torch_dtype="float64")
        truth = R.torch_pass(truth_model, x, upstream)
        result["numres_vs_torch_float64"] = summarize(R.compare_passes(ours, truth))
        result["torch_vs_torch_float64"] = summarize(R.compare_passes(theirs, truth))
    return result


def blas():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return [{k: e.get(k) for k in ("internal_api", "version", "num_threads")}
            for e in threadpoolctl.threadpool_info() if e.get("user_api") == "blas"]


def print_line(label, s):
    line = (f"  {label:<28} logits {s['logits']:.2e}  dL/dx {s['input_grad']:.2e}  "
            f"worst param grad {s['worst_param_grad']:.2e} ({s['worst_param_grad_name']})")
    if "worst_running_stat" in s:
        line += f"  running stats {s['worst_running_stat']:.2e}"
    print(line)


def main(argv=None):
    args = parse_args(argv)
    report = {"model": args.model, "input": [args.batch, 3, args.size, args.size], "seed": args.seed,
              "torch": torch.__version__, "numpy": np.__version__, "numres": nr.__version__,
              "python": platform.python_version(), "blas": blas(),
              "error": "max|numres - reference| / max|reference| per tensor", "results": {}}
    for mode, train in (("train", True), ("eval", False)):
        for dtype in ("float64", "float32"):
            result = measure(args, dtype, train)
            report["results"][f"{mode}/{dtype}"] = result
            print(f"{args.model} {mode} {dtype}:")
            print_line("numres vs torch (same dtype)", result["vs_torch_same_dtype"])
            if dtype == "float32":
                print_line("numres vs torch float64", result["numres_vs_torch_float64"])
                print_line("torch vs torch float64", result["torch_vs_torch_float64"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(args.out, lambda stream: stream.write(text.encode("utf-8")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
