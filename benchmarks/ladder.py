"""From textbook to engine, measured: one ResNet-50 conv -> BN -> ReLU unit up the ladder of optimisations.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/ladder.py

The unit is ResNet-50's ``layer1`` 3x3 convolution (64 -> 64 channels at 56x56, batch 8,
float32, stride 1, padding 1, no bias), its BatchNorm and its ReLU, in training mode.  Each
rung changes one thing over the rung before; every rung computes the same numbers (the script
checks each against the first, float64 truth within float32 rounding).  For each rung it times
forward and backward (medians of ``--repeats``, the rungs interleaved so that a noisy moment
hits all of them alike) and measures the peak of the arrays allocated during one forward and
backward (tracemalloc, which sees NumPy's allocations).  PyTorch runs the same unit in the same
process on the same threads, NCHW and channels_last.

It writes ``benchmarks/results/ladder.json`` and regenerates ``docs/ladder.md``, the chapter a
learner reads to see why the engine looks the way it does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numres as nr  # noqa: E402
import numres.reference as R  # noqa: E402
from numres import functional as F  # noqa: E402
from numres.functional import implicit_gemm, winograd  # noqa: E402

N, C, SIDE, K = 8, 64, 56, 3
EPS, MOMENTUM = 1e-5, 0.1


# --- the two hand-written rungs between the textbook and the engine --------------------------------
# Rung 2 and 3 are written here, short and plain, because the engine never had them as separate
# functions: they show one step each (a patch matrix and one GEMM; then channels-last storage).

def im2col_nchw(x, k=K, pad=1):
    """Patch matrix of an NCHW input: rows = output pixels (n, oh, ow), columns = (c, i, j)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))   # (N, C, H, W, k, k)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)


def col2im_nchw(dcols, x_shape, k=K, pad=1):
    """The adjoint of :func:`im2col_nchw`: each patch entry's gradient added back to its pixel."""
    n, c, h, w = x_shape
    dpatches = dcols.reshape(n, h, w, c, k, k)
    dpadded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            dpadded[:, :, i:i + h, j:j + w] += dpatches[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dpadded[:, :, pad:pad + h, pad:pad + w]


def conv_im2col_nchw_forward(x, weight):
    cols = im2col_nchw(x)
    y_rows = cols @ weight.reshape(weight.shape[0], -1).T                  # (N*H*W, O)
    n, _, h, w = x.shape
    y = np.ascontiguousarray(y_rows.reshape(n, h, w, -1).transpose(0, 3, 1, 2))   # back to NCHW: a copy
    return y, (x, weight, cols)


def conv_im2col_nchw_backward(dy, cache):
    x, weight, cols = cache
    dy_rows = dy.transpose(0, 2, 3, 1).reshape(-1, dy.shape[1])            # NCHW -> rows: a copy
    dweight = (cols.T @ dy_rows).T.reshape(weight.shape)
    dx = col2im_nchw(dy_rows @ weight.reshape(weight.shape[0], -1), x.shape)
    return dx, dweight


def im2col_nhwc(x_nhwc, k=K, pad=1):
    """Patch matrix of a channels-last input: columns ordered (i, j, c), one contiguous copy per row."""
    n, h, w, c = x_nhwc.shape
    padded = np.pad(x_nhwc, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))   # (N, H, W, C, k, k)
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, k * k * c)


def col2im_nhwc(dcols, x_shape, k=K, pad=1):
    n, c, h, w = x_shape
    dpatches = dcols.reshape(n, h, w, k, k, c)
    dpadded = np.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            dpadded[:, i:i + h, j:j + w] += dpatches[:, :, :, i, j]
    return dpadded[:, pad:pad + h, pad:pad + w].transpose(0, 3, 1, 2)


def conv_im2col_nhwc_forward(x, weight_khwio):
    """``weight_khwio`` is stored (kh, kw, I, O): the GEMM reads it as a (9I, O) matrix with no copy."""
    x_nhwc = x.transpose(0, 2, 3, 1)                                        # free view of a channels-last x
    cols = im2col_nhwc(x_nhwc)
    y_rows = cols @ weight_khwio.reshape(-1, weight_khwio.shape[-1])        # (N*H*W, O): already NHWC
    n, h, w, _ = x_nhwc.shape
    return y_rows.reshape(n, h, w, -1).transpose(0, 3, 1, 2), (x, weight_khwio, cols)


def conv_im2col_nhwc_backward(dy, cache):
    x, weight_khwio, cols = cache
    dy_rows = dy.transpose(0, 2, 3, 1).reshape(-1, dy.shape[1])            # free: dy is channels-last
    matrix = weight_khwio.reshape(-1, weight_khwio.shape[-1])
    dweight = (cols.T @ dy_rows).reshape(weight_khwio.shape)
    return col2im_nhwc(dy_rows @ matrix.T, x.shape), dweight


# --- the rungs ----------------------------------------------------------------------------------------

class Unit:
    """Parameters and inputs of the unit, in both storage orders."""

    def __init__(self, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((N, C, SIDE, SIDE)).astype(dtype)
        self.x_cl = np.ascontiguousarray(self.x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)   # channels-last
        weight = (rng.standard_normal((C, C, K, K)) * np.sqrt(2 / (9 * C))).astype(dtype)
        self.weight = weight
        self.weight_khwio = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
        self.weight_engine = self.weight_khwio.transpose(3, 2, 0, 1)         # PyTorch shape, GEMM-friendly storage
        self.gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
        self.beta = rng.standard_normal(C).astype(dtype)
        self.dy = rng.standard_normal((N, C, SIDE, SIDE)).astype(dtype)
        self.dy_cl = np.ascontiguousarray(self.dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def stats(self):
        return np.zeros(C, self.x.dtype), np.ones(C, self.x.dtype)


def _textbook_bn_relu(ops, y, unit):
    mean, var = unit.stats()
    z, bn_cache = ops.batchnorm_train_forward(y, unit.gamma, unit.beta, mean, var, MOMENTUM, EPS)
    out, relu_cache = ops.relu_forward(z)
    return out, (bn_cache, relu_cache)


def _textbook_bn_relu_backward(ops, dout, caches):
    bn_cache, relu_cache = caches
    dz = ops.relu_backward(dout, relu_cache)
    return ops.batchnorm_backward(dz, bn_cache)


def _conv_then_textbook_bn(unit, conv_forward, conv_backward, x, dy):
    """A rung whose convolution is ``conv_forward``/``conv_backward`` and whose BN and ReLU are the textbook's."""
    def forward():
        y, conv_cache = conv_forward(x)
        out, caches = _textbook_bn_relu(R, y, unit)
        return out, (conv_cache, caches)

    def backward(cache):
        conv_cache, caches = cache
        dz, _, _ = _textbook_bn_relu_backward(R, dy, caches)
        return conv_backward(dz, conv_cache)
    return forward, backward


def rung_reference(unit):
    return _conv_then_textbook_bn(unit, lambda x: R.conv2d_forward(x, unit.weight, None, 1, 1),
                                  lambda dz, cache: R.conv2d_backward(dz, cache)[0], unit.x, unit.dy)


def rung_im2col(unit):
    return _conv_then_textbook_bn(unit, lambda x: conv_im2col_nchw_forward(x, unit.weight),
                                  lambda dz, cache: conv_im2col_nchw_backward(dz, cache)[0], unit.x, unit.dy)


def rung_channels_last(unit):
    return _conv_then_textbook_bn(unit, lambda x: conv_im2col_nhwc_forward(x, unit.weight_khwio),
                                  lambda dz, cache: conv_im2col_nhwc_backward(dz, cache)[0], unit.x_cl, unit.dy_cl)


def _engine_conv(unit, bn_ops, fused_relu, conv_forward=None, conv_backward=None):
    conv_forward = conv_forward or (lambda x, w: F.conv2d_forward(x, w, None, 1, 1))
    conv_backward = conv_backward or (lambda dy, cache: F.conv2d_backward(dy, cache)[0])

    def forward():
        y, conv_cache = conv_forward(unit.x_cl, unit.weight_engine)
        if fused_relu:
            mean, var = unit.stats()
            out, bn_cache = bn_ops.batchnorm_train_forward(y, unit.gamma, unit.beta, mean, var, MOMENTUM, EPS,
                                                           True)
            return out, (conv_cache, bn_cache)
        out, caches = _textbook_bn_relu(bn_ops, y, unit)
        return out, (conv_cache, caches)

    def backward(cache):
        conv_cache, caches = cache
        if fused_relu:
            dy, _, _ = bn_ops.batchnorm_backward(unit.dy_cl, caches)
        else:
            dy, _, _ = _textbook_bn_relu_backward(bn_ops, unit.dy_cl, caches)
        return conv_backward(dy, conv_cache)
    return forward, backward


def rung_chunked(unit):
    return _engine_conv(unit, R, fused_relu=False)


def rung_bn_tiles(unit):
    return _engine_conv(unit, F, fused_relu=False)


def rung_fused_relu(unit):
    return _engine_conv(unit, F, fused_relu=True)


def rung_winograd(unit):
    def forward(x, w):
        return winograd.winograd_conv2d_forward(x, w, None, 1, (1, 1), 1, 1, tile=2)

    def backward(dy, cache):
        return winograd.winograd_conv2d_backward(dy, cache)[0]
    return _engine_conv(unit, F, fused_relu=True, conv_forward=forward, conv_backward=backward)


def eval_unfolded_and_folded(unit):
    """Evaluation-mode forwards of the engine: BatchNorm after the convolution, and folded into it."""
    nr.manual_seed(0)
    conv = nr.nn.Conv2d(C, C, K, padding=1, bias=False)
    conv.reset_weight(unit.weight)
    bn = nr.nn.BatchNorm2d(C)
    bn.weight.data[...] = unit.gamma
    bn.bias.data[...] = unit.beta
    bn.running_mean[...] = 0.1
    bn.running_var[...] = 1.5
    conv.eval()
    bn.eval()

    def unfolded():
        with nr.using_config(batchnorm_folding=False, conv_algorithm="im2col"), nr.no_grad():
            return nr.nn.fusion.conv_bn(conv, bn, unit.x_cl, relu=True)

    def folded():
        with nr.using_config(batchnorm_folding=True, conv_algorithm="im2col"), nr.no_grad():
            return nr.nn.fusion.conv_bn(conv, bn, unit.x_cl, relu=True)
    return unfolded, folded


def rung_implicit(unit):
    def forward(x, w):
        return implicit_gemm.implicit_conv2d_forward(x, w, None, 1, 1)

    def backward(dy, cache):
        return implicit_gemm.implicit_conv2d_backward(dy, cache)[0]
    return _engine_conv(unit, F, fused_relu=True, conv_forward=forward, conv_backward=backward)


RUNGS = [            # (name, title, factory); rung 7, folding, is evaluation-only and measured apart
    ("reference", "the textbook", rung_reference),
    ("im2col", "im2col + one GEMM", rung_im2col),
    ("channels_last", "channels-last storage", rung_channels_last),
    ("chunked", "the engine's chunked, threaded im2col", rung_chunked),
    ("bn_tiles", "BatchNorm from x, in tiles on all cores", rung_bn_tiles),
    ("fused_relu", "ReLU fused into BatchNorm", rung_fused_relu),
    ("winograd", "Winograd F(2x2, 3x3)", rung_winograd),
    ("implicit", "implicit GEMM: slab GEMMs, no patch matrix", rung_implicit),
]
NUMBERS = {"reference": 1, "im2col": 2, "channels_last": 3, "chunked": 4, "bn_tiles": 5, "fused_relu": 6,
           "winograd": 8, "implicit": 9}


# --- measuring ------------------------------------------------------------------------------------------

def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, (time.perf_counter() - start) * 1e3


def peak_mib(forward, backward):
    """Peak MiB of arrays allocated during one forward and backward, over what existed before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out, cache = forward()
    backward(cache)
    del out, cache
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2 ** 20


def torch_runners(unit, channels_last):
    import torch
    conv = torch.nn.Conv2d(C, C, K, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(unit.weight))
        bn.weight.copy_(torch.from_numpy(unit.gamma))
        bn.bias.copy_(torch.from_numpy(unit.beta))
    x = torch.from_numpy(unit.x.copy()).requires_grad_(True)
    dy = torch.from_numpy(unit.dy.copy())
    if channels_last:
        conv, bn = conv.to(memory_format=torch.channels_last), bn
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        dy = dy.to(memory_format=torch.channels_last)

    def forward():
        out = torch.relu(bn(conv(x)))
        return out, out

    def backward(out):
        out.backward(dy)
    return forward, backward


def check_agreement(unit, truth, results):
    """Each rung's dx against the float64 textbook: float32 rounding only (1e-4 of the largest value)."""
    errors = {}
    for name, dx in results.items():
        dx = np.asarray(dx, dtype=np.float64)
        errors[name] = float(np.abs(dx - truth).max() / np.abs(truth).max())
    return errors


def machine():
    from cpu_resnet import blas_info, cpu_model, vector_width
    return {"cpu": cpu_model(), "vector_width": vector_width(), "blas": blas_info(), "cores": os.cpu_count()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "ladder.json"))
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "ladder.md"))
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    args = parser.parse_args(argv)

    import threadpoolctl
    nr.allocator.retain_freed_memory()
    nr.parallel.set_num_threads(args.threads)
    limits = threadpoolctl.threadpool_limits(limits=args.threads)
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)

    from numres.cpu_info import slow_blas_warning
    if slow_blas_warning():
        print(slow_blas_warning())
    unit = Unit()
    runners = {name: factory(unit) for name, _, factory in RUNGS}
    if not args.no_torch:
        runners["torch"] = torch_runners(unit, channels_last=False)
        runners["torch_channels_last"] = torch_runners(unit, channels_last=True)

    # Correctness first: every rung's dx against the float64 textbook.
    truth_unit = Unit(dtype=np.float64)
    forward64, backward64 = rung_reference(truth_unit)
    truth = backward64(forward64()[1])
    dxs = {}
    for name, (forward, backward) in runners.items():
        out, cache = forward()
        dx = backward(cache)
        dxs[name] = dx if not name.startswith("torch") else None
    errors = check_agreement(unit, truth, {k: v for k, v in dxs.items() if v is not None})

    times = {name: {"forward": [], "backward": []} for name in runners}
    for _ in range(args.repeats):
        for name, (forward, backward) in runners.items():          # interleaved: noise hits every rung
            (out, cache), ms_forward = timed(forward)
            _, ms_backward = timed(backward, cache)
            times[name]["forward"].append(ms_forward)
            times[name]["backward"].append(ms_backward)
            del out, cache

    unfolded, folded = eval_unfolded_and_folded(unit)
    eval_times = {"unfolded": [], "folded": []}
    folded()                                                       # the fold itself is made once, then kept
    for _ in range(args.repeats):
        for name, function in (("unfolded", unfolded), ("folded", folded)):
            _, ms = timed(function)
            eval_times[name].append(ms)

    memory = {name: peak_mib(*runners[name]) for name, _, _ in RUNGS}
    limits.restore_original_limits()

    rows = []
    for name, title, _ in RUNGS:
        rows.append({"rung": name, "title": title, "forward_ms": statistics.median(times[name]["forward"]),
                     "backward_ms": statistics.median(times[name]["backward"]), "peak_mib": memory[name],
                     "dx_error": errors[name]})
    for name in ("torch", "torch_channels_last"):
        if name in times:
            rows.append({"rung": name, "title": "PyTorch " + ("channels_last" if "channels" in name else "NCHW"),
                         "forward_ms": statistics.median(times[name]["forward"]),
                         "backward_ms": statistics.median(times[name]["backward"]), "peak_mib": None,
                         "dx_error": None})
    result = {"unit": f"conv {K}x{K} {C}->{C} at {SIDE}x{SIDE}, batch {N}, float32, BN, ReLU (training mode)",
              "repeats": args.repeats, "threads": args.threads, "machine": machine(),
              "settings": nr.config.show(file=open(os.devnull, "w")), "slow_blas_warning": slow_blas_warning(),
              "rows": rows, "eval_ms": {k: statistics.median(v) for k, v in eval_times.items()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "versions": {"numpy": np.__version__, "torch": None if args.no_torch else __import__("torch").__version__}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as stream:
        json.dump(result, stream, indent=1)
    text = chapter(result)
    with open(args.doc, "w") as stream:
        stream.write(text)
    print(table(result))
    print(f"wrote {args.out} and {args.doc}")


def total_ms(row):
    return row["forward_ms"] + row["backward_ms"]


def table(result):
    rows = {row["rung"]: row for row in result["rows"]}
    base = total_ms(rows["reference"])
    torch_row = rows.get("torch_channels_last")
    lines = ["| rung | change | forward ms | backward ms | fwd+bwd ms | speed-up over the textbook "
             "| time / PyTorch channels_last | peak MiB | dx error vs float64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        total = total_ms(row)
        vs_torch = f"{total / total_ms(torch_row):.2f}" if torch_row else "-"
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        error = "-" if row["dx_error"] is None else f"{row['dx_error']:.1e}"
        label = f"{NUMBERS[row['rung']]}. {row['rung']}" if row["rung"] in NUMBERS else row["rung"]
        lines.append(f"| {label} | {row['title']} | {row['forward_ms']:.1f} | {row['backward_ms']:.1f} | "
                     f"{total:.1f} | {base / total:.2f}x | {vs_torch} | {peak} | {error} |")
    e = result["eval_ms"]
    lines.append("")
    lines.append(f"Evaluation-mode forward of the same unit in the engine (rung 7): BatchNorm after the convolution "
                 f"{e['unfolded']:.1f} ms, folded into it {e['folded']:.1f} ms "
                 f"({e['unfolded'] / e['folded']:.2f}x).")
    return "\n".join(lines)


def _than(row, earlier):
    """"2.1x faster than" / "1.3x slower than": ``row``'s fwd+bwd time against ``earlier``'s."""
    ratio = total_ms(earlier) / total_ms(row)
    if abs(ratio - 1) < 0.03:
        return "about as fast as"
    return f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"


def _memory(row, earlier):
    return f"peak memory {earlier['peak_mib']:.0f} -> {row['peak_mib']:.0f} MiB"


def paragraphs(result):
    """One paragraph per rung; every comparison in them is computed from this run's numbers."""
    r = {row["rung"]: row for row in result["rows"]}
    e = result["eval_ms"]
    return {
        "reference": f"""**1. The textbook** ([`numres/reference/conv.py`](../numres/reference/conv.py),
[`batchnorm.py`](../numres/reference/batchnorm.py), [`activation.py`](../numres/reference/activation.py)).
The convolution is a sum over the nine kernel offsets: for each `(i, j)`, one `(O, C) @ (C, pixels)`
product per image with the input shifted by `(i, j)`. BatchNorm normalises to `x_hat`, scales and
shifts; its backward is the textbook formula in `x_hat`; the ReLU is a separate pass. Every step
allocates a fresh array. This is the code to read, and every rung below must give its numbers: the
last column compares each rung's input gradient, in float32, with this code run in float64.""",
        "im2col": f"""**2. im2col + one GEMM.** Copy every 3x3 window into one row of a patch matrix `(N*H*W, 9C)` and
multiply once by the `(9C, O)` weight matrix; the backward is the adjoint: `dW = colsᵀ dy`, `dcols = dy
Wᵀ`, and col2im adds each window's gradient back onto its pixels. Nine GEMMs with K = C become one with
K = 9C. In NCHW storage the price is high: the patch matrix is a 9x copy of the input gathered across
strided channel planes, the GEMM's pixel-major output needs a transposing copy back to NCHW, and `dy`
one the other way. Here that rung is {_than(r["im2col"], r["reference"])} the textbook
({_memory(r["im2col"], r["reference"])}): a bigger GEMM alone does not pay for the copies.""",
        "channels_last": f"""**3. Channels-last storage.** Keep activations in NHWC memory behind their NCHW shape (PyTorch's
`channels_last`). A window's 9C values are then 3 contiguous runs, the GEMM's output already *is* the
NHWC result, and `dy` reads as a row matrix with no copy: both transposes of rung 2 disappear, and a 1x1
convolution needs no patch matrix at all. The weight is stored `(kh, kw, I, O)`, so its matrix is a free
view too. Here it is {_than(r["channels_last"], r["im2col"])} rung 2.""",
        "chunked": f"""**4. The chunked workspace** ([`numres/functional/conv.py`](../numres/functional/conv.py): `im2col`,
`col2im`, `image_chunks`). The engine builds the patch matrix a few images at a time (at most
`WORKSPACE_ELEMENTS`, 16 MiB of float32), runs each chunk's GEMM into its slice of the output, and
spreads the copies over the cores. Here it is {_than(r["chunked"], r["channels_last"])} rung 3, and
{_memory(r["chunked"], r["channels_last"])}: the workspace no longer grows with the batch.""",
        "bn_tiles": f"""**5. BatchNorm from `x`, in tiles on all cores** ([`numres/functional/batchnorm.py`](../numres/functional/batchnorm.py)).
The textbook backward needs `x_hat` and full-size temporaries. The engine rewrites `dx = g·a + x·b + c`
with per-channel constants, takes the sums in one pass over cache-sized tiles of rows, and runs the
tiles on the thread pool ([`numres/parallel.py`](../numres/parallel.py)). Here it is {_than(r["bn_tiles"], r["chunked"])} rung 4.""",
        "fused_relu": f"""**6. The ReLU fused into BatchNorm.** `batchnorm_train_forward(..., relu=True)` applies `max(·, 0)`
to each tile while it is in cache, and the backward applies the mask in the same tile pass: one pass
over memory fewer each way, and one activation-sized array fewer. Here it is {_than(r["fused_relu"], r["bn_tiles"])} rung 5.

**7. BatchNorm folded into the convolution (evaluation mode)** ([`numres/nn/fusion.py`](../numres/nn/fusion.py),
[`numres/functional/fused.py`](../numres/functional/fused.py)). With running statistics BatchNorm is a
per-channel affine map, so it folds into the convolution's weight and bias: `W' = W·γ/σ`,
`b' = β - μ·γ/σ`. The folded convolution adds the bias and applies the ReLU to each chunk of GEMM output
while it is in cache: no BatchNorm pass at all. On this unit's evaluation-mode forward: {e['unfolded']:.1f} ms
unfolded, {e['folded']:.1f} ms folded. It is not in the training table because training-mode BatchNorm
needs the batch's statistics.""",
        "winograd": f"""**8. Winograd F(2x2, 3x3)** ([`numres/functional/winograd.py`](../numres/functional/winograd.py)).
Each 2x2 output tile costs 16 multiplications instead of 36, as 16 GEMMs on transformed tiles; the
transforms are extra passes over memory. Here it is {_than(r["winograd"], r["fused_relu"])} rung 6
({_memory(r["winograd"], r["fused_relu"])}). It wins on one BLAS thread for wide layers, so
`set_conv_algorithm("auto")` considers it only when BLAS runs on one thread (see
[`numres/functional/conv_algorithms.py`](../numres/functional/conv_algorithms.py)).""",
        "implicit": f"""**9. Implicit GEMM** ([`numres/functional/implicit_gemm.py`](../numres/functional/implicit_gemm.py),
[docs/implicit_gemm.md](implicit_gemm.md)). Back to the textbook's sum over the kernel offsets, without
its copies: pad the channels-last input once and view it as a matrix of rows, one per padded pixel;
offset `(i, j)` then reads a contiguous slab of rows, so the layer is nine GEMMs accumulated in place
(`C += A_slab @ W_ij`, BLAS's `beta = 1`, called through NumPy's own OpenBLAS), and the backward uses the
same slabs, with no col2im. It is {_than(r["implicit"], r["fused_relu"])} rung 6 and
{_than(r["implicit"], r["reference"])} the textbook ({_memory(r["implicit"], r["fused_relu"])}); this is what
`"auto"` runs for this layer today.""",
    }


def _torch_summary(result):
    rows = {row["rung"]: row for row in result["rows"]}
    if "torch_channels_last" not in rows:
        return "PyTorch was left out of this run (--no-torch)."
    torch_row = rows["torch_channels_last"]
    best = min((row for row in result["rows"] if row["rung"] in NUMBERS), key=total_ms)
    return (f"PyTorch's channels_last unit takes {total_ms(torch_row):.1f} ms forward and backward; the textbook "
            f"{total_ms(rows['reference']):.1f} ms ({total_ms(rows['reference']) / total_ms(torch_row):.2f}x), and "
            f"numres's fastest rung, {NUMBERS[best['rung']]}. {best['rung']}, {total_ms(best):.1f} ms "
            f"({total_ms(best) / total_ms(torch_row):.2f}x).")


def chapter(result):
    machine_info = result["machine"]
    blas = "; ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')} kernel, "
                     f"{b.get('num_threads')} threads)" for b in machine_info["blas"])
    parts = [
        "# From textbook to engine, measured",
        "",
        "<!-- generated by benchmarks/ladder.py; do not edit by hand -->",
        "",
        f"One unit of ResNet-50, {result['unit']}, walked up the ladder of optimisations that numres's engine",
        "actually uses, one change per rung. Each rung computes the same numbers as the textbook (the last",
        "column: its input gradient against the textbook run in float64). Times are medians of "
        f"{result['repeats']} interleaved runs on {result['threads']} threads; peak memory is the arrays "
        "allocated during one forward and backward (tracemalloc).",
        "",
        f"Machine: {machine_info['cpu']}, {machine_info['cores']} cores, {machine_info['vector_width']}; BLAS: {blas}; "
        f"NumPy {result['versions']['numpy']}, PyTorch {result['versions']['torch']}; {result['date']}.",
        "",
        table(result),
        "",
        "## The rungs",
        "",
    ]
    text = paragraphs(result)
    for name, _, _ in RUNGS:
        parts += [text[name], ""]
    parts += [
        "## PyTorch",
        "",
        "The last two rows run the same unit in PyTorch (`Conv2d`, `BatchNorm2d`, `relu`, autograd) in this",
        "process, on the same threads; its convolutions are oneDNN's direct kernels, which read the input",
        "in place instead of building a patch matrix.",
        "",
        _torch_summary(result),
        "",
        "## The settings the run used",
        "",
        "```",
        result["settings"].rstrip(),
        "```",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
