"""Every numres layer against its torch.nn twin: output, input gradient, parameter gradients, buffers.

Shapes come from hypothesis (odd sizes, stride, padding, dilation, groups, 1x1 spatial,
batch 1); inputs are fed to numres both as plain NCHW arrays and as channels-last
views.  Upstream gradients are random normal, never all ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import numres as nr
from conftest import TORCH_DTYPE, assert_close, as_numpy, copy_torch_params, from_torch, rel_err, to_torch

DTYPES = ["float64", "float32"]


def run_pair(nr_layer, torch_layer, x, dtype, *, channels_last=False, seed=0, forward_kwargs=None,
             torch_after=None):
    """Forward and backward ``x`` through both layers with one random upstream gradient.

    Weights and buffers are copied torch -> numres first.  Returns the numres and
    torch (output, input gradient) pairs for further checks, after comparing the
    outputs, input gradients, every parameter gradient and every buffer.
    """
    # The reference always computes in float64 (the "float64 truth"), on values rounded to ``dtype``
    # first: PyTorch's own float32 differs from CPU to CPU (oneDNN on AVX2 vs AVX-512).
    torch_layer = torch_layer.to(TORCH_DTYPE[dtype]).to(torch.float64)
    if list(torch_layer.state_dict()):
        copy_torch_params(torch_layer, nr_layer)
    x = x.astype(dtype)
    x_t = to_torch(x.astype(np.float64), requires_grad=True)
    y_t = torch_layer(x_t)
    if torch_after is not None:
        y_t = torch_after(y_t)
    dy = np.random.default_rng(seed).standard_normal(tuple(y_t.shape)).astype(dtype)
    y_t.backward(to_torch(dy.astype(np.float64)))

    x_n = from_torch(to_torch(x), channels_last=channels_last)
    y_n = nr_layer(x_n, **(forward_kwargs or {}))
    dy_n = nr.backend.asarray(dy, "numpy")
    dy_before = dy_n.copy()
    dx_n = nr_layer.backward(dy_n)

    assert_close(y_n, y_t, dtype, "output")
    assert_close(dx_n, x_t.grad, dtype, "input gradient")
    np.testing.assert_array_equal(dy_n, dy_before, err_msg="backward changed its upstream gradient")
    nr_params = dict(nr_layer.named_parameters())
    for name, p in torch_layer.named_parameters():
        assert_close(nr_params[name].grad, p.grad, dtype, f"grad of {name}")
    nr_buffers = dict(nr_layer.named_buffers())
    for name, b in torch_layer.named_buffers():
        if b.dtype == torch.int64:
            assert int(as_numpy(nr_buffers[name])) == int(b), f"buffer {name}"
        else:
            assert_close(nr_buffers[name], b, dtype, f"buffer {name}")
    return (y_n, dx_n), (y_t, x_t.grad)


# --- Conv2d ---------------------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    span_h = dilation[0] * (kh - 1) + 1 - 2 * padding[0]
    span_w = dilation[1] * (kw - 1) + 1 - 2 * padding[1]
    h = draw(st.integers(max(1, span_h), max(1, span_h) + 6))
    w = draw(st.integers(max(1, span_w), max(1, span_w) + 6))
    n = draw(st.integers(1, 3))
    return dict(n=n, cin=cin, cout=cout, kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                groups=groups, h=h, w=w, bias=draw(st.booleans()), channels_last=draw(st.booleans()))


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=conv_configs())
@example(cfg=dict(n=1, cin=2, cout=4, kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2,
                  h=1, w=1, bias=True, channels_last=True))
@example(cfg=dict(n=1, cin=3, cout=3, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=3,
                  h=1, w=1, bias=False, channels_last=False))
@settings(max_examples=150)
def test_conv2d_matches_torch(dtype, cfg):
    args = (cfg["cin"], cfg["cout"], cfg["kernel"])
    kwargs = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"],
                  bias=cfg["bias"])
    x = np.random.default_rng(1).standard_normal((cfg["n"], cfg["cin"], cfg["h"], cfg["w"]))
    run_pair(nr.nn.Conv2d(*args, **kwargs, dtype=dtype), torch.nn.Conv2d(*args, **kwargs), x, dtype,
             channels_last=cfg["channels_last"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_resnet_shapes(dtype, channels_last):
    """The convolutions ResNets use: 7x7/2 stem, 3x3 padded, strided 1x1 shortcut, grouped 3x3."""
    rng = np.random.default_rng(2)
    cases = [((3, 8, 7), dict(stride=2, padding=3, bias=False), (2, 3, 15, 13)),
             ((8, 8, 3), dict(padding=1, bias=False), (2, 8, 7, 7)),
             ((8, 16, 1), dict(stride=2, bias=False), (1, 8, 7, 9)),
             ((8, 8, 3), dict(stride=2, padding=1, groups=4, bias=False), (2, 8, 5, 5)),
             ((4, 6, 3), dict(padding=2, dilation=2), (1, 4, 1, 1))]
    for args, kwargs, shape in cases:
        run_pair(nr.nn.Conv2d(*args, **kwargs, dtype=dtype), torch.nn.Conv2d(*args, **kwargs),
                 rng.standard_normal(shape), dtype, channels_last=channels_last)


def test_conv2d_weight_assignment_keeps_layout():
    """Assigning through ``weight.data[...] =`` sets the PyTorch-shaped values without breaking the layout."""
    conv = nr.nn.Conv2d(3, 5, 3, padding=1, dtype="float64")
    ref = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    conv.weight.data[...] = ref.weight.detach().numpy()
    conv.bias.data[...] = ref.bias.detach().numpy()
    assert conv.weight.data.shape == (5, 3, 3, 3)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    assert_close(conv(x), ref(torch.from_numpy(x)), "float64", "output")


def test_conv2d_backward_twice_accumulates():
    """With retain_graph=True backward keeps its cache: a second call gives the same dx and doubles the weight
    gradient (as PyTorch's does); without it the second call is refused."""
    conv = nr.nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype="float64")
    rng = np.random.default_rng(4)
    y = conv(rng.standard_normal((2, 2, 5, 5)))
    dy = rng.standard_normal(y.shape)
    dx1 = conv.backward(dy, retain_graph=True).copy()
    dw1 = conv.weight.grad.copy()
    dx2 = conv.backward(dy)
    assert rel_err(dx2, dx1) == 0.0
    assert rel_err(conv.weight.grad, 2 * dw1) < 1e-14
    with pytest.raises(RuntimeError, match="called a second time"):
        conv.backward(dy)


# --- BatchNorm2d ------------------------------------------------------------------------------------

@st.composite
def bn_configs(draw):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if n * h * w < 3:
        # Training needs two values per channel; with exactly two, dL/dx is zero up to eps and its
        # float32 rounding (in PyTorch too) makes a relative comparison meaningless.
        h = 3
    return dict(n=n, c=draw(st.integers(1, 4)), h=h, w=w, affine=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.1, 0.5, None])), relu=draw(st.booleans()),
                channels_last=draw(st.booleans()))


def _bn_pair(cfg, dtype):
    kwargs = dict(affine=cfg["affine"], momentum=cfg["momentum"])
    return nr.nn.BatchNorm2d(cfg["c"], **kwargs, dtype=dtype), torch.nn.BatchNorm2d(cfg["c"], **kwargs)


def _randomize_bn(torch_bn, rng):
    """Non-trivial affine parameters and running statistics, so no check passes by accident."""
    with torch.no_grad():
        if torch_bn.affine:
            torch_bn.weight.copy_(torch.from_numpy(rng.standard_normal(torch_bn.num_features)))
            torch_bn.bias.copy_(torch.from_numpy(rng.standard_normal(torch_bn.num_features)))
        torch_bn.running_mean.copy_(torch.from_numpy(rng.standard_normal(torch_bn.num_features)))
        torch_bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, torch_bn.num_features)))
        torch_bn.num_batches_tracked.fill_(3)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=bn_configs())
@settings(max_examples=60)
def test_batchnorm_train_matches_torch(dtype, cfg):
    """Training mode, two batches: the running statistics and num_batches_tracked after both, and the gradients."""
    rng = np.random.default_rng(5)
    nr_bn, torch_bn = _bn_pair(cfg, dtype)
    _randomize_bn(torch_bn, rng)
    torch_bn.to(TORCH_DTYPE[dtype]).to(torch.float64)      # float64 truth on values rounded to dtype
    copy_torch_params(torch_bn, nr_bn)
    shape = (cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    first = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    with torch.no_grad():
        torch_bn(to_torch(first.astype(np.float64)))
    nr_bn(from_torch(to_torch(first), channels_last=cfg["channels_last"]))
    # The second batch goes through run_pair, which compares the buffers again after it.
    x = (-1.0 + 0.5 * rng.standard_normal(shape)).astype(dtype)
    torch_after = torch.relu if cfg["relu"] else None
    nr_state = {k: as_numpy(v).copy() for k, v in nr_bn.state_dict().items()}
    for name, value in torch_bn.state_dict().items():
        if value.dtype == torch.int64:
            np.testing.assert_array_equal(nr_state[name], value.numpy(), err_msg=name)
        else:
            assert_close(nr_state[name], value, dtype, f"{name} after the first batch")
    run_pair(nr_bn, torch_bn, x, dtype, channels_last=cfg["channels_last"], seed=6,
             forward_kwargs={"relu": True} if cfg["relu"] else None, torch_after=torch_after)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=bn_configs())
@settings(max_examples=15)
def test_batchnorm_eval_matches_torch(dtype, cfg):
    rng = np.random.default_rng(7)
    nr_bn, torch_bn = _bn_pair(cfg, dtype)
    _randomize_bn(torch_bn, rng)
    nr_bn.eval(), torch_bn.eval()
    x = rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"]))
    run_pair(nr_bn, torch_bn, x, dtype, channels_last=cfg["channels_last"],
             forward_kwargs={"relu": True} if cfg["relu"] else None, torch_after=torch.relu if cfg["relu"] else None)
    assert int(as_numpy(nr_bn.num_batches_tracked)) == 3, "eval mode must not count batches"


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_without_running_stats(dtype):
    """track_running_stats=False normalises with batch statistics in train and eval mode alike."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 3, 5))
    for train in (True, False):
        nr_bn = nr.nn.BatchNorm2d(4, track_running_stats=False, dtype=dtype)
        torch_bn = torch.nn.BatchNorm2d(4, track_running_stats=False)
        nr_bn.train(train), torch_bn.train(train)
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 2.0)
        run_pair(nr_bn, torch_bn, x, dtype)
        assert list(nr_bn.state_dict()) == list(torch_bn.state_dict())


def test_batchnorm_running_var_is_unbiased():
    """An independent check of the update rule: running_var = 0.9 * 1 + 0.1 * var(x, ddof=1)."""
    x = np.random.default_rng(9).standard_normal((4, 2, 3, 3))
    bn = nr.nn.BatchNorm2d(2, dtype="float64")
    bn(x)
    expected_var = 0.9 + 0.1 * x.transpose(1, 0, 2, 3).reshape(2, -1).var(axis=1, ddof=1)
    expected_mean = 0.1 * x.mean(axis=(0, 2, 3))
    assert rel_err(bn.running_var, expected_var) < 1e-14
    assert rel_err(bn.running_mean, expected_mean) < 1e-14
    assert int(bn.num_batches_tracked) == 1


# --- ReLU -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), channels_last=st.booleans())
@settings(max_examples=15)
def test_relu_matches_torch(dtype, shape, channels_last):
    x = np.random.default_rng(10).standard_normal(shape)
    x[x > 1.2] = 0.0           # exact zeros: the derivative there is taken as 0, as PyTorch does
    run_pair(nr.nn.ReLU(dtype=dtype), torch.nn.ReLU(), x, dtype, channels_last=channels_last and len(shape) == 4)


# --- MaxPool2d / AvgPool2d --------------------------------------------------------------------------

@st.composite
def pool_configs(draw, with_dilation):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if with_dilation else (1, 1)
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    return dict(kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation, h=h, w=w,
                n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), ceil_mode=draw(st.booleans()),
                channels_last=draw(st.booleans()), ties=draw(st.booleans()))


def _pool_input(cfg, seed):
    rng = np.random.default_rng(seed)
    shape = (cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    # Small integers make many windows hold several equal maxima (the first one must win).
    return rng.integers(-2, 2, shape).astype(np.float64) if cfg["ties"] else rng.standard_normal(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=pool_configs(with_dilation=True))
@settings(max_examples=150)
def test_maxpool_matches_torch(dtype, cfg):
    kwargs = dict(kernel_size=cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                  dilation=cfg["dilation"], ceil_mode=cfg["ceil_mode"])
    x = _pool_input(cfg, 11)
    # A dilated window can lie wholly in the padding: its output is -inf and PyTorch then sends
    # its gradient to an arbitrary element (another channel's, even).  No reference there.
    assume(bool(torch.isfinite(torch.nn.functional.max_pool2d(torch.from_numpy(x), **kwargs)).all()))
    run_pair(nr.nn.MaxPool2d(**kwargs, dtype=dtype), torch.nn.MaxPool2d(**kwargs), x, dtype,
             channels_last=cfg["channels_last"])


def test_maxpool_window_in_padding_gives_minus_inf_and_no_gradient():
    """A window holding only padding outputs -inf (as PyTorch does) and routes no gradient into the input."""
    pool = nr.nn.MaxPool2d((1, 2), stride=1, padding=(0, 1), dilation=(1, 2), dtype="float64")
    x = np.array([[[[1.5]], [[-2.0]]]])
    y = pool(x)
    assert y.shape == (1, 2, 1, 1) and np.all(y == -np.inf)
    np.testing.assert_array_equal(pool.backward(np.array([[[[3.0]], [[5.0]]]])), np.zeros_like(x))


def test_maxpool_tie_goes_to_first_maximum():
    """A window of equal values sends its whole gradient to its first (top-left) element."""
    pool = nr.nn.MaxPool2d(2, dtype="float64")
    x = np.full((1, 1, 2, 4), 5.0)
    pool(x)
    dx = pool.backward(np.array([[[[3.0, 7.0]]]]))
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0, 7.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=pool_configs(with_dilation=False), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, None, 3]))
@settings(max_examples=150)
def test_avgpool_matches_torch(dtype, cfg, count_include_pad, divisor_override):
    kwargs = dict(kernel_size=cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                  ceil_mode=cfg["ceil_mode"], count_include_pad=count_include_pad, divisor_override=divisor_override)
    run_pair(nr.nn.AvgPool2d(**kwargs, dtype=dtype), torch.nn.AvgPool2d(**kwargs), _pool_input(cfg, 12), dtype,
             channels_last=cfg["channels_last"])


@pytest.mark.parametrize("dtype", DTYPES)
@given(h=st.integers(1, 9), w=st.integers(1, 9), out_h=st.sampled_from([1, 2, 3, 5, 7, None]),
       out_w=st.integers(1, 7), channels_last=st.booleans())
@settings(max_examples=60)
def test_adaptive_avgpool_matches_torch(dtype, h, w, out_h, out_w, channels_last):
    """Any output size, including ones that do not divide the input (overlapping bins) or exceed it."""
    x = np.random.default_rng(13).standard_normal((2, 3, h, w))
    size = (out_h, out_w)
    run_pair(nr.nn.AdaptiveAvgPool2d(size, dtype=dtype), torch.nn.AdaptiveAvgPool2d(size), x, dtype,
             channels_last=channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_avgpool_int_size(dtype):
    x = np.random.default_rng(14).standard_normal((1, 2, 7, 5))
    run_pair(nr.nn.AdaptiveAvgPool2d(3, dtype=dtype), torch.nn.AdaptiveAvgPool2d(3), x, dtype)


# --- Linear, Flatten, Identity, Sequential -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), fin=st.integers(1, 9), fout=st.integers(1, 9),
       bias=st.booleans())
@settings(max_examples=20)
def test_linear_matches_torch(dtype, lead, fin, fout, bias):
    x = np.random.default_rng(15).standard_normal((*lead, fin))
    run_pair(nr.nn.Linear(fin, fout, bias=bias, dtype=dtype), torch.nn.Linear(fin, fout, bias=bias), x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, -1), (0, -1), (2, 3), (1, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flatten_matches_torch(dtype, dims, channels_last):
    x = np.random.default_rng(16).standard_normal((2, 3, 4, 5))
    run_pair(nr.nn.Flatten(*dims, dtype=dtype), torch.nn.Flatten(*dims), x, dtype, channels_last=channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_matches_torch(dtype):
    x = np.random.default_rng(17).standard_normal((2, 3, 4, 5))
    (y, dx), _ = run_pair(nr.nn.Identity(dtype=dtype), torch.nn.Identity(), x, dtype)
    assert y.shape == dx.shape == (2, 3, 4, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_sequential_matches_torch(dtype, channels_last):
    """A small conv net built from nn.Sequential: gradients and BN buffers of every child, by dotted name."""
    def layers(nn, **where):
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, **where),
                             nn.BatchNorm2d(4, **where), nn.ReLU(**where), nn.MaxPool2d(2, ceil_mode=True, **where),
                             nn.Conv2d(4, 6, 1, **where), nn.AvgPool2d(2, padding=1, **where),
                             nn.AdaptiveAvgPool2d(1, **where), nn.Flatten(**where), nn.Linear(6, 5, **where),
                             nn.Identity(**where))
    nr_seq, torch_seq = layers(nr.nn, dtype=dtype), layers(torch.nn)
    assert list(nr_seq.state_dict()) == list(torch_seq.state_dict())
    x = np.random.default_rng(18).standard_normal((2, 3, 9, 11))
    run_pair(nr_seq, torch_seq, x, dtype, channels_last=channels_last)


# --- CrossEntropyLoss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 6), classes=st.integers(1, 7), reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.1, 0.37, 1.0]), scale=st.sampled_from([1.0, 30.0]))
@settings(max_examples=60)
def test_cross_entropy_matches_torch(dtype, n, classes, reduction, smoothing, scale):
    rng = np.random.default_rng(19)
    logits = (scale * rng.standard_normal((n, classes))).astype(dtype)
    target = rng.integers(0, classes, n)
    crit = nr.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing, dtype=dtype)
    logits_t = to_torch(logits.astype(np.float64), requires_grad=True)         # float64 truth
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(target), reduction=reduction,
                                               label_smoothing=smoothing)
    upstream = rng.standard_normal(loss_t.shape).astype(dtype)
    loss_t.backward(to_torch(upstream.astype(np.float64)))
    loss = crit(logits, target)
    assert np.shape(loss) == tuple(loss_t.shape)
    assert_close(loss, loss_t, dtype, "loss")
    assert_close(crit.backward(upstream if reduction == "none" else upstream[()]), logits_t.grad, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_default_upstream_is_one(dtype):
    rng = np.random.default_rng(20)
    logits = rng.standard_normal((4, 5)).astype(dtype)
    target = np.array([0, 4, 2, 2])
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.2, dtype=dtype)
    logits_t = to_torch(logits.astype(np.float64), requires_grad=True)         # float64 truth
    torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(target), label_smoothing=0.2).backward()
    crit(logits, target)
    assert_close(crit.backward(), logits_t.grad, dtype, "dlogits")


def test_cross_entropy_is_stable_for_huge_logits():
    """Log-softmax subtracts the row maximum: logits of 1e4 give finite, exact values."""
    logits = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]])
    target = np.array([1, 0])
    logits_t = torch.from_numpy(logits).requires_grad_()
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(target))
    loss_t.backward()
    crit = nr.nn.CrossEntropyLoss(dtype="float64")
    assert_close(crit(logits, target), loss_t, "float64", "loss")
    assert_close(crit.backward(), logits_t.grad, "float64", "dlogits")
