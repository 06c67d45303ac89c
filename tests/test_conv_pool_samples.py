"""Convolution and pooling on the kinds of samples PyTorch's own operator tests use (issue 11).

Covered here, each against torch.nn (CPU) in float64 (relative error <= 1e-10) and in float32
(judged against the float64 truth), with random upstream gradients, and by central finite
differences in float64:

* size arguments given as 1-element sequences (``padding=(1,)`` pads both dimensions);
* empty batches (N = 0), forward and backward;
* ``MaxPool2d(return_indices=True)`` and ``MaxUnpool2d``;
* ``Conv2d(padding="same")`` with an odd total padding, and every ``padding_mode``;
* unbatched (C, H, W) input;
* a frozen conv weight: its weight-gradient GEMM is not run;
* one table of samples (odd sizes, 1x1, batch 1, N = 0, groups, ceil_mode, ...) run in one place.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch

import numres as nr
from numres.functional import conv as conv_ops
from conftest import TOL, rel_err, to_torch

DTYPES = ("float64", "float32")

# torch warns that an even kernel with padding="same" pads a copy of the input; that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")


# --- helpers ----------------------------------------------------------------------------------------

def torch_reference(torch_layer, x, seed, *, forward_kwargs=None):
    """float64 torch forward and backward with a random upstream gradient: ``(y, dx, grads, dy)``."""
    torch_layer = torch_layer.double()
    torch_layer.zero_grad()
    x_t = to_torch(x.astype("float64"), requires_grad=True)
    y_t = torch_layer(x_t, **(forward_kwargs or {}))
    if isinstance(y_t, tuple):
        y_t = y_t[0]
    dy = np.random.default_rng(seed).standard_normal(tuple(y_t.shape))
    y_t.backward(to_torch(dy))
    grads = {name: p.grad for name, p in torch_layer.named_parameters()}
    return y_t, x_t.grad, grads, dy


def check_against_torch(make_layer, torch_layer, x, seed=0, *, extra_inputs=(), forward_kwargs=None,
                        torch_kwargs=None):
    """Run ``make_layer(dtype)`` in float64 and float32 against torch's float64 result.

    ``extra_inputs`` follow ``x`` in numres's call (MaxUnpool2d's indices).

    Checks the output, the input gradient and every parameter gradient (torch's parameters are
    copied into numres first).  Returns the worst relative error per dtype.
    """
    y_t, dx_t, grads_t, dy = torch_reference(torch_layer, x, seed, forward_kwargs=torch_kwargs)
    state = {k: v.detach().numpy() for k, v in torch_layer.state_dict().items()}
    worst = {}
    for dtype in DTYPES:
        layer = make_layer(dtype)
        if state:
            layer.load_state_dict(state)
        y = layer(x.astype(dtype), *extra_inputs, **(forward_kwargs or {}))
        if isinstance(y, tuple):
            y = y[0]
        dx = layer.backward(dy.astype(dtype))
        assert y.dtype == dtype and dx.dtype == dtype
        errors = {"output": rel_err(y, y_t), "input gradient": rel_err(dx, dx_t)}
        params = dict(layer.named_parameters())
        for name, grad in grads_t.items():
            errors[f"grad of {name}"] = rel_err(params[name].grad, grad)
        for what, error in errors.items():
            assert error <= TOL[dtype], f"{what}: relative error {error:.2e} > {TOL[dtype]:.0e} ({dtype})"
        worst[dtype] = max(errors.values())
    return worst


def finite_difference_check(function, x, dy, analytic, eps=1e-6, tol=1e-7):
    """Central differences of ``sum(function(x) * dy)`` over every entry of ``x`` against ``analytic``."""
    numeric = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        original = x[index]
        x[index] = original + eps
        plus = float((function(x) * dy).sum())
        x[index] = original - eps
        minus = float((function(x) * dy).sum())
        x[index] = original
        numeric[index] = (plus - minus) / (2 * eps)
    error = rel_err(analytic, numeric)                # the suite's measure: NaN or inf is a failure
    assert error < tol, f"finite differences disagree with backward: {error:.2e}"
    return error


def gradcheck(module, x, **kwargs):
    result = nr.gradcheck(module, x, **kwargs)
    assert {"input", *(n for n, _ in module.named_parameters())} <= set(result.errors)
    assert result.worst < 1e-6, f"finite differences disagree with backward:\n{result}"
    return result.worst


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --- 1. size arguments as 1-element sequences -------------------------------------------------------

@pytest.mark.parametrize("wrap", [tuple, list], ids=["tuple", "list"])
def test_one_element_sizes_mean_both_dimensions(wrap):
    x = rand(2, 4, 9, 8, seed=1)
    one = lambda v: wrap([v])                                  # noqa: E731
    check_against_torch(
        lambda dtype: nr.nn.Conv2d(4, 6, 3, stride=one(2), padding=one(1), dilation=one(2), groups=2, dtype=dtype),
        torch.nn.Conv2d(4, 6, 3, stride=(2,), padding=(1,), dilation=(2,), groups=2), x)
    check_against_torch(lambda dtype: nr.nn.MaxPool2d(one(3), one(2), one(1), one(1), dtype=dtype),
                        torch.nn.MaxPool2d((3,), (2,), (1,), (1,)), x, seed=2)
    check_against_torch(lambda dtype: nr.nn.AvgPool2d(one(3), one(2), one(1), dtype=dtype),
                        torch.nn.AvgPool2d((3,), (2,), (1,)), x, seed=3)
    # The functional op takes them too (PyTorch's F.conv2d does).
    w = rand(6, 2, 3, 3, seed=4)
    y, _ = nr.functional.conv2d_forward(x, w, None, one(2), one(1), one(2), 2)
    y_t = torch.nn.functional.conv2d(to_torch(x), to_torch(w), None, (2,), (1,), (2,), 2)
    assert rel_err(y, y_t) <= 1e-10
    assert conv_ops.pair([3]) == (3, 3) and conv_ops.pair((2, 5)) == (2, 5) and conv_ops.pair(np.int64(4)) == (4, 4)


@pytest.mark.parametrize("build, error, words", [
    (lambda: nr.nn.Conv2d(3, 4, 3, stride=(1, 2, 3)), ValueError, ("stride", "1 or 2")),
    (lambda: nr.nn.Conv2d(3, 4, ()), ValueError, ("kernel_size", "1 or 2")),
    (lambda: nr.nn.Conv2d(3, 4, 3, stride=0), ValueError, ("stride", "positive")),
    (lambda: nr.nn.Conv2d(3, 4, 3, padding=(-1,)), ValueError, ("padding", "non-negative")),
    (lambda: nr.nn.Conv2d(3, 4, 3, dilation=(1, 0)), ValueError, ("dilation", "positive")),
    (lambda: nr.nn.Conv2d(3, 4, 2.5), TypeError, ("kernel_size", "int")),
    (lambda: nr.nn.Conv2d(3, 4, 3, padding="full"), ValueError, ("padding", "same", "valid")),
    (lambda: nr.nn.Conv2d(3, 4, 3, stride=2, padding="same"), ValueError, ("same", "strided")),
    (lambda: nr.nn.Conv2d(3, 4, 3, padding_mode="mirror"), ValueError, ("padding_mode", "reflect")),
    (lambda: nr.nn.MaxPool2d(0), ValueError, ("kernel_size", "positive")),
    (lambda: nr.nn.MaxPool2d(2, stride=(1, 1, 1)), ValueError, ("stride",)),
    (lambda: nr.nn.AvgPool2d(3, padding=-1), ValueError, ("padding", "non-negative")),
    (lambda: nr.nn.MaxUnpool2d((2, 2, 2)), ValueError, ("kernel_size",)),
])
def test_bad_size_arguments_are_refused_clearly(build, error, words):
    with pytest.raises(error) as info:
        build()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_functional_ops_check_their_sizes_too():
    x, w = rand(1, 2, 5, 5), rand(3, 2, 3, 3)
    with pytest.raises(ValueError, match="stride must be positive"):
        nr.functional.conv2d_forward(x, w, None, 0)
    with pytest.raises(ValueError, match="dilation must be positive"):
        nr.functional.maxpool2d_forward(x, 3, 1, 0, (0,))
    with pytest.raises(ValueError, match="padding must be non-negative"):
        nr.functional.avgpool2d_forward(x, 3, 1, -1)


# --- 2. empty batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make, make_torch", [
    (lambda d: nr.nn.Conv2d(3, 4, 3, padding=1, dtype=d), lambda: torch.nn.Conv2d(3, 4, 3, padding=1)),
    (lambda d: nr.nn.Conv2d(3, 4, 1, dtype=d), lambda: torch.nn.Conv2d(3, 4, 1)),
    (lambda d: nr.nn.Conv2d(4, 4, 2, padding="same", groups=2, padding_mode="reflect", dtype=d),
     lambda: torch.nn.Conv2d(4, 4, 2, padding="same", groups=2, padding_mode="reflect")),
    (lambda d: nr.nn.MaxPool2d(3, 2, 1, dtype=d), lambda: torch.nn.MaxPool2d(3, 2, 1)),
    (lambda d: nr.nn.MaxPool2d(2, return_indices=True, dtype=d), lambda: torch.nn.MaxPool2d(2, return_indices=True)),
    (lambda d: nr.nn.AvgPool2d(3, 2, 1, ceil_mode=True, dtype=d), lambda: torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
    (lambda d: nr.nn.AdaptiveAvgPool2d((2, 3), dtype=d), lambda: torch.nn.AdaptiveAvgPool2d((2, 3))),
    (lambda d: nr.nn.AdaptiveAvgPool2d(1, dtype=d), lambda: torch.nn.AdaptiveAvgPool2d(1)),
], ids=["conv3x3", "conv1x1", "conv-same-reflect", "maxpool", "maxpool-indices", "avgpool-ceil", "adaptive",
        "global"])
def test_empty_batch_as_pytorch(make, make_torch):
    x = np.zeros((0, getattr(make("float64"), "in_channels", 3), 7, 6))
    torch_layer = make_torch().double()
    y_t, dx_t, grads_t, _ = torch_reference(torch_layer, x, 0)
    assert tuple(y_t.shape)[0] == 0
    check_against_torch(make, torch_layer, x)
    layer = make("float32")
    y = layer(x.astype("float32"))
    y = y[0] if isinstance(y, tuple) else y
    assert tuple(y.shape) == tuple(y_t.shape)
    dx = layer.backward(np.zeros(y.shape, "float32"))
    assert tuple(dx.shape) == tuple(dx_t.shape)
    for name, param in layer.named_parameters():      # an empty batch gives zero (not missing) gradients
        assert param.grad is not None and not param.grad.any(), name


def test_empty_batch_through_the_functional_ops():
    x = np.zeros((0, 3, 5, 5))
    y, cache = nr.functional.maxpool2d_forward(x, 3, 2, 1)
    assert y.shape == (0, 3, 3, 3) and nr.functional.maxpool2d_backward(y, cache).shape == x.shape
    y, cache = nr.functional.avgpool2d_forward(x, 2)
    assert y.shape == (0, 3, 2, 2) and nr.functional.avgpool2d_backward(y, cache).shape == x.shape
    cols, out_hw = conv_ops.im2col(x, (3, 3), (1, 1), (1, 1))
    assert cols.shape == (1, 0, 27) and out_hw == (5, 5)
    dx = conv_ops.col2im(cols, x.shape, (3, 3), (1, 1), (1, 1), (1, 1), out_hw)
    assert dx.shape == x.shape


# --- 3. MaxPool2d(return_indices=True) and MaxUnpool2d ------------------------------------------------

POOL_CASES = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
              dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1), ceil_mode=True),
              dict(kernel_size=3, stride=1, padding=1)]     # overlapping windows: one element can win twice


@pytest.mark.parametrize("kwargs", POOL_CASES, ids=str)
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_maxpool_indices_equal_pytorchs(kwargs, values):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 7, 6)) if values == "normal" else rng.integers(-2, 2, (2, 3, 7, 6)) * 1.0
    torch_pool = torch.nn.MaxPool2d(return_indices=True, **kwargs)
    for dtype in DTYPES:                        # the maxima and where they are: exact, in each dtype
        y_t, i_t = torch_pool(to_torch(x.astype(dtype)))
        y, indices = nr.nn.MaxPool2d(return_indices=True, dtype=dtype, **kwargs)(x.astype(dtype))
        assert indices.dtype == np.int64 and indices.shape == tuple(i_t.shape)
        np.testing.assert_array_equal(indices, i_t.numpy())
        np.testing.assert_array_equal(y, y_t.numpy())
    check_against_torch(lambda d: nr.nn.MaxPool2d(return_indices=True, dtype=d, **kwargs),
                        torch.nn.MaxPool2d(return_indices=True, **kwargs), x)


def test_maxpool_indices_with_nan_and_minus_infinity():
    x = rand(1, 2, 6, 6, seed=3)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan        # two NaNs in one window
    x[0, 1, :3, :3] = -np.inf                     # a window with nothing but -inf
    y_t, i_t = torch.nn.MaxPool2d(3, 3, return_indices=True)(to_torch(x))
    y, indices = nr.nn.MaxPool2d(3, 3, return_indices=True, dtype="float64")(x)
    np.testing.assert_array_equal(indices, i_t.numpy())
    np.testing.assert_array_equal(y, y_t.numpy())


def test_maxpool_with_indices_finite_differences():
    x = rand(2, 2, 5, 7, seed=11)
    pool = nr.nn.MaxPool2d((3, 2), (2, 1), (1, 1), return_indices=True, dtype="float64")
    y, _ = pool(x)
    dy = rand(*y.shape, seed=12)
    dx = pool.backward(dy)
    finite_difference_check(lambda v: nr.functional.maxpool2d_forward(v, (3, 2), (2, 1), (1, 1))[0], x, dy, dx)


@pytest.mark.parametrize("kwargs", POOL_CASES[:3], ids=str)
def test_maxunpool_inverts_pytorchs_pool(kwargs):
    pool_kwargs = dict(kwargs)
    unpool_kwargs = {k: pool_kwargs[k] for k in ("kernel_size", "stride", "padding") if k in pool_kwargs}
    x = rand(2, 3, 7, 6, seed=5)
    pooled_t, indices_t = torch.nn.MaxPool2d(return_indices=True, **pool_kwargs)(to_torch(x))
    pooled, indices = pooled_t.numpy(), indices_t.numpy()
    unpool_t = torch.nn.MaxUnpool2d(**unpool_kwargs)
    output_size = x.shape if "dilation" not in kwargs else None
    check_against_torch(lambda d: nr.nn.MaxUnpool2d(**unpool_kwargs, dtype=d), _WithIndices(unpool_t, indices_t,
                        output_size), pooled, seed=6, extra_inputs=(indices,),
                        forward_kwargs=dict(output_size=output_size))
    # Finite differences where each plane's indices are distinct (a repeated index is written once
    # but read back by each repeat, in numres as in PyTorch: there backward is not forward's derivative).
    planes = indices.reshape(-1, indices.shape[2] * indices.shape[3])
    if all(len(np.unique(plane)) == plane.size for plane in planes):
        unpool = nr.nn.MaxUnpool2d(**unpool_kwargs, dtype="float64")
        y = unpool(pooled, indices, output_size=output_size)
        dy = rand(*y.shape, seed=8)
        dx = unpool.backward(dy)
        finite_difference_check(lambda v: unpool.forward(v, indices, output_size), pooled.copy(), dy, dx)


def _unpool_grad(y_t, indices_t, dz):
    """torch's gradient of MaxUnpool2d(2) with respect to its input."""
    y_t = y_t.detach().clone().requires_grad_()
    torch.nn.MaxUnpool2d(2)(y_t, indices_t).backward(to_torch(dz))
    return y_t.grad.numpy()


class _WithIndices(torch.nn.Module):
    """torch's MaxUnpool2d with fixed indices, so it can be called like a one-input layer."""

    def __init__(self, unpool, indices, output_size):
        super().__init__()
        self.unpool, self.indices, self.output_size = unpool, indices, output_size

    def forward(self, x):
        return self.unpool(x, self.indices, output_size=self.output_size)


def test_maxunpool_output_size_rules_and_bad_indices():
    pool = nr.nn.MaxPool2d(2, return_indices=True, dtype="float64")
    unpool = nr.nn.MaxUnpool2d(2, dtype="float64")
    x = rand(1, 2, 5, 5)
    y, indices = pool(x)                                    # (1, 2, 2, 2); default unpool size 4x4
    for size in [(5, 5), (1, 2, 5, 5), (4, 5)]:
        z = unpool(y, indices, output_size=size)
        z_t = torch.nn.MaxUnpool2d(2)(to_torch(y), torch.from_numpy(indices), output_size=size)
        np.testing.assert_array_equal(z, z_t.numpy())
    with pytest.raises(ValueError, match="output_size"):
        unpool(y, indices, output_size=(6, 4))              # more than a stride away from 4
    with pytest.raises(ValueError, match="2 or 4"):
        unpool(y, indices, output_size=(2, 5, 5))
    with pytest.raises(ValueError, match="outside the output plane of 4x4"):
        unpool(y, indices + 16)                             # the 4x4 plane has positions 0..15
    with pytest.raises(TypeError, match="integer indices"):
        unpool(y, indices.astype("float64"))
    with pytest.raises(ValueError, match="shape"):
        unpool(y, indices[:, :1])


def test_maxunpool_repr_and_dtype_follow_pytorch():
    assert repr(nr.nn.MaxUnpool2d(2)) == repr(torch.nn.MaxUnpool2d(2))
    assert repr(nr.nn.MaxUnpool2d((3, 2), 1, (1, 0))) == repr(torch.nn.MaxUnpool2d((3, 2), 1, (1, 0)))
    y = nr.nn.MaxUnpool2d(2)(rand(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64))   # a float32 layer, float64 input
    assert y.dtype == np.float64


# --- 4. padding="same" with odd totals, and padding modes ------------------------------------------------

PADDING_CASES = [((2, 2), "same", 1), ((4, 3), "same", 1), ((2, 3), "same", (3, 2)), ((3, 3), "same", 2),
                 ((3, 3), (2, 1), 1), ((1, 1), "valid", 1)]


# PyTorch refuses a 1-element padding with a non-zero padding_mode (NotImplementedError in F.pad),
# so that combination is compared in "zeros" mode only.
@pytest.mark.parametrize("mode, kernel, padding, dilation",
                         [(mode, *case) for mode in ("zeros", "reflect", "replicate", "circular")
                          for case in PADDING_CASES] + [("zeros", (3, 2), (1,), 1)])
def test_conv_same_and_padding_modes(mode, kernel, padding, dilation):
    x = rand(2, 4, 7, 6, seed=21)
    worst = check_against_torch(
        lambda d: nr.nn.Conv2d(4, 6, kernel, padding=padding, dilation=dilation, groups=2, padding_mode=mode,
                               dtype=d),
        torch.nn.Conv2d(4, 6, kernel, padding=padding, dilation=dilation, groups=2, padding_mode=mode), x)
    assert worst["float64"] <= 1e-10
    conv = nr.nn.Conv2d(4, 6, kernel, padding=padding, dilation=dilation, groups=2, padding_mode=mode,
                        dtype="float64")
    gradcheck(conv, rand(1, 4, 5, 6, seed=22), max_entries=40)


def test_padding_mode_with_stride_and_bias_free():
    x = rand(1, 3, 8, 9, seed=23)
    for mode in ("reflect", "replicate", "circular"):
        check_against_torch(lambda d: nr.nn.Conv2d(3, 5, 3, stride=(2, 3), padding=(2, 3), bias=False,
                                                   padding_mode=mode, dtype=d),
                            torch.nn.Conv2d(3, 5, 3, stride=(2, 3), padding=(2, 3), bias=False, padding_mode=mode), x)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad2d_against_torch_and_finite_differences(mode):
    x = rand(2, 3, 4, 5, seed=24)
    pads = ((1, 3), (4, 2))                     # reflect needs less than the size (4, 5), circular at most it
    padded, cache = nr.functional.pad2d_forward(x, pads, mode)
    torch_mode = "constant" if mode == "zeros" else mode
    padded_t = torch.nn.functional.pad(to_torch(x), (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), torch_mode)
    np.testing.assert_array_equal(padded, padded_t.numpy())
    dpadded = rand(*padded.shape, seed=25)
    dx = nr.functional.pad2d_backward(dpadded, cache)
    x_t = to_torch(x, requires_grad=True)
    torch.nn.functional.pad(x_t, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), torch_mode).backward(
        to_torch(dpadded))
    assert rel_err(dx, x_t.grad) <= 1e-14
    finite_difference_check(lambda v: nr.functional.pad2d_forward(v, pads, mode)[0], x, dpadded, dx)


def test_padding_larger_than_the_input_is_refused_clearly():
    x = rand(1, 2, 3, 3).astype("float32")
    with pytest.raises(ValueError, match="reflect"):
        nr.nn.Conv2d(2, 2, 3, padding=3, padding_mode="reflect")(x)
    with pytest.raises(ValueError, match="circular"):
        nr.nn.Conv2d(2, 2, 3, padding=4, padding_mode="circular")(x)


def test_conv_repr_matches_pytorch():
    for kwargs in [dict(padding="same", padding_mode="reflect"), dict(padding="valid"), dict(padding="same"),
                   dict(padding=(1, 2), padding_mode="circular", bias=False), dict(padding=1)]:
        assert repr(nr.nn.Conv2d(3, 4, 4, **kwargs)) == repr(torch.nn.Conv2d(3, 4, 4, **kwargs)), kwargs


# --- 5. unbatched (C, H, W) input -------------------------------------------------------------------------

@pytest.mark.parametrize("make, make_torch", [
    (lambda d: nr.nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=d), lambda: torch.nn.Conv2d(3, 4, 3, 2, 1)),
    (lambda d: nr.nn.Conv2d(3, 4, 2, padding="same", padding_mode="replicate", dtype=d),
     lambda: torch.nn.Conv2d(3, 4, 2, padding="same", padding_mode="replicate")),
    (lambda d: nr.nn.MaxPool2d(3, 2, 1, dtype=d), lambda: torch.nn.MaxPool2d(3, 2, 1)),
    (lambda d: nr.nn.MaxPool2d(2, return_indices=True, dtype=d), lambda: torch.nn.MaxPool2d(2, return_indices=True)),
    (lambda d: nr.nn.AvgPool2d(3, 2, 1, count_include_pad=False, dtype=d),
     lambda: torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    (lambda d: nr.nn.AdaptiveAvgPool2d((3, 2), dtype=d), lambda: torch.nn.AdaptiveAvgPool2d((3, 2))),
], ids=["conv", "conv-same-replicate", "maxpool", "maxpool-indices", "avgpool", "adaptive"])
def test_unbatched_input_as_pytorch(make, make_torch):
    x = rand(3, 7, 6, seed=31)
    torch_layer = make_torch().double()
    y_t, dx_t, _, _ = torch_reference(torch_layer, x, 0)
    assert y_t.dim() == 3 and dx_t.dim() == 3
    check_against_torch(make, torch_layer, x)          # shapes must agree exactly: rel_err never broadcasts


def test_unbatched_maxpool_indices_and_unpool():
    x = rand(3, 7, 6, seed=32)
    y_t, i_t = torch.nn.MaxPool2d(2, return_indices=True)(to_torch(x))
    y, indices = nr.nn.MaxPool2d(2, return_indices=True, dtype="float64")(x)
    assert indices.shape == tuple(i_t.shape) == (3, 3, 3)
    np.testing.assert_array_equal(indices, i_t.numpy())
    check_against_torch(lambda d: nr.nn.MaxUnpool2d(2, dtype=d), _WithIndices(torch.nn.MaxUnpool2d(2), i_t, (7, 6)),
                        y_t.numpy(), extra_inputs=(indices,), forward_kwargs=dict(output_size=(7, 6)))
    unpool = nr.nn.MaxUnpool2d(2, dtype="float64")
    z_t = torch.nn.MaxUnpool2d(2)(y_t, indices=i_t)
    np.testing.assert_array_equal(unpool(y, indices=indices), z_t.numpy())    # indices by keyword
    dz = rand(*z_t.shape, seed=33)
    np.testing.assert_array_equal(unpool.backward(dz), _unpool_grad(y_t, i_t, dz))


# --- 6. a frozen conv weight skips its weight-gradient GEMM -------------------------------------------------

@pytest.fixture
def counted_ops(monkeypatch):
    """Count the patch-matrix builds and GEMMs that conv2d_backward runs."""
    counts = {"im2col": 0, "group_matmul": 0}
    for name in counts:
        original = getattr(conv_ops, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(conv_ops, name, counting)
    return counts


@pytest.mark.parametrize("kernel, padding_mode", [(3, "zeros"), (1, "zeros"), (2, "reflect")])
def test_frozen_weight_skips_the_weight_gradient_gemm(counted_ops, kernel, padding_mode):
    x = rand(2, 4, 6, 5, seed=41)
    conv = nr.nn.Conv2d(4, 6, kernel, padding="same", groups=2, padding_mode=padding_mode, dtype="float64")
    torch_conv = torch.nn.Conv2d(4, 6, kernel, padding="same", groups=2, padding_mode=padding_mode).double()
    conv.load_state_dict({k: v.detach().numpy() for k, v in torch_conv.state_dict().items()})
    dy = rand(2, 6, 6, 5, seed=42)

    y = conv(x)
    counted_ops.update(im2col=0, group_matmul=0)
    dx_trained = conv.backward(dy)
    trained = dict(counted_ops)
    assert trained["im2col"] >= 1 or kernel == 1
    assert trained["group_matmul"] == 2 * max(1, trained["im2col"])     # dW and dx, chunk by chunk

    conv.zero_grad()
    conv.weight.requires_grad = False
    conv(x)
    counted_ops.update(im2col=0, group_matmul=0)
    dx_frozen = conv.backward(dy)
    assert counted_ops["im2col"] == 0, "a frozen weight still built patch matrices"
    assert counted_ops["group_matmul"] == trained["group_matmul"] // 2, "a frozen weight still ran its GEMM"
    np.testing.assert_array_equal(dx_frozen, dx_trained)
    assert conv.weight.grad is None

    x_t = to_torch(x, requires_grad=True)
    torch_conv.weight.requires_grad_(False)
    y_t = torch_conv(x_t)
    y_t.backward(to_torch(dy))
    assert rel_err(y, y_t) <= 1e-10
    assert rel_err(dx_frozen, x_t.grad) <= 1e-10
    assert rel_err(conv.bias.grad, torch_conv.bias.grad) <= 1e-10     # the bias still trains

    conv.zero_grad()
    conv.bias.requires_grad = False
    conv(x)
    np.testing.assert_array_equal(conv.backward(dy), dx_trained)
    assert conv.weight.grad is None and conv.bias.grad is None


def test_functional_backward_keeps_its_old_signature_and_returns_none_when_frozen():
    x, w, b = rand(1, 3, 5, 5), rand(4, 3, 3, 3, seed=1), rand(4, seed=2)
    y, cache = nr.functional.conv2d_forward(x, w, b, 1, 1)
    dy = rand(*y.shape, seed=3)
    dx, dw, db = nr.functional.conv2d_backward(dy, cache)
    dx_only, no_dw, no_db = nr.functional.conv2d_backward(dy, cache, True, need_weight_grad=False)
    assert no_dw is None and no_db is None
    np.testing.assert_array_equal(dx_only, dx)
    none, dw_only, db_only = nr.functional.conv2d_backward(dy, cache, False)
    assert none is None
    np.testing.assert_array_equal(dw_only, dw)
    _, no_dw, db_alone = nr.functional.conv2d_backward(dy, cache, False, need_weight_grad=False, need_bias_grad=True)
    assert no_dw is None
    np.testing.assert_allclose(db_alone, db, rtol=1e-14)
    np.testing.assert_allclose(conv_ops.conv2d_bias_backward(dy), db, rtol=1e-14)


# --- 7. one table of samples ---------------------------------------------------------------------------------

class Sample(NamedTuple):
    op: str                 # "conv", "maxpool", "avgpool" or "adaptive"
    shape: tuple            # input (N, C, H, W) or unbatched (C, H, W)
    kernel: object = 3      # kernel_size (adaptive: output_size)
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    padding_mode: str = "zeros"
    out_channels: int = 4


SAMPLES = [
    Sample("conv", (2, 3, 7, 9), 3, 1, 1),
    Sample("conv", (1, 4, 5, 5), (3, 1), (2, 1), (1, 0), (1, 2), groups=2, out_channels=6),
    Sample("conv", (1, 4, 1, 1), 1, out_channels=8),                                   # 1x1 input, 1x1 kernel
    Sample("conv", (3, 2, 6, 4), 2, (2,), (1,), (1,)),
    Sample("conv", (2, 4, 8, 7), 4, 1, "same", 1, groups=4, out_channels=4),         # depthwise, even kernel
    Sample("conv", (2, 3, 9, 6), 2, 1, "same", (2, 3), padding_mode="circular"),
    Sample("conv", (1, 3, 5, 6), 3, 2, 2, padding_mode="reflect"),
    Sample("conv", (2, 2, 4, 4), (2, 3), 1, "valid", padding_mode="replicate"),
    Sample("conv", (0, 3, 5, 5), 3, 2, 1),
    Sample("conv", (3, 6, 6), 3, 1, "same", padding_mode="reflect"),                  # unbatched
    Sample("maxpool", (2, 3, 7, 7), 3, 2, 1),
    Sample("maxpool", (1, 2, 9, 8), (3, 2), (2, 3), (1, 1), (2, 1), ceil_mode=True),
    Sample("maxpool", (2, 2, 5, 5), 2, None, 0, 1, ceil_mode=True),
    Sample("maxpool", (1, 1, 1, 1), 1),
    Sample("maxpool", (0, 3, 4, 4), 2),
    Sample("maxpool", (3, 6, 5), (2,), (1,), (1,)),                                   # unbatched
    Sample("avgpool", (2, 3, 7, 7), 3, 2, 1),
    Sample("avgpool", (2, 3, 7, 6), 3, 2, 1, count_include_pad=False),
    Sample("avgpool", (1, 2, 8, 5), (3, 2), (2, 2), (1, 1), ceil_mode=True),
    Sample("avgpool", (1, 2, 8, 5), (3, 2), (2, 2), (1, 1), ceil_mode=True, count_include_pad=False),
    Sample("avgpool", (1, 3, 1, 1), 1),
    Sample("avgpool", (0, 2, 5, 5), 2),
    Sample("avgpool", (2, 5, 5), (3,), (2,), (1,)),                                   # unbatched
    Sample("adaptive", (2, 3, 7, 5), (3, 2)),
    Sample("adaptive", (1, 2, 5, 5), 1),
    Sample("adaptive", (1, 2, 3, 4), (5, 7)),                                        # larger than the input
    Sample("adaptive", (0, 3, 4, 4), 2),
    Sample("adaptive", (2, 6, 6), (None, 4)),                                         # unbatched, None keeps H
]


def build_sample(sample: Sample, dtype=None):
    """The numres layer (``dtype`` given) or the torch layer (``dtype`` None) for one sample."""
    nn = torch.nn if dtype is None else nr.nn
    where = {} if dtype is None else {"dtype": dtype}
    if sample.op == "conv":
        return nn.Conv2d(sample.shape[-3], sample.out_channels, sample.kernel, sample.stride, sample.padding,
                         sample.dilation, sample.groups, padding_mode=sample.padding_mode, **where)
    if sample.op == "maxpool":
        return nn.MaxPool2d(sample.kernel, sample.stride, sample.padding, sample.dilation,
                            ceil_mode=sample.ceil_mode, **where)
    if sample.op == "avgpool":
        return nn.AvgPool2d(sample.kernel, sample.stride, sample.padding, sample.ceil_mode,
                            sample.count_include_pad, **where)
    return nn.AdaptiveAvgPool2d(sample.kernel, **where)


def test_pytorch_style_samples_in_one_place():
    """Every sample of the table: float64 and float32 against torch's float64, then finite differences."""
    worst = {dtype: 0.0 for dtype in DTYPES}
    for number, sample in enumerate(SAMPLES):
        x = rand(*sample.shape, seed=100 + number)
        try:
            errors = check_against_torch(lambda dtype: build_sample(sample, dtype), build_sample(sample), x,
                                         seed=200 + number)
        except AssertionError as failure:
            raise AssertionError(f"sample {sample}: {failure}") from failure
        for dtype in DTYPES:
            worst[dtype] = max(worst[dtype], errors[dtype])
        if sample.shape[0] and len(sample.shape) == 4:
            result = nr.gradcheck(build_sample(sample, "float64"), x, max_entries=30, seed=number)
            assert result.worst < 1e-6, f"sample {sample}: finite differences disagree:\n{result}"
    assert worst["float64"] <= 1e-10 and worst["float32"] <= 1e-4, worst


def test_summary_shapes_of_same_padded_and_padding_mode_convs():
    """``summarize(shapes_only=True)`` computes the shapes the real forward gives ("same" is a string now)."""
    from numres.summary import summarize

    model = nr.nn.Sequential(nr.nn.Conv2d(3, 4, 4, padding="same"), nr.nn.Conv2d(4, 4, 3, padding="valid"),
                             nr.nn.Conv2d(4, 2, 2, padding=(1, 2), padding_mode="circular"))
    real, shapes = summarize(model, (1, 3, 9, 8)), summarize(model, (1, 3, 9, 8), shapes_only=True)
    assert real.rows == shapes.rows
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, padding="same"),
                                      torch.nn.Conv2d(4, 4, 3, padding="valid"),
                                      torch.nn.Conv2d(4, 2, 2, padding=(1, 2), padding_mode="circular"))
    assert shapes.rows[-1] == real.rows[-1] and tuple(torch_model(torch.zeros(1, 3, 9, 8)).shape) == (1, 2, 8, 9)
    assert model(rand(1, 3, 9, 8).astype("float32")).shape == (1, 2, 8, 9)
