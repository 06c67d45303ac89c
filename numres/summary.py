"""Per-layer table of output shapes, parameters and multiply-accumulates (MACs) of a model.

:func:`summarize` runs one forward pass (eval mode, under :func:`numres.no_grad`) with
forward pre-hooks and hooks on every module, and records for each call its output
shape, its parameter count and its multiply-accumulates (MACs).  Only convolutions
and linear layers count MACs, as in torchvision's published "GFLOPS" (which are MACs);
BatchNorm, ReLU, pooling, additions and biases are left out::

    Conv2d   N * OH * OW * out_channels * (in_channels / groups) * kh * kw
    Linear   (number of input rows) * in_features * out_features

With ``shapes_only=True`` the leaf layers do not compute: each returns a zero-strided
array of its output shape (computed from its arguments), so even ResNet-152 at 224 x 224
is summarised in a fraction of a second.  Containers and blocks still run their own
``forward`` (joins, reshapes) on those placeholders.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np

from .functional.conv import conv_output_hw
from .functional.pooling import adaptive_output_size, pool_geometry
from .nn import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Flatten, Identity, Linear, MaxPool2d, ReLU,
                 no_grad)


class LayerRow(NamedTuple):
    """One module call of the summarised forward pass."""
    name: str             # dotted name, as in named_modules() ("layer1.0.conv1")
    type: str             # class name
    depth: int            # nesting level below the model (1 = a direct child)
    output_shape: tuple
    params: int           # parameters of the module and its children
    macs: int             # multiply-accumulates of this call, children included
    leaf: bool            # True when the module has no children


class Summary(NamedTuple):
    rows: list
    input_shape: tuple
    total_params: int
    total_macs: int


# --- MACs ------------------------------------------------------------------------------------------

def conv2d_macs(module, input_shape, output_shape) -> int:
    """``N * OH * OW * O * (I / groups) * kh * kw``."""
    n, out_channels, oh, ow = output_shape
    kh, kw = module.kernel_size
    return n * oh * ow * out_channels * (module.in_channels // module.groups) * kh * kw


def linear_macs(module, input_shape, output_shape) -> int:
    """``rows * in_features * out_features`` (rows: the product of the leading dimensions)."""
    return math.prod(input_shape[:-1]) * module.in_features * module.out_features


MAC_RULES = {Conv2d: conv2d_macs, Linear: linear_macs}


def _macs(module, input_shape, output_shape) -> int:
    for cls in type(module).__mro__:
        if cls in MAC_RULES:
            return int(MAC_RULES[cls](module, input_shape, output_shape))
    return 0


# --- output shapes without computing (shapes_only) ---------------------------------------------------

def _conv2d_shape(module, x):
    module.check_input(x, ndim=4, channels=module.in_channels)
    n, _, h, w = x.shape
    oh, ow = conv_output_hw((h, w), module.kernel_size, module.stride, module.padding, module.dilation)
    return (n, module.out_channels, oh, ow)


def _batchnorm_shape(module, x):
    module.check_input(x, ndim=4, channels=module.num_features)
    return tuple(x.shape)


def _same_shape(module, x):
    return tuple(x.shape)


def _maxpool_shape(module, x):
    module.check_input(x, ndim=4)
    geometry = pool_geometry(x.shape, module.kernel_size, module.stride, module.padding, module.dilation,
                             module.ceil_mode)
    return (*x.shape[:2], *geometry.out_hw)


def _avgpool_shape(module, x):
    module.check_input(x, ndim=4)
    geometry = pool_geometry(x.shape, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode)
    return (*x.shape[:2], *geometry.out_hw)


def _adaptive_shape(module, x):
    module.check_input(x, ndim=4)
    return (*x.shape[:2], *adaptive_output_size(x.shape, module.output_size))


def _linear_shape(module, x):
    if x.ndim < 1 or x.shape[-1] != module.in_features:
        raise ValueError(f"Linear expects inputs whose last dimension is in_features={module.in_features}, "
                         f"got shape {tuple(x.shape)}")
    return (*x.shape[:-1], module.out_features)


def _flatten_shape(module, x):
    start, end = module.start_dim % x.ndim, module.end_dim % x.ndim
    return (*x.shape[:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:])


SHAPE_RULES = {Conv2d: _conv2d_shape, BatchNorm2d: _batchnorm_shape, ReLU: _same_shape, Identity: _same_shape,
               MaxPool2d: _maxpool_shape, AvgPool2d: _avgpool_shape, AdaptiveAvgPool2d: _adaptive_shape,
               Linear: _linear_shape, Flatten: _flatten_shape}


def _placeholder(xp, shape, dtype):
    """An array of ``shape`` that occupies one element of memory (all strides zero, read-only)."""
    return xp.broadcast_to(xp.zeros((), dtype=dtype), tuple(shape))


def _shape_forward(module, rule):
    def forward(x, **kwargs):
        return _placeholder(module.xp, rule(module, x), x.dtype)
    return forward


def _materialising_forward(module, forward):
    """For a leaf with no shape rule: run the real forward on a writable copy of the placeholder."""
    def run(x, **kwargs):
        return forward(module.xp.ascontiguousarray(x), **kwargs)
    return run


@contextlib.contextmanager
def _shapes_only(model):
    """Within this block every leaf module of ``model`` returns a placeholder of its output shape."""
    patched = []
    try:
        for module in model.modules():
            if next(module.children(), None) is not None:
                continue
            rule = next((SHAPE_RULES[cls] for cls in type(module).__mro__ if cls in SHAPE_RULES), None)
            replacement = _shape_forward(module, rule) if rule else _materialising_forward(module, module.forward)
            module.__dict__["forward"] = replacement     # an instance attribute shadows the class's forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode inside the block (no BN statistics updates), each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.__dict__["training"] = mode


# --- the summary ---------------------------------------------------------------------------------------

def summarize(model, input_shape=(1, 3, 224, 224), shapes_only: bool = False, seed: int = 0) -> Summary:
    """Per-layer rows (in call order) and totals for one forward pass of ``model`` on ``input_shape``.

    The input is standard normal noise on the model's backend and dtype.  The model's
    training flags are restored afterwards and no state changes (eval mode, no_grad).
    """
    input_shape = tuple(int(n) for n in input_shape)
    if any(n < 1 for n in input_shape):
        raise ValueError(f"input shape must be positive, got {input_shape}")
    names = {id(module): name for name, module in model.named_modules()}
    rows, stack, handles = [], [], []

    def before(module, inputs):
        stack.append((len(rows), module))
        rows.append(None)                         # filled in when the call returns, keeping entry order

    def after(module, inputs, output):
        index, _ = stack.pop()
        own = _macs(module, tuple(inputs[0].shape), tuple(output.shape))
        nested = sum(row.macs for row in rows[index + 1:] if row is not None and row.depth == len(stack) + 1)
        name = names.get(id(module), "?")
        rows[index] = LayerRow(name, type(module).__name__, len(stack), tuple(output.shape),
                               sum(p.size for p in module.parameters()), own + nested,
                               next(module.children(), None) is None)

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    xp = model.xp
    try:
        with _eval_mode(model), no_grad(), (_shapes_only(model) if shapes_only else contextlib.nullcontext()):
            if shapes_only:
                x = _placeholder(xp, input_shape, model.dtype)
            else:
                x = xp.asarray(np.random.default_rng(seed).standard_normal(input_shape), dtype=model.dtype)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    root, layers = rows[0], rows[1:]
    return Summary(layers, input_shape, sum(int(p.size) for p in model.parameters()), root.macs)


def format_summary(summary: Summary, title: str = "") -> str:
    """The table as text: one line per module call, indented by depth, then the totals."""
    header = ("Layer", "Type", "Output shape", "Params", "MACs")
    lines = [[("  " * (row.depth - 1)) + row.name, row.type, " x ".join(map(str, row.output_shape)),
              f"{row.params:,}", f"{row.macs:,}"] for row in summary.rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = []
    if title:
        out.append(f"{title}, input {' x '.join(map(str, summary.input_shape))}")
    out += [rule, fmt.format(*header), rule, *(fmt.format(*line) for line in lines), rule]
    out.append(f"Total params: {summary.total_params:,}")
    out.append(f"Total MACs:   {summary.total_macs:,} ({summary.total_macs / 1e9:.3f} G)")
    return "\n".join(out)
