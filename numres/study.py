"""Tools to study backpropagation inside a ResNet, and the ``numres study`` command.

**Gradient flow.**  For a network ``f = f_L o ... o f_1`` the gradient that reaches
layer ``k`` is the product of the layers' Jacobians above it::

    dL/dx_k = J_{k+1}^T J_{k+2}^T ... J_L^T dL/dx_L

so its norm can shrink or grow geometrically with depth.  A residual block computes
``y = x + F(x)``, whose Jacobian is ``I + F'(x)``: the product becomes a sum over
paths, one of which is the identity all the way down, and the early layers keep
receiving the loss's gradient undamped.  :func:`gradient_flow` measures this: one
forward and backward pass with hooks on every Conv2d and Linear, recording

* ``input_grad_norm``  = ``||dL/d(layer input)||``  (the ``grad_input`` its backward hook sees),
* ``weight_grad_norm`` = ``||dL/dW||`` and ``weight_norm`` = ``||W||`` (Frobenius norms),
* ``ratio``            = ``||dL/dW|| / ||W||``, the relative size of one SGD step (times lr).

A layer's ``grad_input`` inside a residual block is only the residual branch's share of
the gradient; the full ``dL/dx`` at a block's input (branch + shortcut) is recorded too,
per block, in :attr:`GradientFlow.blocks`.

**Commands.**

* ``numres study gradflow`` compares plain56 and resnet56 (``--depth``) at initialisation
  on a batch of the embedded digits (CSV + PNG).
* ``numres study degradation`` trains plain and residual nets of two depths (20 and 56 by
  default) with the same budget on the digits and saves training and test error per
  epoch (CSV + JSON + PNG), the shape of Figures 1 and 6 of He et al. 2015.

matplotlib is imported only when a picture is drawn.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import backend as B
from . import init
from .data import AUGMENTATION, DataLoader, load_dataset
from .io import atomic_write
from .models.cifar import CIFAR_MODELS, PlainBlock
from .models.resnet import BasicBlock, Bottleneck
from .nn import Conv2d, CrossEntropyLoss, Linear, no_grad
from .optim import SGD

DEPTHS = (20, 32, 44, 56, 110)


# --- gradient flow ------------------------------------------------------------------------------------

@dataclass
class LayerFlow:
    """One Conv2d or Linear layer's gradient statistics (host floats)."""

    name: str
    kind: str
    input_shape: tuple
    input_grad_norm: float
    weight_grad_norm: float
    weight_norm: float

    @property
    def ratio(self) -> float:
        """``||dL/dW|| / ||W||`` (infinite for an all-zero weight with a gradient)."""
        if self.weight_norm > 0:
            return self.weight_grad_norm / self.weight_norm
        return math.inf if self.weight_grad_norm > 0 else math.nan

    def as_dict(self) -> dict:
        row = asdict(self)
        row["input_shape"] = "x".join(str(size) for size in self.input_shape)
        row["ratio"] = self.ratio
        return row


FLOW_FIELDS = ("name", "kind", "input_shape", "input_grad_norm", "weight_grad_norm", "weight_norm", "ratio")


@dataclass
class GradientFlow:
    """The rows of :func:`gradient_flow` in forward order, the batch's loss, and ``blocks``:
    ``{block name: ||dL/d(block input)||}`` for every residual or plain block, in forward order."""

    rows: list
    loss: float
    blocks: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, key):
        """A row by position or by layer name."""
        if isinstance(key, str):
            for row in self.rows:
                if row.name == key:
                    return row
            raise KeyError(f"no Conv2d/Linear layer named {key!r}")
        return self.rows[key]

    @property
    def names(self) -> list:
        return [row.name for row in self.rows]

    def column(self, field: str) -> np.ndarray:
        """One statistic for every layer, e.g. ``flow.column("input_grad_norm")``."""
        if field not in FLOW_FIELDS[3:]:
            raise ValueError(f"unknown column {field!r}; choose one of {', '.join(FLOW_FIELDS[3:])}")
        return np.array([getattr(row, field) for row in self.rows], dtype=np.float64)

    def __str__(self):
        width = max(len(name) for name in self.names)
        lines = [f"{'layer':<{width}}  {'input':>11}  {'|dL/dx|':>9}  {'|dL/dW|':>9}  {'|W|':>9}  {'ratio':>9}"]
        for row in self.rows:
            lines.append(f"{row.name:<{width}}  {'x'.join(map(str, row.input_shape)):>11}  "
                         f"{row.input_grad_norm:9.3e}  {row.weight_grad_norm:9.3e}  {row.weight_norm:9.3e}  "
                         f"{row.ratio:9.3e}")
        return "\n".join(lines)


def _norm(array):
    """Frobenius norm in float64, left on the array's backend (a 0-d array: no host round-trip)."""
    xp = B.xp_of(array)
    flat = array.reshape(-1).astype(xp.float64, copy=False)
    return xp.sqrt(flat @ flat)


def gradient_flow(model, x, y, criterion=None) -> GradientFlow:
    """Per-layer gradient statistics of one forward and backward pass of ``model`` on ``(x, y)``.

    The loss is ``criterion(model(x), y)`` (cross-entropy by default).  Every Conv2d and
    Linear gets a forward hook (its input shape and the forward order) and a full
    backward hook (the norm of its ``grad_input``); all hooks are removed again, even
    when something fails.  The model runs in its current mode (training mode uses batch
    statistics and updates BatchNorm's running statistics, as any training forward does).
    Gradients already held in ``p.grad`` are cleared first, so afterwards ``p.grad`` holds
    exactly this batch's gradients.  Each layer must run once per forward.
    """

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, (Conv2d, Linear))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to study")
    blocks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (BasicBlock, Bottleneck, PlainBlock))]
    criterion = criterion or CrossEntropyLoss(backend=model.backend, dtype=model.dtype)
    order, input_shapes, grad_norms, block_norms = [], {}, {}, {}

    def on_forward(name):
        def hook(module, inputs, output):
            if name in input_shapes:
                raise RuntimeError(f"layer {name!r} ran more than once in one forward pass; gradient_flow "
                                   f"needs every Conv2d/Linear to be used exactly once")
            order.append(name)
            input_shapes[name] = tuple(int(size) for size in inputs[0].shape)
        return hook

    def on_backward(name):
        def hook(module, grad_input, grad_output):
            grad = grad_input[0]
            grad_norms[name] = None if grad is None else _norm(grad)
        return hook

    def on_block_backward(name):
        def hook(module, grad_input, grad_output):
            if grad_input[0] is not None:
                block_norms[name] = _norm(grad_input[0])
        return hook

    handles = []
    try:
        for name, module in layers:
            handles.append(module.register_forward_hook(on_forward(name)))
            handles.append(module.register_full_backward_hook(on_backward(name)))
        for name, module in blocks:
            handles.append(module.register_full_backward_hook(on_block_backward(name)))
        model.zero_grad()
        loss = criterion(model(x), y)
        model.backward(criterion.backward())
    finally:
        for handle in handles:
            handle.remove()
    flow = _collect_rows(model.xp, dict(layers), order, input_shapes, grad_norms, loss)
    names = list(block_norms)[::-1]              # backward runs the blocks in reverse forward order
    if names:
        host = B.to_numpy(model.xp.stack([block_norms[name] for name in names]))
        flow.blocks = {name: float(value) for name, value in zip(names, host)}
    return flow


def _collect_rows(xp, modules, order, input_shapes, grad_norms, loss) -> GradientFlow:
    """Turn the device-side norms into host floats, all in one transfer."""
    missing = [name for name in order if name not in grad_norms]
    if missing:
        raise RuntimeError(f"backward never reached {', '.join(missing)}: does the model's backward call every "
                           f"layer's backward?")
    values = []
    for name in order:
        weight = modules[name].weight
        if weight.grad is None:
            raise RuntimeError(f"layer {name!r} has no weight gradient after backward")
        grad_in = grad_norms[name]
        values += [xp.asarray(math.nan) if grad_in is None else grad_in, _norm(weight.grad), _norm(weight.data)]
    values.append(loss)
    host = B.to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in values]))
    rows = []
    for index, name in enumerate(order):
        grad_in, grad_w, weight = (float(v) for v in host[3 * index:3 * index + 3])
        rows.append(LayerFlow(name, type(modules[name]).__name__, input_shapes[name], grad_in, grad_w, weight))
    return GradientFlow(rows, float(host[-1]))


# --- small file helpers -------------------------------------------------------------------------------

def _write_text(path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_csv(path, rows, fields) -> None:
    """``rows`` (dicts) as CSV with the columns ``fields``, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buffer.getvalue())


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no PNG was drawn (the CSV has the numbers); "
              "install it with `pip install matplotlib`", file=sys.stderr)
        return None
    return plt


def _save_figure(figure, path) -> None:
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=110))


def _one_blas_thread(backend):
    """One BLAS thread on the CPU (threadpoolctl), else a no-op.

    The GEMMs of 8x8 digits are too small to split; with several BLAS threads on a busy
    machine an epoch of plain56 measured 29-55 s instead of 4-5 s.
    """
    if backend != "numpy":
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# --- the digits, ready for a CIFAR net ----------------------------------------------------------------

def _digits_loader(split, batch_size, *, subset=None, shuffle=False, augment=False, seed=0, backend="numpy",
                   dtype="float32"):
    """A loader over the embedded digits, normalised with the training split's mean and std."""
    train = load_dataset("digits", "train")
    mean, std = train.channel_stats()
    data = train if split == "train" else load_dataset("digits", split)
    if subset is not None:
        data = data.subset(subset)
    options = AUGMENTATION["digits"] if augment else {}
    return DataLoader(data, min(batch_size, len(data)), shuffle=shuffle, seed=seed, mean=mean, std=std,
                      drop_last=shuffle, backend=backend, dtype=dtype, **options)


def _build(name, seed, backend="numpy", dtype="float32"):
    """A CIFAR net for 1-channel, 10-class digits, initialised from ``seed``."""
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; choose one of {', '.join(CIFAR_MODELS)}")
    init.manual_seed(seed)
    return CIFAR_MODELS[name](num_classes=10, in_channels=1, backend=backend, dtype=dtype)


def _check_depth(depth):
    if depth not in DEPTHS:
        raise ValueError(f"depth {depth} is not one of the paper's CIFAR depths {DEPTHS}")


# --- numres study gradflow ------------------------------------------------------------------------------

def gradflow_experiment(depth=56, batch_size=128, seed=0, backend="numpy") -> dict:
    """``{"plain56": GradientFlow, "resnet56": GradientFlow}`` at initialisation, on one digits batch.

    Both nets start from the same seed and see the same first ``batch_size`` training
    images (no augmentation), in training mode, as on the first step of training.
    """
    _check_depth(depth)
    x, y = next(iter(_digits_loader("train", batch_size, backend=backend)))
    flows = {}
    for kind in ("plain", "resnet"):
        model = _build(f"{kind}{depth}", seed, backend).train()
        flows[f"{kind}{depth}"] = gradient_flow(model, x, y)
    return flows


def flow_records(flows: dict) -> list:
    """One CSV record per (model, layer)."""
    return [dict(model=model, index=index, **row.as_dict())
            for model, flow in flows.items() for index, row in enumerate(flow, start=1)]


def block_records(flows: dict) -> list:
    """One CSV record per (model, block): the full gradient at the block's input."""
    return [dict(model=model, index=index, block=name, input_grad_norm=value)
            for model, flow in flows.items() for index, (name, value) in enumerate(flow.blocks.items(), start=1)]


def flow_summary(flow: GradientFlow) -> dict:
    """First/last layer input-gradient norms, their ratio, the spread over all layers, and the same for blocks."""
    norms = flow.column("input_grad_norm")
    summary = {"first_layer": flow.rows[0].name, "last_layer": flow.rows[-1].name,
               "first_input_grad_norm": float(norms[0]), "last_input_grad_norm": float(norms[-1]),
               "first_over_last": float(norms[0] / norms[-1]),
               "max_over_min": float(np.nanmax(norms) / np.nanmin(norms)), "loss": flow.loss}
    if flow.blocks:
        values = list(flow.blocks.values())
        summary.update(first_block_grad_norm=values[0], last_block_grad_norm=values[-1],
                       blocks_first_over_last=values[0] / values[-1],
                       per_block_factor=(values[0] / values[-1]) ** (1 / max(len(values) - 1, 1)))
    return summary


def plot_gradflow(flows: dict, path) -> bool:
    """Per-layer ``||dL/d input||``, per-block ``||dL/dx||`` and ``||dL/dW|| / ||W||`` (log scale) for each net.

    Returns False (and draws nothing) without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return False
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    for (model, flow), style in zip(flows.items(), ("o-", "s-", "^-", "v-")):
        layers = np.arange(1, len(flow) + 1)
        left.semilogy(layers, flow.column("input_grad_norm"), style, markersize=3, label=model)
        right.semilogy(layers, flow.column("ratio"), style, markersize=3, label=model)
        if flow.blocks:
            middle.semilogy(np.arange(1, len(flow.blocks) + 1), list(flow.blocks.values()), style, markersize=4,
                            label=model)
    left.set_title("each layer's input gradient ||dL/d input||")
    middle.set_title("gradient at each block's input (shortcut included)")
    right.set_title("relative weight gradient ||dL/dW|| / ||W||")
    left.set_xlabel("layer (forward order: 1 = first conv, last = fc)")
    middle.set_xlabel("block (forward order)")
    right.set_xlabel("layer (forward order: 1 = first conv, last = fc)")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    figure.suptitle("At initialisation, one batch of digits (training mode)")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return True


def run_gradflow(depth=56, batch_size=128, seed=0, backend="numpy", out_dir=".", png_dir=None,
                 log=print) -> dict:
    """Run :func:`gradflow_experiment` and write, into ``out_dir``, gradflow.csv (per layer),
    gradflow_blocks.csv (per block), gradflow.json (summaries) and gradflow.png (into ``png_dir``
    if given); print a summary and return the summaries."""
    with _one_blas_thread(backend):
        flows = gradflow_experiment(depth, batch_size, seed, backend)
    summaries = {model: flow_summary(flow) for model, flow in flows.items()}
    csv_path = os.path.join(out_dir, "gradflow.csv")
    write_csv(csv_path, flow_records(flows), ("model", "index") + FLOW_FIELDS)
    write_csv(os.path.join(out_dir, "gradflow_blocks.csv"), block_records(flows),
              ("model", "index", "block", "input_grad_norm"))
    settings = dict(depth=depth, batch_size=batch_size, seed=seed, backend=backend)
    _write_text(os.path.join(out_dir, "gradflow.json"), json.dumps(dict(settings, summaries=summaries), indent=1))
    log(f"wrote {csv_path}, gradflow_blocks.csv and gradflow.json")
    png_path = os.path.join(png_dir or out_dir, "gradflow.png")
    if plot_gradflow(flows, png_path):
        log(f"wrote {png_path}")
    for model, s in summaries.items():
        log(f"{model:>9}: loss {s['loss']:.3f}; ||dL/d input|| of the first layer ({s['first_layer']}) "
            f"{s['first_input_grad_norm']:.3e}, of the last ({s['last_layer']}) {s['last_input_grad_norm']:.3e}: "
            f"first/last = {s['first_over_last']:.3g} (max/min over layers {s['max_over_min']:.3g})")
        if "blocks_first_over_last" in s:
            log(f"{'':>9}  at the block inputs: first/last = {s['blocks_first_over_last']:.3g}, "
                f"a factor {s['per_block_factor']:.3f} per block")
    return summaries


# --- numres study degradation ---------------------------------------------------------------------------

CURVE_FIELDS = ("model", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "seconds")


@dataclass
class Budget:
    """The training budget every net gets (the paper's recipe, scaled down to the digits)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    warmup_epochs: int = 2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    subset: int | None = None
    seed: int = 0
    backend: str = "numpy"

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in 0..epochs-1, got {self.warmup_epochs} for {self.epochs} epochs")
        if self.subset is not None and self.subset < 2:
            raise ValueError(f"subset must be at least 2 images, got {self.subset}")

    def lr_at(self, epoch: int) -> float:
        """The paper's step schedule: ``lr / 10`` for the warm-up epochs (its remedy for very deep nets,
        here given to every net alike), then ``lr``, divided by 10 at 50% and again at 75% of the
        epochs (``epoch`` counts from 0)."""
        if epoch < self.warmup_epochs:
            return self.lr * 0.1
        drops = sum(epoch >= milestone for milestone in (self.epochs // 2, (3 * self.epochs) // 4) if milestone > 0)
        return self.lr * 0.1 ** drops


def _error_and_loss(model, loader, criterion):
    """Test error and mean loss in eval mode (host floats, one transfer)."""
    xp = model.xp
    wrong = xp.zeros((), dtype=xp.float64)
    loss_sum = xp.zeros((), dtype=xp.float64)
    seen = 0
    model.eval()
    try:
        with no_grad():
            for x, y in loader:
                logits = model(x)
                loss_sum += criterion(logits, y).astype(xp.float64) * len(y)
                wrong += (logits.argmax(axis=1) != y).sum()
                seen += len(y)
    finally:
        model.train()
    wrong, loss_sum = B.to_numpy(xp.stack([wrong, loss_sum]))
    return float(wrong) / seen, float(loss_sum) / seen


def train_curve(name: str, budget: Budget, log=print) -> list:
    """Train one net on the digits with ``budget``; one record per epoch (errors are fractions).

    ``train_error`` is measured during the epoch (training mode, augmented batches, the
    weights changing), as in the paper's curves; ``test_error`` in eval mode at its end.
    """
    model = _build(name, budget.seed, budget.backend).train()
    xp = model.xp
    train = _digits_loader("train", budget.batch_size, subset=budget.subset, shuffle=True, augment=budget.augment,
                           seed=budget.seed, backend=budget.backend)
    test = _digits_loader("test", 512, subset=budget.subset, backend=budget.backend)
    criterion = CrossEntropyLoss(backend=budget.backend)
    optimizer = SGD(model.parameters(), lr=budget.lr, momentum=budget.momentum, weight_decay=budget.weight_decay)
    history = []
    for epoch in range(budget.epochs):
        lr = budget.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        wrong = xp.zeros((), dtype=xp.float64)
        loss_sum = xp.zeros((), dtype=xp.float64)
        seen = 0
        for x, y in train:
            logits = model(x)
            try:
                loss = criterion(logits, y)
            except FloatingPointError as error:
                raise FloatingPointError(f"{name}, epoch {epoch + 1}: {error}; try a lower --lr") from None
            wrong += (logits.argmax(axis=1) != y).sum()
            loss_sum += loss.astype(xp.float64) * len(y)
            model.backward(criterion.backward(), need_input_grad=False)
            optimizer.step()
            optimizer.zero_grad()
            seen += len(y)
        train_wrong, train_loss = B.to_numpy(xp.stack([wrong, loss_sum]))
        if not math.isfinite(float(train_loss)):
            raise FloatingPointError(f"{name}: the training loss became {float(train_loss)} in epoch {epoch + 1}; "
                                     f"try a lower --lr")
        test_error, test_loss = _error_and_loss(model, test, criterion)
        record = {"model": name, "epoch": epoch + 1, "lr": lr, "train_loss": float(train_loss) / seen,
                  "train_error": float(train_wrong) / seen, "test_loss": test_loss, "test_error": test_error,
                  "seconds": time.perf_counter() - started}
        history.append(record)
        log(f"{name:>9} epoch {epoch + 1:>3}/{budget.epochs}  lr {lr:.3g}  train error "
            f"{100 * record['train_error']:5.1f}%  test error {100 * test_error:5.1f}%  ({record['seconds']:.1f}s)")
    return history


def plot_degradation(histories: dict, path) -> bool:
    """Plain nets (left) and ResNets (right): training error dashed, test error bold, as in the paper's Fig. 6."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    depths = sorted({int(re.sub(r"\D", "", name)) for name in histories})
    colours = dict(zip(depths, ("tab:orange", "tab:red", "tab:green", "tab:blue", "tab:purple")))
    for axis, kind, title in ((axes[0], "plain", "plain networks"), (axes[1], "resnet", "ResNets")):
        for depth in depths:
            history = histories.get(f"{kind}{depth}")
            if not history:
                continue
            epochs = [r["epoch"] for r in history]
            colour = colours[depth]
            axis.plot(epochs, [100 * r["train_error"] for r in history], "--", color=colour, linewidth=1,
                      label=f"{kind}-{depth} train")
            axis.plot(epochs, [100 * r["test_error"] for r in history], "-", color=colour, linewidth=2.2,
                      label=f"{kind}-{depth} test")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("error (%)")
    figure.suptitle("Digits (8x8): training error (dashed) and test error (bold), same budget for every net")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return True


def degradation_verdict(histories: dict, shallow: int, deep: int, last: int = 3) -> dict:
    """Final errors (mean of the last ``last`` epochs, in %) and whether the deep net came out worse."""
    def tail(name, key):
        values = [r[key] for r in histories[name][-last:]]
        return 100 * float(np.mean(values))

    verdict = {}
    if shallow == deep:
        return verdict
    for kind in ("plain", "resnet"):
        a, b = f"{kind}{shallow}", f"{kind}{deep}"
        if a not in histories or b not in histories:
            continue
        verdict[kind] = {key: {a: tail(a, key), b: tail(b, key)} for key in ("train_error", "test_error")}
        verdict[kind]["deep_worse_train"] = verdict[kind]["train_error"][b] > verdict[kind]["train_error"][a]
        verdict[kind]["deep_worse_test"] = verdict[kind]["test_error"][b] > verdict[kind]["test_error"][a]
    return verdict


def run_degradation(depths=(20, 56), budget: Budget | None = None, out_dir=".", png_dir=None, log=print) -> dict:
    """Train ``plain{d}`` and ``resnet{d}`` for each depth; write degradation.csv/.json (and .png)."""
    budget = budget or Budget()
    for depth in depths:
        _check_depth(depth)
    if len(depths) < 1:
        raise ValueError("give at least one depth")
    histories = {}
    started = time.perf_counter()
    with _one_blas_thread(budget.backend):
        for kind in ("plain", "resnet"):
            for depth in depths:
                histories[f"{kind}{depth}"] = train_curve(f"{kind}{depth}", budget, log)
    total = time.perf_counter() - started
    csv_path = os.path.join(out_dir, "degradation.csv")
    write_csv(csv_path, [r for h in histories.values() for r in h], CURVE_FIELDS)
    shallow, deep = min(depths), max(depths)
    verdict = degradation_verdict(histories, shallow, deep, last=min(3, budget.epochs))
    summary = {"budget": asdict(budget), "depths": list(depths), "total_seconds": total, "verdict": verdict,
               "histories": histories}
    json_path = os.path.join(out_dir, "degradation.json")
    _write_text(json_path, json.dumps(summary, indent=1))
    log(f"wrote {csv_path} and {json_path} ({total:.0f} s of training)")
    png_path = os.path.join(png_dir or out_dir, "degradation.png")
    if plot_degradation(histories, png_path):
        log(f"wrote {png_path}")
    for kind, v in verdict.items():
        a, b = f"{kind}{shallow}", f"{kind}{deep}"
        log(f"{kind:>6}: training error {a} {v['train_error'][a]:.1f}% vs {b} {v['train_error'][b]:.1f}%, "
            f"test error {v['test_error'][a]:.1f}% vs {v['test_error'][b]:.1f}% (mean of the last epochs): "
            f"the deeper net is {'worse' if v['deep_worse_train'] else 'not worse'} on training error")
    return summary
