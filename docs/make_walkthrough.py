"""Generate the numbers and pictures of docs/walkthrough.md.

    python docs/make_walkthrough.py                 # the Bottleneck walk-through (a few seconds)
    python docs/make_walkthrough.py --gradflow      # also rerun `numres study gradflow` (seconds)
    python docs/make_walkthrough.py --degradation   # also rerun `numres study degradation` (minutes)

The Bottleneck part follows one block forward and backward with module hooks, checks every
layer's backward and the whole block with ``numres.gradcheck``, and checks the gradient of
every intermediate activation with central differences taken *through the block* (a forward
hook adds +-h to one entry of that activation).  Results go to docs/results/*.json; the
tables between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in walkthrough.md
are rewritten from them, so the prose and the numbers cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # run from a checkout without installing

import numres as nr  # noqa: E402
from numres import study  # noqa: E402
from numres.io import atomic_write  # noqa: E402

RESULTS = os.path.join(HERE, "results")
IMAGES = os.path.join(HERE, "images")
DOC = os.path.join(HERE, "walkthrough.md")

# The block: 16 -> 32 channels, width 8, stride 2, with the torchvision downsample (1x1 conv + BN).
N, C_IN, SIZE, PLANES, STRIDE = 2, 16, 9, 8, 2
SEED = 0
FD_ENTRIES = None        # entries per activation checked through the block (None: every entry)
EPS = 1e-6

STEPS = [                # (module name, what it computes)
    ("conv1", "1x1 conv, reduce 16 -> 8 channels"),
    ("bn1", "BatchNorm + ReLU"),
    ("conv2", "3x3 conv, stride 2 (9x9 -> 5x5)"),
    ("bn2", "BatchNorm + ReLU"),
    ("conv3", "1x1 conv, expand 8 -> 32 channels"),
    ("bn3", "BatchNorm (no ReLU yet)"),
    ("downsample.0", "shortcut: 1x1 conv, stride 2, 16 -> 32"),
    ("downsample.1", "shortcut: BatchNorm"),
]


def build_block():
    """The Bottleneck in float64 with non-trivial BatchNorm affine parameters."""
    from numres.models.resnet import conv1x1
    nr.manual_seed(SEED)
    where = dict(dtype="float64")
    downsample = nr.nn.Sequential(conv1x1(C_IN, PLANES * 4, STRIDE, **where), nr.nn.BatchNorm2d(PLANES * 4, **where))
    block = nr.Bottleneck(C_IN, PLANES, STRIDE, downsample, **where)
    rng = np.random.default_rng(SEED)
    for module in block.modules():
        if isinstance(module, nr.nn.BatchNorm2d):
            module.weight.data[...] = rng.uniform(0.5, 1.5, module.num_features)
            module.bias.data[...] = 0.1 * rng.standard_normal(module.num_features)
    return block.train()


def norm(a) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64)))


def trace(block, x, upstream):
    """Forward and backward with hooks; what each step received and returned."""
    modules = dict(block.named_modules())
    record = {name: {} for name, _ in STEPS}
    order = {"forward": [], "backward": []}
    handles = []
    for name, _ in STEPS:
        def forward_hook(module, inputs, output, name=name):
            record[name].update(input=inputs[0].copy(), output=output.copy())
            order["forward"].append(name)

        def backward_hook(module, grad_input, grad_output, name=name):
            record[name].update(grad_input=grad_input[0].copy(), grad_output=grad_output[0].copy())
            order["backward"].append(name)
        handles += [modules[name].register_forward_hook(forward_hook),
                    modules[name].register_full_backward_hook(backward_hook)]
    block.zero_grad()
    y = block(x)
    dx = block.backward(upstream)
    for handle in handles:
        handle.remove()
    return record, order, y, dx


def fd_through_block(block, x, upstream, name, analytic, rng):
    """Central differences of ``L = sum(block(x) * upstream)`` w.r.t. entries of module ``name``'s output."""
    module = dict(block.named_modules())[name]
    shape = analytic.shape
    picks = (np.arange(analytic.size) if FD_ENTRIES is None or FD_ENTRIES >= analytic.size
             else rng.choice(analytic.size, size=FD_ENTRIES, replace=False))
    numeric, claimed = [], []
    for flat in picks:
        index = np.unravel_index(flat, shape)
        values = []
        for step in (EPS, -EPS):
            def nudge(m, inputs, output, index=index, step=step):
                output = output.copy()
                output[index] += step
                return output
            handle = module.register_forward_hook(nudge)
            values.append(float((block(x) * upstream).sum()))
            handle.remove()
        numeric.append((values[0] - values[1]) / (2 * EPS))
        claimed.append(analytic[index])
    numeric, claimed = np.array(numeric), np.array(claimed)
    return float(np.abs(numeric - claimed).max() / np.abs(numeric).max()), len(picks)


def bottleneck_walkthrough() -> dict:
    block = build_block()
    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((N, C_IN, SIZE, SIZE))
    y_shape = (N, PLANES * 4, (SIZE - 1) // STRIDE + 1, (SIZE - 1) // STRIDE + 1)
    upstream = rng.standard_normal(y_shape)
    record, order, y, dx = trace(block, x, upstream)
    params = dict(block.named_parameters())

    forward = [{"step": name, "what": what, "in_shape": list(record[name]["input"].shape),
                "out_shape": list(record[name]["output"].shape), "out_norm": norm(record[name]["output"])}
               for name, what in STEPS]
    pre_relu = record["bn3"]["output"] + record["downsample.1"]["output"]
    backward = []
    for name in order["backward"]:
        weight = params.get(f"{name}.weight")
        backward.append({"step": name, "grad_out_norm": norm(record[name]["grad_output"]),
                         "grad_in_norm": norm(record[name]["grad_input"]),
                         "weight_grad_norm": None if weight is None else norm(weight.grad),
                         "out_shape": list(record[name]["grad_output"].shape),
                         "in_shape": list(record[name]["grad_input"].shape)})
    main_branch = record["conv1"]["grad_input"]
    shortcut = record["downsample.0"]["grad_input"]
    fork = {
        "x_shape": list(x.shape), "y_shape": list(y.shape), "y_norm": norm(y), "upstream_norm": norm(upstream),
        "relu_open_fraction": float((pre_relu > 0).mean()),
        "grad_sum_norm": norm(record["bn3"]["grad_output"]),
        "same_gradient_into_both_branches": bool(np.array_equal(record["bn3"]["grad_output"],
                                                                record["downsample.1"]["grad_output"])),
        "main_branch_dx_norm": norm(main_branch), "shortcut_dx_norm": norm(shortcut), "dx_norm": norm(dx),
        "cosine_main_shortcut": float((main_branch * shortcut).sum() / (norm(main_branch) * norm(shortcut))),
        "dx_minus_sum_max_abs": float(np.abs(dx - (main_branch + shortcut)).max()),
        "backward_order": order["backward"],
    }

    started = time.perf_counter()
    checks = []
    for name, what in STEPS:
        module = dict(block.named_modules())[name]
        kwargs = {"relu": True} if name in ("bn1", "bn2") else None
        result = nr.gradcheck(module, record[name]["input"], forward_kwargs=kwargs, seed=SEED)
        checks.append({"module": name + (" (+ReLU)" if kwargs else ""), "errors": result.errors,
                       "entries": result.checked})
    whole = nr.gradcheck(block, x, seed=SEED)
    checks.append({"module": "whole Bottleneck", "errors": whole.errors, "entries": whole.checked})
    activations = []
    for name, what in STEPS:
        error, count = fd_through_block(block, x, upstream, name, record[name]["grad_output"], rng)
        activations.append({"activation": f"output of {name}", "entries": count, "error": error})
    seconds = time.perf_counter() - started
    return {"setup": {"N": N, "C_in": C_IN, "size": SIZE, "planes": PLANES, "stride": STRIDE, "seed": SEED,
                      "dtype": "float64", "mode": "train"},
            "forward": forward, "backward": backward, "fork": fork, "gradcheck": checks,
            "activation_checks": activations, "check_seconds": seconds}


# --- markdown tables ------------------------------------------------------------------------------------

def shape(s) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def tables_from(result: dict, gradflow: dict | None, degradation: dict | None) -> dict:
    f = result["fork"]
    t = {}
    rows = [f"| input x | | | {shape(f['x_shape'])} | |"]
    rows += [f"| `{r['step']}` | {r['what']} | {shape(r['in_shape'])} | {shape(r['out_shape'])} | "
             f"{r['out_norm']:.3f} |" for r in result["forward"]]
    rows.append(f"| join | `relu(bn3 + downsample)` | 2 x {shape(f['y_shape'])} | {shape(f['y_shape'])} | "
                f"{f['y_norm']:.3f} |")
    t["forward"] = "\n".join(["| step | operation | input shape | output shape | ‖output‖ |",
                              "|---|---|---|---|---:|"] + rows)

    rows = [f"| loss | `L = sum(y * r)`, r random | | | {f['upstream_norm']:.4f} | {shape(f['y_shape'])} | |",
            f"| join ReLU | `dL/dz = r * (y > 0)`: {100 * f['relu_open_fraction']:.0f}% of entries pass | "
            f"{f['upstream_norm']:.4f} | {shape(f['y_shape'])} | {f['grad_sum_norm']:.4f} | {shape(f['y_shape'])} | |"]
    steps = dict(STEPS)
    for r in result["backward"]:
        weight = "" if r["weight_grad_norm"] is None else f"{r['weight_grad_norm']:.4f}"
        rows.append(f"| `{r['step']}` | {steps[r['step']]} | {r['grad_out_norm']:.4f} | {shape(r['out_shape'])} | "
                    f"{r['grad_in_norm']:.4f} | {shape(r['in_shape'])} | {weight} |")
    rows.append(f"| join at x | main + shortcut | | | {f['dx_norm']:.4f} | {shape(f['x_shape'])} | |")
    t["backward"] = "\n".join(["| step (backward order) | operation | ‖dL/d output‖ (arriving) | shape "
                               "| ‖dL/d input‖ (leaving) | shape | ‖dL/dW‖ |",
                               "|---|---|---:|---|---:|---|---:|"] + rows)

    t["fork"] = "\n".join([
        "| quantity | value |", "|---|---:|",
        f"| ‖dL/d(sum)‖, sent unchanged into both branches | {f['grad_sum_norm']:.4f} |",
        f"| both branches received the identical array | {'yes' if f['same_gradient_into_both_branches'] else 'NO'} |",
        f"| ‖dL/dx‖ through the main branch (conv1's grad_input) | {f['main_branch_dx_norm']:.4f} |",
        f"| ‖dL/dx‖ through the shortcut (downsample.0's grad_input) | {f['shortcut_dx_norm']:.4f} |",
        f"| cosine between the two | {f['cosine_main_shortcut']:.3f} |",
        f"| ‖dL/dx‖ of the block = ‖main + shortcut‖ | {f['dx_norm']:.4f} |",
        f"| max \\|block.backward(r) − (main + shortcut)\\| | {f['dx_minus_sum_max_abs']:.1e} |"])

    rows = []
    for c in result["gradcheck"]:
        for tensor, error in c["errors"].items():
            rows.append(f"| {c['module']} | `{tensor}` | {c['entries'][tensor]} | {error:.1e} |")
    t["gradcheck"] = "\n".join(["| module | tensor | entries checked | worst relative error |",
                                "|---|---|---:|---:|"] + rows)
    rows = [f"| {a['activation']} | {a['entries']} | {a['error']:.1e} |" for a in result["activation_checks"]]
    t["activations"] = "\n".join(["| gradient of | entries checked | worst relative error |",
                                  "|---|---:|---:|"] + rows)
    worst = max(max(c["errors"].values()) for c in result["gradcheck"])
    worst_act = max(a["error"] for a in result["activation_checks"])
    t["worst"] = (f"Worst relative error over all {sum(sum(c['entries'].values()) for c in result['gradcheck'])} "
                  f"gradcheck entries: **{worst:.1e}**; over the activation checks: **{worst_act:.1e}** "
                  f"(central differences, h = {EPS:g}, float64; the checks took {result['check_seconds']:.0f} s).")

    if gradflow:
        rows = []
        for model, s in gradflow["summaries"].items():
            rows.append(f"| {model} | {s['first_input_grad_norm']:.3g} | {s['last_input_grad_norm']:.3g} | "
                        f"{s['first_over_last']:.3g} | {s['first_block_grad_norm']:.3g} | "
                        f"{s['last_block_grad_norm']:.3g} | {s['per_block_factor']:.3f} |")
        t["gradflow"] = "\n".join([
            "| net | ‖dL/d input‖ of conv1 | of fc | conv1 / fc | ‖dL/dx‖ at first block | at last block "
            "| growth per block (backward) |", "|---|---:|---:|---:|---:|---:|---:|"] + rows)
    if degradation:
        rows = []
        for model, history in degradation["histories"].items():
            last = history[-min(3, len(history)):]
            rows.append(f"| {model} | {100 * np.mean([r['train_error'] for r in last]):.1f} | "
                        f"{100 * np.mean([r['test_error'] for r in last]):.1f} | "
                        f"{100 * min(r['train_error'] for r in history):.1f} | "
                        f"{100 * min(r['test_error'] for r in history):.1f} | "
                        f"{sum(r['seconds'] for r in history):.0f} |")
        b = degradation["budget"]
        t["degradation"] = "\n".join([
            f"Budget for every net: {b['epochs']} epochs, batch {b['batch_size']}, SGD lr {b['lr']} "
            f"after {b['warmup_epochs']} warm-up epochs at lr/10 (/10 at 50% and 75%), momentum {b['momentum']}, weight decay {b['weight_decay']}, "
            f"{'1-pixel random shifts' if b['augment'] else 'no augmentation'}, seed {b['seed']}; "
            f"{degradation['total_seconds'] / 60:.1f} min of training in all.", "",
            "| net | train error, last 3 epochs (%) | test error, last 3 epochs (%) | best train error (%) "
            "| best test error (%) | seconds |", "|---|---:|---:|---:|---:|---:|"] + rows)
    return t


def fill(doc_text: str, tables: dict) -> str:
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(doc_text):
            continue
        doc_text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), doc_text)
    return doc_text


def write_json(path, payload):
    atomic_write(path, lambda stream: stream.write(json.dumps(payload, indent=1).encode()))


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return json.load(stream)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gradflow", action="store_true", help="rerun the gradflow study (depth 56)")
    parser.add_argument("--degradation", action="store_true", help="rerun the degradation study (minutes)")
    parser.add_argument("--epochs", type=int, default=study.Budget().epochs, help="degradation epochs")
    args = parser.parse_args(argv)

    result = bottleneck_walkthrough()
    write_json(os.path.join(RESULTS, "walkthrough.json"), result)
    if args.gradflow:
        study.run_gradflow(56, 128, 0, "numpy", RESULTS, IMAGES)
    if args.degradation:
        study.run_degradation((20, 56), study.Budget(epochs=args.epochs), RESULTS, IMAGES)
    tables = tables_from(result, read_json(os.path.join(RESULTS, "gradflow.json")),
                         read_json(os.path.join(RESULTS, "degradation.json")))
    with open(DOC) as stream:
        text = stream.read()
    updated = fill(text, tables)
    atomic_write(DOC, lambda stream: stream.write(updated.encode()))
    print(tables["worst"])
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
