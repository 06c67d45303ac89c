"""The textbook tier, numres.reference: every forward/backward pair against PyTorch, against
central finite differences, and against its engine counterpart in numres.functional.

Each case below is a small "spec": the op's inputs and a forward/backward written against an
``ops`` namespace, so the same spec runs on ``numres.reference`` and on ``numres.functional``
(which also checks that their signatures and return values match).  PyTorch computes the truth
in float64; a float32 run is judged against that float64 truth.  Upstream gradients are random.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import numres as nr
import numres.functional as engine
import numres.reference as R
from conftest import TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

FD_TOL = 1e-6          # central differences with h = 1e-6 in float64 are good to about 1e-9
WORST: dict[str, float] = {}


def record(kind, error):
    WORST[kind] = max(WORST.get(kind, 0.0), float(error))
    return error


def teardown_module():
    print("\nworst relative errors of numres.reference:", {k: f"{v:.1e}" for k, v in sorted(WORST.items())})


@dataclass
class Spec:
    """One op on fixed inputs.

    ``forward(ops, arrays) -> (y, cache)`` and ``backward(ops, dy, cache) -> {name: gradient}`` call
    ``ops.<name>`` with the signature modules use; ``torch_forward(tensors) -> y`` is the truth.
    ``state()`` returns arrays the forward updates in place (running statistics), compared too.
    """
    arrays: dict
    differentiable: tuple
    forward: Callable
    backward: Callable
    torch_forward: Callable
    engine: bool = True                  # the engine accepts these arguments too
    torch: bool = True                   # PyTorch defines the result
    fd: bool = True                      # backward is the derivative (not a convention at a tie)
    state: Callable = field(default=lambda: {})
    torch_state: Callable = field(default=lambda: {})


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# --- the specs -------------------------------------------------------------------------------------

CONV_CASES = [   # N, C, H, W, O, kernel, stride, padding, dilation, groups, bias
    (2, 3, 7, 6, 4, 3, 1, 1, 1, 1, True),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1, False),            # stride 2, odd input
    (1, 4, 8, 9, 4, (3, 2), (2, 1), (1, 0), 2, 2, True),   # batch 1, dilation, groups, rectangles
    (3, 6, 5, 5, 6, 3, 1, 2, 2, 3, True),
    (2, 4, 1, 1, 5, 1, 1, 0, 1, 1, True),             # 1x1 spatial, 1x1 kernel
    (2, 3, 6, 5, 4, 1, 2, 0, 1, 1, False),            # the strided 1x1 downsample
    (2, 8, 5, 6, 8, 3, 1, 1, 1, 8, False),            # depthwise
    (2, 3, 6, 7, 2, (2, 4), 1, "same", (2, 1), 1, True),   # "same" with odd totals: extra cell bottom/right
    (2, 3, 6, 7, 2, 3, 2, "valid", 1, 1, True),
    (2, 3, 6, 7, 2, 3, 2, ((2, 0), (1, 2)), 1, 1, True),   # explicit ((top, bottom), (left, right))
]


def conv_spec(n, c, h, w, o, kernel, stride, padding, dilation, groups, bias):
    rng = _rng("conv", n, c, h, w, o, kernel, stride, padding, dilation, groups)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    arrays = {"x": rng.standard_normal((n, c, h, w)), "weight": rng.standard_normal((o, c // groups, kh, kw))}
    if bias:
        arrays["bias"] = rng.standard_normal(o)

    def forward(ops, a):
        return ops.conv2d_forward(a["x"], a["weight"], a.get("bias"), stride, padding, dilation, groups)

    def backward(ops, dy, cache):
        dx, dweight, dbias = ops.conv2d_backward(dy, cache, True, need_weight_grad=True,
                                                  need_bias_grad=bias)
        assert (dbias is None) == (not bias)
        return {"x": dx, "weight": dweight, "bias": dbias}

    def torch_forward(t):
        x, torch_padding = t["x"], padding
        if isinstance(padding, tuple) and isinstance(padding[0], tuple):
            (top, bottom), (left, right) = padding
            x, torch_padding = TF.pad(x, (left, right, top, bottom)), 0
        return TF.conv2d(x, t["weight"], t.get("bias"), stride, torch_padding, dilation, groups)

    explicit_pairs = isinstance(padding, tuple) and isinstance(padding[0], tuple)
    return Spec(arrays, tuple(arrays), forward, backward, torch_forward, engine=not explicit_pairs)


BN_CASES = [   # shape, training, relu, weight, bias, track (update the running statistics)
    ((4, 3, 5, 7), True, False, True, True, True),
    ((2, 5, 3, 3), True, True, True, True, True),
    ((1, 4, 3, 1), True, False, True, True, True),     # batch 1
    ((6, 3, 1, 1), True, True, True, True, True),      # 1x1 spatial
    ((3, 4, 2, 3), True, False, False, False, True),   # affine=False
    ((3, 4, 2, 3), True, True, True, False, False),    # bias=False, no running statistics
    ((4, 3, 5, 7), False, False, True, True, True),    # evaluation
    ((2, 5, 3, 3), False, True, True, True, True),
    ((3, 4, 2, 3), False, False, False, False, True),
]


def bn_spec(shape, training, relu, has_weight, has_bias, track):
    rng = _rng("bn", shape, training, relu, has_weight, has_bias, track)
    c = shape[1]
    arrays = {"x": rng.standard_normal(shape) * 2.0 + 0.5}
    if has_weight:
        arrays["weight"] = rng.standard_normal(c)
    if has_bias:
        arrays["bias"] = rng.standard_normal(c)
    running = (rng.standard_normal(c) * 0.3, rng.uniform(0.5, 2.0, c))
    updated = {}

    def forward(ops, a):
        mean, var = (s.astype(a["x"].dtype) for s in running)     # fresh copies: forward updates them
        updated.update(running_mean=mean, running_var=var)
        if training:
            return ops.batchnorm_train_forward(a["x"], a.get("weight"), a.get("bias"), mean if track else None,
                                               var if track else None, 0.1, 1e-5, relu)
        return ops.batchnorm_eval_forward(a["x"], a.get("weight"), a.get("bias"), mean, var, 1e-5, relu)

    def backward(ops, dy, cache):
        dx, dweight, dbias = ops.batchnorm_backward(dy, cache)
        assert (dweight is None) == (not has_weight) and (dbias is None) == (not has_bias)
        frozen = ops.batchnorm_backward(dy, cache, need_param_grads=False)
        assert frozen[1] is None and frozen[2] is None and rel_err(frozen[0], dx) == 0
        return {"x": dx, "weight": dweight, "bias": dbias}

    torch_running = {}

    def torch_forward(t):
        mean, var = (torch.tensor(s) for s in running)
        torch_running.update(running_mean=mean, running_var=var)
        y = TF.batch_norm(t["x"], mean if track or not training else None, var if track or not training else None,
                          t.get("weight"), t.get("bias"), training, 0.1, 1e-5)
        return torch.relu(y) if relu else y

    return Spec(arrays, tuple(arrays), forward, backward, torch_forward, state=lambda: dict(updated),
                torch_state=lambda: dict(torch_running))


def relu_spec(shape):
    rng = _rng("relu", shape)
    x = rng.standard_normal(shape)
    x += np.sign(x) * 0.1                                  # away from the kink, for finite differences

    def backward(ops, dy, y):
        return {"x": ops.relu_backward(dy, y)}
    return Spec({"x": x}, ("x",), lambda ops, a: ops.relu_forward(a["x"]), backward,
                lambda t: torch.relu(t["x"]))


def add_relu_spec(shape):
    """The residual join: ``max(x + identity, 0)``, whose gradient reaches both summands."""
    rng = _rng("add_relu", shape)
    x, identity = rng.standard_normal(shape), rng.standard_normal(shape)
    identity += np.sign(x + identity) * 0.1

    def forward(ops, a):
        y = ops.add_relu_forward(a["x"], a["identity"])
        return ops.add(y, 0.5 * a["x"]), y                   # as if x also fed a branch of slope 0.5

    def backward(ops, dy, y):
        g = ops.relu_backward(dy, y)
        return {"x": ops.add(g, 0.5 * dy), "identity": g}     # the two paths' gradients meet at x
    return Spec({"x": x, "identity": identity}, ("x", "identity"), forward, backward,
                lambda t: torch.relu(t["x"] + t["identity"]) + 0.5 * t["x"])


MAXPOOL_CASES = [   # shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 3, 9, 8), 3, 2, 1, 1, False),                 # ResNet's stem pool, odd input
    ((1, 2, 7, 7), 2, 2, 0, 1, True),                  # ceil_mode: a window hangs over the edge
    ((2, 2, 8, 9), (3, 2), (1, 2), (1, 1), (2, 1), False),   # dilation, rectangles
    ((2, 3, 10, 11), 3, 2, 1, 2, True),
    ((2, 3, 1, 1), 1, 1, 0, 1, False),                 # 1x1 spatial
    ((2, 2, 5, 5), 3, 1, 1, 1, False),                 # overlapping windows (stride 1)
]


def maxpool_spec(shape, kernel, stride, padding, dilation, ceil_mode):
    rng = _rng("maxpool", shape, kernel, stride, padding, dilation, ceil_mode)
    # Distinct values, spaced by at least 1e-3, so finite differences never cross a tie.
    x = rng.permutation(np.prod(shape)).reshape(shape) * 1e-2 + rng.uniform(0, 1e-3, shape)

    def forward(ops, a):
        return ops.maxpool2d_forward(a["x"], kernel, stride, padding, dilation, ceil_mode)
    return Spec({"x": x}, ("x",), forward, lambda ops, dy, cache: {"x": ops.maxpool2d_backward(dy, cache)},
                lambda t: TF.max_pool2d(t["x"], kernel, stride, padding, dilation, ceil_mode))


UNPOOL_CASES = [   # pooled shape, kernel, stride, padding, output_size, repeated indices
    ((2, 3, 4, 3), 2, 2, 0, None, False),
    ((1, 2, 4, 4), 3, 2, 1, (8, 7), False),
    ((2, 2, 3, 3), 3, 1, 1, None, True),               # overlapping windows: an index may repeat
]


def unpool_spec(shape, kernel, stride, padding, output_size, repeats):
    rng = _rng("unpool", shape, kernel, stride, padding, output_size, repeats)
    n, c, h, w = shape
    out = output_size or tuple((shape[2 + a] - 1) * stride + kernel - 2 * padding for a in range(2))
    indices = rng.integers(0, out[0] * out[1], shape) if repeats else \
        np.stack([rng.permutation(out[0] * out[1])[:h * w] for _ in range(n * c)]).reshape(shape)

    def forward(ops, a):
        return ops.maxunpool2d_forward(a["x"], indices, kernel, stride, padding, output_size)
    return Spec({"x": rng.standard_normal(shape)}, ("x",), forward,
                lambda ops, dy, cache: {"x": ops.maxunpool2d_backward(dy, cache)},
                lambda t: TF.max_unpool2d(t["x"], torch.tensor(indices), kernel, stride, padding, output_size),
                torch=not repeats, fd=not repeats)   # a repeated index: PyTorch leaves the winner unspecified,
                                                     # and every repeat reads the gradient (a convention)


AVGPOOL_CASES = [   # shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    ((2, 3, 9, 8), 3, 2, 1, False, True, None),
    ((2, 3, 9, 8), 3, 2, 1, False, False, None),
    ((1, 2, 7, 6), 2, 2, 0, True, True, None),          # ceil_mode
    ((2, 2, 8, 7), 3, 2, 1, True, False, None),
    ((2, 2, 5, 6), (3, 2), (1, 2), (1, 0), False, True, 5),   # divisor_override
    ((2, 3, 1, 1), 1, 1, 0, False, True, None),
]


def avgpool_spec(shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    rng = _rng("avgpool", shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def forward(ops, a):
        return ops.avgpool2d_forward(a["x"], kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return Spec({"x": rng.standard_normal(shape)}, ("x",), forward,
                lambda ops, dy, cache: {"x": ops.avgpool2d_backward(dy, cache)},
                lambda t: TF.avg_pool2d(t["x"], kernel, stride, padding, ceil_mode, count_include_pad,
                                        divisor_override))


ADAPTIVE_CASES = [((2, 3, 7, 7), 1), ((2, 3, 9, 7), (4, 3)), ((1, 2, 5, 6), (5, None)), ((2, 2, 3, 2), (7, 5)),
                  ((2, 3, 1, 1), 1)]


def adaptive_spec(shape, output_size):
    rng = _rng("adaptive", shape, output_size)
    return Spec({"x": rng.standard_normal(shape)}, ("x",),
                lambda ops, a: ops.adaptive_avgpool2d_forward(a["x"], output_size),
                lambda ops, dy, cache: {"x": ops.adaptive_avgpool2d_backward(dy, cache)},
                lambda t: TF.adaptive_avg_pool2d(t["x"], output_size))


LINEAR_CASES = [((5, 7), 4, True), ((1, 3), 2, False), ((2, 3, 6), 5, True)]


def linear_spec(x_shape, out_features, bias):
    rng = _rng("linear", x_shape, out_features, bias)
    arrays = {"x": rng.standard_normal(x_shape), "weight": rng.standard_normal((out_features, x_shape[-1]))}
    if bias:
        arrays["bias"] = rng.standard_normal(out_features)

    def backward(ops, dy, cache):
        dx, dweight, dbias = ops.linear_backward(dy, cache)
        assert ops.linear_backward(dy, cache, False, need_weight_grad=False)[:2] == (None, None)
        return {"x": dx, "weight": dweight, "bias": dbias}
    return Spec(arrays, tuple(arrays), lambda ops, a: ops.linear_forward(a["x"], a["weight"], a.get("bias")),
                backward, lambda t: TF.linear(t["x"], t["weight"], t.get("bias")))


CE_CASES = [   # logits shape, target kind, reduction, label_smoothing, class weight, ignore_index
    ((6, 5), "index", "mean", 0.0, False, None),
    ((6, 5), "index", "sum", 0.2, False, None),
    ((6, 5), "index", "none", 0.1, True, None),
    ((6, 5), "index", "mean", 0.3, True, -100),          # ignored rows, weighted mean
    ((2, 4, 3, 2), "index", "mean", 0.1, False, 2),      # per-pixel logits, a real class ignored
    ((2, 4, 3, 2), "index", "none", 0.0, True, -100),
    ((5, 4), "probabilities", "mean", 0.2, True, None),
    ((2, 3, 2, 2), "probabilities", "none", 0.0, False, None),
    ((7,), "index", "mean", 0.1, False, None),           # unbatched
    ((1, 3), "index", "sum", 0.0, False, None),          # batch 1
]


def ce_spec(shape, kind, reduction, smoothing, use_weight, ignore_index):
    rng = _rng("ce", shape, kind, reduction, smoothing, use_weight, ignore_index)
    classes = shape[1] if len(shape) > 1 else shape[0]
    sample_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if kind == "index":
        target = rng.integers(0, classes, sample_shape)
        if ignore_index is not None:
            target.reshape(-1)[::3] = ignore_index
    else:
        target = rng.uniform(0, 1, shape)
    weight = rng.uniform(0.2, 2.0, classes) if use_weight else None
    extra = {} if ignore_index is None else {"ignore_index": ignore_index}

    def forward(ops, a):
        logits = a["logits"]
        t = target.astype(logits.dtype) if kind == "probabilities" else target
        w = None if weight is None else weight.astype(logits.dtype)
        return ops.cross_entropy_forward(logits, t, reduction, smoothing, weight=w, **extra)

    def torch_forward(t):
        return TF.cross_entropy(t["logits"], torch.tensor(target), None if weight is None else torch.tensor(weight),
                                reduction=reduction, label_smoothing=smoothing, **extra)
    return Spec({"logits": rng.standard_normal(shape) * 2}, ("logits",), forward,
                lambda ops, dy, cache: {"logits": ops.cross_entropy_backward(dy, cache)}, torch_forward)


SPECS = {}
SPECS.update({f"conv{i}": (conv_spec, case) for i, case in enumerate(CONV_CASES)})
SPECS.update({f"bn{i}": (bn_spec, case) for i, case in enumerate(BN_CASES)})
SPECS.update({"relu": (relu_spec, ((2, 3, 4, 5),)), "relu_1x1": (relu_spec, ((1, 4, 1, 1),)),
              "add_relu": (add_relu_spec, ((2, 3, 5, 4),))})
SPECS.update({f"maxpool{i}": (maxpool_spec, case) for i, case in enumerate(MAXPOOL_CASES)})
SPECS.update({f"unpool{i}": (unpool_spec, case) for i, case in enumerate(UNPOOL_CASES)})
SPECS.update({f"avgpool{i}": (avgpool_spec, case) for i, case in enumerate(AVGPOOL_CASES)})
SPECS.update({f"adaptive{i}": (adaptive_spec, case) for i, case in enumerate(ADAPTIVE_CASES)})
SPECS.update({f"linear{i}": (linear_spec, case) for i, case in enumerate(LINEAR_CASES)})
SPECS.update({f"ce{i}": (ce_spec, case) for i, case in enumerate(CE_CASES)})


def make(name) -> Spec:
    builder, case = SPECS[name]
    return builder(*case)


def family(name):
    return SPECS[name][0].__name__.removesuffix("_spec")


def cast(spec, dtype):
    return {k: v.astype(dtype) for k, v in spec.arrays.items()}


# --- against PyTorch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", [name for name in SPECS if make(name).torch])
def test_reference_matches_torch(name, dtype):
    """Output, every gradient and the running statistics, against PyTorch in float64 on the same
    (rounded to ``dtype``) values; float64 to 1e-10, float32 to 1e-4 of that float64 truth."""
    spec = make(name)
    arrays = cast(spec, dtype)
    tensors = {k: torch.tensor(v.astype(np.float64), requires_grad=k in spec.differentiable)
               for k, v in arrays.items()}
    y_t = spec.torch_forward(tensors)
    dy = _rng("dy", name).standard_normal(tuple(y_t.shape)).astype(dtype)
    y_t.backward(torch.tensor(dy.astype(np.float64)))

    y, cache = spec.forward(R, arrays)
    dy_before = dy.copy()
    grads = spec.backward(R, dy, cache)
    np.testing.assert_array_equal(dy, dy_before, err_msg="backward changed its upstream gradient")
    again = spec.backward(R, dy, cache)                    # the cache is read, never changed
    tol = TOL[dtype]
    assert np.asarray(y).dtype == dtype
    errors = [rel_err(y, y_t)]
    for key in spec.differentiable:
        assert grads[key].dtype == dtype, f"{key} gradient is {grads[key].dtype}"
        assert grads[key].shape == arrays[key].shape
        assert rel_err(again[key], grads[key]) == 0
        errors.append(rel_err(grads[key], tensors[key].grad))
    for key, value in spec.state().items():
        errors.append(rel_err(value, spec.torch_state()[key]))
    assert max(errors) < tol, f"{name}: errors {errors}"
    if dtype == "float64":
        record(f"torch/{family(name)}", max(errors))


def test_maxpool_indices_and_first_maximum_tie_break():
    """Indices as PyTorch's (flat h * W + w), and on ties the gradient goes to the first maximum only."""
    x = np.zeros((1, 2, 5, 6))
    x[0, 1] = np.arange(30).reshape(5, 6) % 4               # many ties
    x_t = torch.tensor(x, requires_grad=True)
    y_t, i_t = TF.max_pool2d(x_t, 3, 2, 1, 1, True, return_indices=True)
    dy = _rng("ties").standard_normal(tuple(y_t.shape))
    y_t.backward(torch.tensor(dy))
    (y, indices), cache = R.maxpool2d_forward(x, 3, 2, 1, 1, True, return_indices=True)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, i_t.numpy())
    assert rel_err(y, y_t) == 0
    assert rel_err(R.maxpool2d_backward(dy, cache), x_t.grad) < 1e-15
    (y_e, indices_e), _ = engine.maxpool2d_forward(x, 3, 2, 1, 1, True, return_indices=True)
    np.testing.assert_array_equal(indices, indices_e)


def test_maxpool_nan_wins_as_in_torch():
    x = _rng("nan").standard_normal((1, 1, 4, 4))
    x[0, 0, 1, 2] = np.nan
    x_t = torch.tensor(x, requires_grad=True)
    y_t, i_t = TF.max_pool2d(x_t, 2, 2, return_indices=True)
    y_t.backward(torch.ones_like(y_t) * 3)
    (y, indices), cache = R.maxpool2d_forward(x, 2, 2, return_indices=True)
    np.testing.assert_array_equal(indices, i_t.numpy())
    np.testing.assert_array_equal(y, y_t.detach().numpy())                 # NaN where torch has NaN
    np.testing.assert_array_equal(R.maxpool2d_backward(np.full(y.shape, 3.0), cache), x_t.grad.numpy())


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient():
    logits, target = _rng("ignored").standard_normal((3, 4)), np.full(3, -100)
    x_t = torch.tensor(logits, requires_grad=True)
    loss_t = TF.cross_entropy(x_t, torch.tensor(target), label_smoothing=0.1)
    loss_t.backward()
    loss, cache = R.cross_entropy_forward(logits, target, "mean", 0.1)
    assert np.isnan(loss) and torch.isnan(loss_t)
    np.testing.assert_array_equal(R.cross_entropy_backward(1.0, cache), x_t.grad.numpy())


def test_batchnorm_empty_batch_and_single_value():
    rm, rv = np.zeros(3), np.ones(3)
    y, cache = R.batchnorm_train_forward(np.zeros((0, 3, 2, 2)), np.ones(3), np.zeros(3), rm, rv)
    assert y.shape == (0, 3, 2, 2) and (rm == 0).all() and (rv == 1).all()
    dx, dweight, dbias = R.batchnorm_backward(np.zeros((0, 3, 2, 2)), cache)
    assert dx.shape == (0, 3, 2, 2) and (dweight == 0).all() and (dbias == 0).all()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        R.batchnorm_train_forward(np.zeros((1, 3, 1, 1)), None, None, None, None)


@pytest.mark.parametrize("op", ["conv2d", "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "relu", "linear"])
def test_empty_batch_gives_what_the_engine_gives(op):
    x = np.zeros((0, 4, 6, 5))
    arguments = {"conv2d": (np.ones((2, 4, 3, 3)), np.ones(2), 2, 1), "maxpool2d": (3, 2, 1), "avgpool2d": (3, 2, 1),
                 "adaptive_avgpool2d": (1,), "relu": (), "linear": (np.ones((3, 5)),)}[op]
    results = []
    for ops in (R, engine):
        y, cache = getattr(ops, f"{op}_forward")(x, *arguments)
        grads = getattr(ops, f"{op}_backward")(np.zeros_like(y), cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        results.append([y.shape] + [None if g is None else (g.shape, float(np.abs(g).sum())) for g in grads])
    assert results[0] == results[1]


def test_conv_refuses_other_padding_modes_by_name():
    x, w = np.zeros((1, 2, 4, 4)), np.zeros((2, 2, 3, 3))
    for mode in ("reflect", "replicate", "circular"):
        with pytest.raises(NotImplementedError, match=mode):
            R.conv2d_forward(x, w, None, 1, 1, padding_mode=mode)
    with pytest.raises(ValueError, match="strided"):
        R.conv2d_forward(x, w, None, 2, "same")
    with pytest.raises(ValueError, match="smaller than the kernel"):
        R.conv2d_forward(np.zeros((1, 2, 2, 2)), w)


def test_conv_skipped_gradients_are_none():
    spec = make("conv0")
    y, cache = spec.forward(R, spec.arrays)
    dy = np.ones_like(y)
    assert R.conv2d_backward(dy, cache, False)[0] is None
    dx, dweight, dbias = R.conv2d_backward(dy, cache, need_weight_grad=False)
    assert dx is not None and dweight is None and dbias is None              # the bias follows the weight
    assert R.conv2d_backward(dy, cache, need_weight_grad=False, need_bias_grad=True)[2] is not None


def test_reference_runs_on_cupy_like_on_numpy(cupy_backend):
    """The same code on CuPy arrays (through ``xp_of``) gives NumPy's results in float64."""
    xp = nr.backend.get_xp(cupy_backend)
    rng = _rng("cupy")
    x, w, b = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    logits, target = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    calls = [
        lambda a, x: a.conv2d_forward(x, a.asarray(w), a.asarray(b), 2, 1, 1, 2),
        lambda a, x: a.batchnorm_train_forward(x, a.asarray(b[:4]), a.asarray(b[2:]), a.zeros(4), a.ones(4), relu=True),
        lambda a, x: a.maxpool2d_forward(x, 3, 2, 1, 1, True),
        lambda a, x: a.avgpool2d_forward(x, 3, 2, 1, True, False),
        lambda a, x: a.adaptive_avgpool2d_forward(x, (3, 2)),
        lambda a, x: a.relu_forward(x),
        lambda a, x: a.linear_forward(x, a.asarray(w.reshape(6, -1)[:, :6])),
    ]
    names = ["conv2d", "batchnorm", "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "relu", "linear"]
    for name, call in zip(names, calls):
        outputs = []
        for a in (np, xp):
            ops = type("Ops", (), {k: staticmethod(getattr(R, k)) for k in R.__all__})()
            ops.asarray, ops.zeros, ops.ones = a.asarray, a.zeros, a.ones
            y, cache = call(ops, a.asarray(x))
            grads = getattr(R, f"{name}_backward")(a.asarray(np.cos(nr.backend.to_numpy(y))), cache)
            outputs.append([y] + [g for g in (grads if isinstance(grads, tuple) else (grads,)) if g is not None])
        for host, device in zip(*outputs):
            assert rel_err(device, host) < 1e-12, name
    loss, cache = R.cross_entropy_forward(xp.asarray(logits), xp.asarray(target), "mean", 0.1)
    loss_np, cache_np = R.cross_entropy_forward(logits, target, "mean", 0.1)
    assert rel_err(loss, loss_np) < 1e-12
    assert rel_err(R.cross_entropy_backward(0.5, cache), R.cross_entropy_backward(0.5, cache_np)) < 1e-12


# --- against central finite differences --------------------------------------------------------------

def finite_difference(objective, array, h=1e-6):
    """dL/d(array) by central differences, one element at a time (``objective`` reads ``array``)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + h
        plus = objective()
        array[index] = saved - h
        minus = objective()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("name", [name for name in SPECS if make(name).fd])
def test_reference_backward_matches_finite_differences(name):
    """L = sum(y * dy) for a fixed random dy: backward's gradients against central differences."""
    spec = make(name)
    arrays = cast(spec, "float64")
    y, cache = spec.forward(R, arrays)
    dy = _rng("fd", name).standard_normal(np.shape(y))
    grads = spec.backward(R, dy, cache)

    def objective():
        return float((np.asarray(spec.forward(R, arrays)[0]) * dy).sum())

    errors = [rel_err(grads[key], finite_difference(objective, arrays[key])) for key in spec.differentiable]
    assert max(errors) < FD_TOL, f"{name}: {errors}"
    record("finite differences", max(errors))


# --- against the engine ------------------------------------------------------------------------------

ENGINE_SPECS = [name for name in SPECS if make(name).engine]


@pytest.mark.parametrize("name", ENGINE_SPECS)
def test_reference_matches_engine(name):
    """The same calls on numres.reference and numres.functional agree to 1e-10 in float64:
    outputs, gradients (including which are None) and running statistics."""
    spec = make(name)
    results = {}
    for ops in (R, engine):
        arrays = cast(spec, "float64")
        y, cache = spec.forward(ops, arrays)
        dy = _rng("engine", name).standard_normal(np.shape(y))
        results[ops] = y, spec.backward(ops, dy, cache), spec.state()
    (y_r, grads_r, state_r), (y_e, grads_e, state_e) = results[R], results[engine]
    errors = [rel_err(y_r, y_e)]
    for key in grads_r:
        assert (grads_r[key] is None) == (grads_e[key] is None), key
        if grads_r[key] is not None:
            errors.append(rel_err(grads_r[key], grads_e[key]))
    errors += [rel_err(state_r[key], state_e[key]) for key in state_r]
    assert max(errors) < 1e-10, f"{name}: {errors}"
    record(f"engine/{family(name)}", max(errors))


@pytest.mark.parametrize("arch, shape", [("resnet20", (2, 3, 8, 8)), ("resnet18", (2, 3, 64, 64))])
def test_whole_model_on_the_reference_ops(arch, shape, monkeypatch):
    """Every module calling numres.reference through ``self.ops`` (the conv algorithm pinned to
    im2col, so the engine's Winograd path cannot take over) trains and evaluates like the engine."""
    from numres.nn import module as nn_module
    rng = np.random.default_rng(0)
    x, target = rng.standard_normal(shape), rng.integers(0, 10, shape[0])

    def step(model):
        crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype="float64")
        model.train()
        logits = model(x)
        crit(logits, target)
        model.backward(crit.backward())
        grads = {k: p.grad.copy() for k, p in model.named_parameters()}
        buffers = {k: b.copy() for k, b in model.named_buffers() if b.dtype.kind == "f"}
        model.eval()
        return logits, grads, buffers, model(x)

    with engine.conv_algorithm("im2col"):
        model = getattr(nr, arch)(num_classes=10, dtype="float64")
        state = {k: np.array(v) for k, v in model.state_dict().items()}
        expected = step(model)
        monkeypatch.setattr(nn_module.Module, "ops", property(lambda self: R))
        model = getattr(nr, arch)(num_classes=10, dtype="float64")
        model.load_state_dict(state)
        actual = step(model)
    assert rel_err(actual[0], expected[0]) < 1e-10
    assert max(rel_err(actual[1][k], expected[1][k]) for k in expected[1]) < 1e-10
    assert max(rel_err(actual[2][k], expected[2][k]) for k in expected[2]) < 1e-10
    assert rel_err(actual[3], expected[3]) < 1e-10


# --- the textbook's size -------------------------------------------------------------------------

def code_lines(function):
    """Lines of code in ``function``'s body: no docstring, blank lines or comment-only lines."""
    source = textwrap.dedent(inspect.getsource(function))
    definition = ast.parse(source).body[0]
    body = definition.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    lines = source.splitlines()[body[0].lineno - 1:body[-1].end_lineno]
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name", R.BACKWARDS)
def test_each_backward_is_at_most_25_lines_with_a_derivation(name):
    function = getattr(R, name)
    count = len(code_lines(function))
    assert count <= 25, f"numres.reference.{name} has {count} lines of code"
    doc = inspect.getdoc(function) or ""
    assert "Derivation" in doc and len(doc.splitlines()) >= 8, f"{name} does not derive its gradient"


def test_reference_names_and_signatures_match_the_engine():
    for name in R.__all__:
        reference, fast = inspect.signature(getattr(R, name)), inspect.signature(getattr(engine, name))
        assert len(reference.parameters) == len(fast.parameters), name
        for parameter, other in zip(reference.parameters.values(), fast.parameters.values()):
            # Required positional parameters may be named after what each tier's cache holds.
            if parameter.default is not inspect.Parameter.empty or parameter.kind is parameter.KEYWORD_ONLY:
                assert parameter.name == other.name, f"{name}({parameter.name})"
            assert (parameter.kind, parameter.default) == (other.kind, other.default), f"{name}({parameter.name})"
