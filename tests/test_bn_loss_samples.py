"""The gaps PyTorch's own operator samples found in BatchNorm2d, CrossEntropyLoss, Linear and ReLU.

* CrossEntropyLoss as PyTorch defines it: ``weight=``, ``ignore_index=``, class-probability targets
  and logits with extra dimensions, in every combination with label smoothing and each reduction;
* empty batches (N = 0) in BatchNorm2d (training and evaluation), Linear, ReLU and CrossEntropyLoss;
* ``BatchNorm2d(bias=False)`` (PyTorch 2.13) and its printing;
* frozen parameters: Linear skips its weight-gradient GEMM, BatchNorm2d its reductions where dx
  does not need them, and dx is unchanged.

Every float64 result is held to 1e-10 of PyTorch's float64; every float32 result is judged against
PyTorch's float64 (the truth), never against PyTorch's float32.  Upstream gradients are random.
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numres as nr
import numres.functional.batchnorm as functional_bn
import numres.functional.linear as functional_linear
from conftest import as_numpy, assert_close, rel_err
from torch_reference import classic_repr

DTYPES = ["float64", "float32"]
FD_TOL = 1e-6          # central differences in float64, as in test_finite_differences.py


def t64(array, requires_grad=False):
    """A float64 (or integer) torch tensor with the values of a host array: the reference's input."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.is_floating_point():
        tensor = tensor.double()
    return tensor.requires_grad_(requires_grad)


# --- CrossEntropyLoss: the full grid against PyTorch ---------------------------------------------------

SHAPES = {"rows": (5, 7), "pixels": (3, 4, 2, 3), "unbatched": (6,)}
TARGETS = ["index", "ignore_default", "ignore_class", "probabilities"]
IGNORED_CLASS = 2


def _class_axis(shape):
    return 1 if len(shape) >= 2 else 0


def ce_case(shape, target_kind, use_weight, seed):
    """Logits, target, constructor keywords and the reference's keywords for one grid point."""
    rng = np.random.default_rng(seed)
    classes = shape[_class_axis(shape)]
    sample_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    logits = 2.0 * rng.standard_normal(shape)
    kwargs = {}
    if target_kind == "probabilities":
        # Not normalised on purpose: PyTorch's definition does not assume that the rows sum to 1.
        target = rng.uniform(0.0, 1.0, shape)
    else:
        target = rng.integers(0, classes, sample_shape)
        flat = target.reshape(-1)
        if target_kind == "ignore_default":
            flat[::3] = -100                      # the default ignore_index, and not a class
        elif target_kind == "ignore_class":
            flat[::2] = IGNORED_CLASS             # a real class, ignored by request
            kwargs["ignore_index"] = IGNORED_CLASS
    if use_weight:
        kwargs["weight"] = rng.uniform(0.2, 2.0, classes)
    return logits, target, kwargs


def torch_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream):
    """PyTorch's loss and dL/dlogits in float64 (the truth for both numres dtypes)."""
    logits_t = t64(logits, requires_grad=True)
    extra = {k: (t64(v) if k == "weight" else v) for k, v in kwargs.items()}
    loss = F.cross_entropy(logits_t, t64(target), reduction=reduction, label_smoothing=smoothing, **extra)
    loss.backward(t64(upstream))
    return loss.detach(), logits_t.grad


def numres_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream, dtype):
    crit = nr.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing, dtype=dtype, **kwargs)
    if target.dtype.kind == "f":
        target = target.astype(dtype)
    loss = crit(logits.astype(dtype), target)
    return loss, crit.backward(np.asarray(upstream, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_grid_matches_torch(dtype, shape_name, target_kind, use_weight, reduction, smoothing):
    shape = SHAPES[shape_name]
    seed = zlib.crc32(repr((shape_name, target_kind, use_weight, reduction, smoothing)).encode())
    logits, target, kwargs = ce_case(shape, target_kind, use_weight, seed)
    rng = np.random.default_rng(seed + 1)
    sample_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    upstream = rng.standard_normal(sample_shape) if reduction == "none" else rng.standard_normal()
    loss_t, grad_t = torch_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream)
    loss, dlogits = numres_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream, dtype)
    assert loss.dtype == dtype and dlogits.dtype == dtype
    assert_close_where_defined(loss, loss_t, dtype, "loss")
    assert_close_where_defined(dlogits, grad_t, dtype, "dlogits")


def assert_close_where_defined(actual, expected, dtype, what):
    """``assert_close``, except where PyTorch's result is NaN by definition: the mean over no counted
    target (an unbatched target that is ignored).  There numres must give NaN at exactly the same
    entries; every other entry is compared as usual (rel_err itself treats any NaN as a failure)."""
    a = np.array(nr.to_numpy(actual), dtype=np.float64)
    e = np.array(expected.detach().numpy() if hasattr(expected, "detach") else expected, dtype=np.float64)
    undefined = np.isnan(e)
    if undefined.any():
        assert np.array_equal(np.isnan(a), undefined), f"{what}: NaN where PyTorch has none, or the reverse"
        a, e = a[~undefined], e[~undefined]
    assert_close(a, e, dtype, what)


@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_finite_differences(target_kind, use_weight, reduction, smoothing):
    """Per-pixel logits (N, C, d1, d2), every target kind, weight, reduction and smoothing."""
    logits, target, kwargs = ce_case(SHAPES["pixels"], target_kind, use_weight, seed=17)
    crit = nr.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing, dtype="float64", **kwargs)
    result = nr.gradcheck(crit, logits, forward_kwargs={"target": target})
    assert set(result.errors) == {"input"}
    assert result.worst < FD_TOL, f"finite differences disagree with backward:\n{result}"


def test_cross_entropy_weighted_mean_divides_by_the_weight_of_counted_targets():
    """An independent check of the definition (no PyTorch): weighted mean with ignored rows and smoothing."""
    rng = np.random.default_rng(3)
    logits, target = rng.standard_normal((6, 4)), np.array([0, 3, -100, 1, 3, -100])
    weight, eps = np.array([0.5, 1.0, 2.0, 3.0]), 0.2
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    counted = target != -100
    per_row = [-(1 - eps) * weight[t] * log_p[i, t] - eps / 4 * (weight * log_p[i]).sum()
               for i, t in enumerate(target) if t != -100]
    expected = sum(per_row) / weight[target[counted]].sum()
    crit = nr.nn.CrossEntropyLoss(weight=weight, label_smoothing=eps, dtype="float64")
    assert rel_err(crit(logits, target), expected) < 1e-14


@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 2, 2)])
def test_cross_entropy_empty_batch_matches_torch(target_kind, use_weight, reduction, smoothing, shape):
    """N = 0: the mean is NaN (0 / 0, as in PyTorch, and not an error), the sum 0, "none" empty;
    dlogits is empty."""
    rng = np.random.default_rng(4)
    logits = np.zeros(shape)
    target = np.zeros(shape) if target_kind == "probabilities" else np.zeros(shape[:1] + shape[2:], dtype=np.int64)
    kwargs = {"weight": rng.uniform(0.5, 2.0, 5)} if use_weight else {}
    upstream = np.zeros(shape[:1] + shape[2:]) if reduction == "none" else rng.standard_normal()
    loss_t, grad_t = torch_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream)
    loss, dlogits = numres_cross_entropy(logits, target, reduction, smoothing, kwargs, upstream, "float64")
    assert loss.shape == tuple(loss_t.shape) and dlogits.shape == tuple(grad_t.shape) == shape
    np.testing.assert_array_equal(loss, loss_t.numpy())           # NaN == NaN here
    if reduction == "mean":
        assert np.isnan(loss)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("case", ["all_ignored", "zero_total_weight"])
def test_cross_entropy_mean_over_nothing_matches_torch(smoothing, case):
    """Every target ignored: a NaN loss and an all-zero gradient.  Counted targets whose weights are
    all 0: a NaN loss, NaN gradient rows for them and zero rows for the ignored ones.  As in PyTorch."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 4))
    if case == "all_ignored":
        target, kwargs = np.full(4, -100), {}
    else:
        target, kwargs = np.array([1, -100, 1, 3]), {"weight": np.array([1.0, 0.0, 2.0, 0.0])}
    loss_t, grad_t = torch_cross_entropy(logits, target, "mean", smoothing, kwargs, 0.7)
    loss, dlogits = numres_cross_entropy(logits, target, "mean", smoothing, kwargs, 0.7, "float64")
    assert np.isnan(loss) and torch.isnan(loss_t)
    np.testing.assert_array_equal(dlogits, grad_t.numpy())


def test_cross_entropy_ignore_index_allows_any_integer():
    """A target equal to ignore_index passes the range check (-100 by default, 7 here); others do not."""
    logits = np.random.default_rng(6).standard_normal((3, 5))
    crit = nr.nn.CrossEntropyLoss(ignore_index=7, dtype="float64")
    expected = F.cross_entropy(t64(logits), t64(np.array([0, 7, 4])), ignore_index=7)
    assert rel_err(crit(logits, np.array([0, 7, 4])), expected) < 1e-14
    with pytest.raises(IndexError, match="target label -100 is out of range for 5 classes"):
        crit(logits, np.array([0, -100, 4]))
    with pytest.raises(IndexError, match="target label 5 is out of range"):
        nr.nn.CrossEntropyLoss()(logits.astype("float32"), np.array([0, -100, 5]))


def test_cross_entropy_bad_targets_and_weights_are_named():
    logits = np.zeros((3, 5), dtype="float32")
    with pytest.raises(TypeError, match=r"class probabilities of the logits' shape \(3, 5\)"):
        nr.nn.CrossEntropyLoss()(logits, np.zeros((3, 4), dtype="float32"))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        nr.nn.CrossEntropyLoss()(np.zeros((3, 5, 2), dtype="float32"), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="weight has 4 values but the logits have 5 classes"):
        nr.nn.CrossEntropyLoss(weight=np.ones(4))(logits, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="1-D array"):
        nr.nn.CrossEntropyLoss(weight=np.ones((5, 1)))
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        nr.nn.CrossEntropyLoss(ignore_index=1.5)


def test_cross_entropy_weight_is_a_buffer_as_in_torch():
    weight = np.array([0.5, 1.0, 2.0])
    crit = nr.nn.CrossEntropyLoss(weight=weight)
    reference = torch.nn.CrossEntropyLoss(weight=torch.tensor(weight))
    assert list(crit.state_dict()) == list(reference.state_dict()) == ["weight"]
    assert list(nr.nn.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict()) == []
    assert crit.weight.dtype == np.float32
    crit.to(dtype="float64")
    assert crit.weight.dtype == np.float64
    assert repr(crit) == repr(reference) == "CrossEntropyLoss()"
    weight[0] = 9.0
    assert crit.weight[0] == 0.5, "the criterion keeps its own copy of the weight"


@pytest.mark.parametrize("size_average, reduce", [(False, None), (None, False), (True, True), (False, True)])
def test_cross_entropy_legacy_reduction_arguments(size_average, reduce):
    rng = np.random.default_rng(8)
    logits, target = rng.standard_normal((4, 3)), np.array([0, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    crit = nr.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce, dtype="float64")
    assert crit.reduction == reference.reduction
    assert rel_err(crit(logits, target), reference(t64(logits), t64(target))) < 1e-14


# --- Empty batches: BatchNorm2d, Linear, ReLU -----------------------------------------------------------

def _random_bn_pair(channels, seed, **kwargs):
    """A torch BatchNorm2d (float64) with non-trivial parameters and statistics, and its numres twin."""
    rng = np.random.default_rng(seed)
    reference = torch.nn.BatchNorm2d(channels, **kwargs).double()
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.copy_(t64(rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels)))
        if reference.bias is not None:
            reference.bias.copy_(t64(rng.standard_normal(channels)))
        if reference.running_mean is not None:
            reference.running_mean.copy_(t64(rng.standard_normal(channels)))
            reference.running_var.copy_(t64(rng.uniform(0.5, 2.0, channels)))
            reference.num_batches_tracked.fill_(4)
    return reference


def _numres_twin(reference, dtype, **kwargs):
    bn = nr.nn.BatchNorm2d(reference.num_features, dtype=dtype, **kwargs)
    bn.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    return bn


def _check_bn_against_torch(bn, reference, x, dtype, seed, relu=False):
    """One forward/backward through both with a random upstream gradient; compares everything."""
    x_t = t64(x, requires_grad=True)
    y_t = reference(x_t)
    if relu:
        y_t = torch.relu(y_t)
    upstream = np.random.default_rng(seed).standard_normal(tuple(y_t.shape))
    y_t.backward(t64(upstream))
    y = bn(x.astype(dtype), relu=relu)
    dx = bn.backward(upstream.astype(dtype))
    assert y.shape == tuple(y_t.shape) and y.dtype == dtype and dx.shape == x.shape and dx.dtype == dtype
    assert_close(y, y_t, dtype, "output")
    assert_close(dx, x_t.grad, dtype, "input gradient")
    params = dict(bn.named_parameters())
    assert list(params) == [name for name, _ in reference.named_parameters()]
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert_close(params[name].grad, p.grad, dtype, f"grad of {name}")
        else:
            assert params[name].grad is None, f"frozen {name} got a gradient"
    buffers = dict(bn.named_buffers())
    assert list(buffers) == [name for name, _ in reference.named_buffers()]
    for name, b in reference.named_buffers():
        if b.dtype == torch.int64:
            assert int(as_numpy(buffers[name])) == int(b), f"buffer {name}"
        else:
            assert_close(buffers[name], b, dtype, f"buffer {name}")
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 4), (0, 3, 1, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layer", [{}, {"bias": False}, {"affine": False}, {"track_running_stats": False}])
def test_batchnorm_empty_batch_matches_torch(dtype, train, shape, momentum, layer):
    """No values per channel: an empty output and dx, zero parameter gradients, running statistics
    untouched, and (training mode) num_batches_tracked still counts the batch, as in PyTorch."""
    reference = _random_bn_pair(3, 10, momentum=momentum, **layer).train(train)
    bn = _numres_twin(reference, dtype, momentum=momentum, **layer).train(train)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    _check_bn_against_torch(bn, reference, np.zeros(shape), dtype, seed=11)
    for name, value in before.items():     # PyTorch itself: statistics the same, the counter +1 in training
        changed = name == "num_batches_tracked" and train
        assert torch.equal(reference.state_dict()[name], value + 1 if changed else value), name
    for p in bn.parameters():
        assert not np.any(p.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1)])
def test_batchnorm_refuses_exactly_one_value_per_channel_in_training(dtype, shape):
    """PyTorch's rule: exactly one value per channel is refused in training mode (its unbiased
    variance would be 0 / 0), and accepted in evaluation mode.  numres refuses before counting."""
    reference = _random_bn_pair(3, 12)
    bn = _numres_twin(reference, dtype)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        reference(t64(np.ones(shape)))
    state = {k: as_numpy(v).copy() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs more than 1 value per channel, got input of shape \(1, 3, 1, 1\)"):
        bn(np.ones(shape, dtype=dtype))
    for name, value in bn.state_dict().items():
        np.testing.assert_array_equal(as_numpy(value), state[name], err_msg=f"{name} changed by a refused batch")
    assert int(reference.num_batches_tracked) == 5      # PyTorch counted the batch it refused; undo that
    reference.num_batches_tracked.fill_(4)
    reference, bn = reference.eval(), bn.eval()
    _check_bn_against_torch(bn, reference, np.random.default_rng(13).standard_normal(shape), dtype, seed=14)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 2, 1), (1, 3, 1, 2)])
def test_batchnorm_two_values_per_channel_matches_torch(shape):
    """Two values are enough (numres used to refuse fewer than 2 per batch, never 2 itself: this
    checks the boundary).  With two values dx is tiny (of order eps), so only float64 is compared."""
    reference = _random_bn_pair(3, 15)
    bn = _numres_twin(reference, "float64")
    x = np.random.default_rng(16).standard_normal(shape)
    _check_bn_against_torch(bn, reference, x, "float64", seed=17)


def test_batchnorm_still_refuses_unbatched_input():
    """PyTorch's BatchNorm2d refuses a 3-D (C, H, W) input, and so does numres."""
    with pytest.raises(ValueError, match="expected 4D input"):
        torch.nn.BatchNorm2d(3)(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"expects a 4-D input \(N, C, H, W\), got shape \(3, 4, 4\)"):
        nr.nn.BatchNorm2d(3)(np.zeros((3, 4, 4), dtype="float32"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(0, 4), (2, 0, 4), (0, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_empty_batch_matches_torch(dtype, x_shape, bias):
    reference = torch.nn.Linear(4, 3, bias=bias).double()
    layer = nr.nn.Linear(4, 3, bias=bias, dtype=dtype)
    layer.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    x_t = t64(np.zeros(x_shape), requires_grad=True)
    y_t = reference(x_t)
    y_t.backward(torch.zeros_like(y_t))
    y = layer(np.zeros(x_shape, dtype=dtype))
    dx = layer.backward(np.zeros(y.shape, dtype=dtype))
    assert y.shape == tuple(y_t.shape) and dx.shape == x_shape and y.dtype == dx.dtype == dtype
    for name, p in reference.named_parameters():     # sums over no rows: zeros of the parameter's shape
        np.testing.assert_array_equal(dict(layer.named_parameters())[name].grad, p.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5), (4, 0), (0,), (2, 3, 0, 1)])
def test_relu_empty_input_matches_torch(dtype, shape):
    x_t = t64(np.zeros(shape), requires_grad=True)
    y_t = torch.relu(x_t)
    y_t.backward(torch.zeros_like(y_t))
    relu = nr.nn.ReLU()
    y = relu(np.zeros(shape, dtype=dtype))
    dx = relu.backward(np.zeros(shape, dtype=dtype))
    assert y.shape == dx.shape == tuple(x_t.grad.shape) == shape and y.dtype == dx.dtype == dtype


# --- BatchNorm2d(bias=False), affine=False, track_running_stats=False -------------------------------------

LAYER_OPTIONS = [dict(bias=False), dict(bias=False, track_running_stats=False), dict(affine=False),
                 dict(affine=False, track_running_stats=False), dict(track_running_stats=False), {}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("layer", LAYER_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_batchnorm_options_match_torch(dtype, train, relu, layer):
    """Two batches in a row (running statistics carried over), each compared in full."""
    reference = _random_bn_pair(4, 20, **layer).train(train)
    bn = _numres_twin(reference, dtype, **layer).train(train)
    rng = np.random.default_rng(21)
    for step in range(2):
        bn.zero_grad()
        reference.zero_grad()
        x = 1.5 + 2.0 * rng.standard_normal((3, 4, 5, 3))
        _check_bn_against_torch(bn, reference, x, dtype, seed=22 + step, relu=relu)


@pytest.mark.parametrize("layer", LAYER_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_batchnorm_options_state_dict_and_printing(layer):
    reference = torch.nn.BatchNorm2d(6, **layer)
    bn = nr.nn.BatchNorm2d(6, **layer)
    assert list(bn.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in bn.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert repr(bn) == classic_repr(reference)
    assert (bn.bias is None) == (reference.bias is None) and (bn.weight is None) == (reference.weight is None)
    bn.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, strict=True)


def test_batchnorm_bias_false_prints_as_torch_2_13():
    assert repr(nr.nn.BatchNorm2d(4, bias=False)) == str(torch.nn.BatchNorm2d(4, bias=False)) == (
        "BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True)")
    with pytest.raises(TypeError):                      # keyword-only, as in PyTorch
        nr.nn.BatchNorm2d(4, 1e-5, 0.1, True, True, False)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_bias_false_finite_differences(train, relu):
    bn = nr.nn.BatchNorm2d(3, bias=False, dtype="float64")
    rng = np.random.default_rng(23)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 3) * np.array([1, -1, 1])
    bn.running_mean[...], bn.running_var[...] = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    bn.train(train)
    x = rng.standard_normal((2, 3, 3, 4))
    result = nr.gradcheck(bn, x, forward_kwargs={"relu": relu})
    assert set(result.errors) == {"input", "weight"}
    assert result.worst < FD_TOL, f"finite differences disagree with backward:\n{result}"


# --- Frozen parameters ------------------------------------------------------------------------------------

class MatmulSpy(np.ndarray):
    """An array that counts the matrix products it takes part in (as ``x`` in ``dy^T @ x``)."""

    products = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            MatmulSpy.products += 1
        plain = tuple(np.asarray(i) if isinstance(i, MatmulSpy) else i for i in inputs)
        return getattr(ufunc, method)(*plain, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_linear_skips_the_weight_gemm(dtype, bias):
    """With the weight frozen, backward never multiplies by the saved input (the dW = dy^T x GEMM);
    dx and the bias gradient are the same as with a learning weight, and match PyTorch."""
    rng = np.random.default_rng(30)
    reference = torch.nn.Linear(6, 4, bias=bias).double()
    x = rng.standard_normal((5, 6))
    upstream = rng.standard_normal((5, 4))
    grads = {}
    for frozen in (False, True):
        layer = nr.nn.Linear(6, 4, bias=bias, dtype=dtype)
        layer.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
        layer.weight.requires_grad = not frozen
        y = layer(x.astype(dtype).view(MatmulSpy))
        MatmulSpy.products = 0
        dx = layer.backward(upstream.astype(dtype))
        assert MatmulSpy.products == (0 if frozen else 1), "weight-gradient GEMM ran" if frozen else "spy broken"
        grads[frozen] = (np.asarray(y), np.asarray(dx), layer.weight.grad,
                         None if layer.bias is None else layer.bias.grad)
    assert grads[True][2] is None
    np.testing.assert_array_equal(grads[True][1], grads[False][1])
    if bias:
        np.testing.assert_array_equal(grads[True][3], grads[False][3])

    reference.weight.requires_grad_(False)
    x_t = t64(x, requires_grad=True)
    reference(x_t).backward(t64(upstream))
    assert_close(grads[True][0], reference(x_t).detach(), dtype, "output")
    assert_close(grads[True][1], x_t.grad, dtype, "input gradient")
    if bias:
        assert_close(grads[True][3], reference.bias.grad, dtype, "bias gradient")


def test_linear_backward_need_weight_grad_keyword():
    rng = np.random.default_rng(31)
    x, weight, bias, dy = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal(2), \
        rng.standard_normal((3, 2))
    _, cache = functional_linear.linear_forward(x, weight, bias)
    dx, dweight, dbias = functional_linear.linear_backward(dy, cache, need_weight_grad=False)
    full = functional_linear.linear_backward(dy, cache)
    assert dweight is None
    np.testing.assert_array_equal(dx, full[0])
    np.testing.assert_array_equal(dbias, full[2])
    assert rel_err(full[1], dy.T @ x) < 1e-15


def _count_tile_passes(monkeypatch):
    """Count the tiled passes (map_tiles calls) BatchNorm's backward makes."""
    calls = []
    original = functional_bn.map_tiles

    def counting(function, *args, **kwargs):
        calls.append(function.__name__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(functional_bn, "map_tiles", counting)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("frozen", [("weight", "bias"), ("bias",), ("weight",)], ids=lambda f: "+".join(f))
def test_frozen_batchnorm(monkeypatch, dtype, train, relu, frozen):
    """Frozen parameters get no gradient and dx is bit-for-bit the dx of a learning layer (in training
    mode too: dx does not depend on whether the weight learns).  With both frozen in evaluation mode
    the reduction pass is skipped: backward makes one pass over the data instead of two.  PyTorch
    with the same parameters frozen agrees."""
    reference = _random_bn_pair(4, 40).train(train)
    x = np.random.default_rng(41).standard_normal((2, 4, 3, 5))
    upstream = np.random.default_rng(42).standard_normal(x.shape).astype(dtype)
    results = {}
    for freeze in (False, True):
        bn = _numres_twin(reference, dtype).train(train)
        if freeze:
            for name in frozen:
                getattr(bn, name).requires_grad = False
        bn(x.astype(dtype), relu=relu)
        passes = _count_tile_passes(monkeypatch)
        dx = bn.backward(upstream)
        monkeypatch.undo()
        results[freeze] = (dx, passes, {n: p.grad for n, p in bn.named_parameters()})
    np.testing.assert_array_equal(results[True][0], results[False][0])
    for name, grad in results[True][2].items():
        if name in frozen:
            assert grad is None, f"frozen {name} got a gradient"
        else:
            np.testing.assert_array_equal(grad, results[False][2][name])
    assert results[False][1] == ["tile_sums", "tile_dx"]
    skipped = len(frozen) == 2 and not train
    assert results[True][1] == (["tile_dx"] if skipped else ["tile_sums", "tile_dx"])

    for name in frozen:
        getattr(reference, name).requires_grad_(False)
    bn = _numres_twin(reference, dtype).train(train)
    for name in frozen:
        getattr(bn, name).requires_grad = False
    _check_bn_against_torch(bn, reference, x, dtype, seed=43, relu=relu)


def test_batchnorm_backward_need_param_grads_keyword():
    rng = np.random.default_rng(44)
    x, weight, bias = rng.standard_normal((2, 3, 2, 2)), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    for train in (True, False):
        if train:
            _, cache = functional_bn.batchnorm_train_forward(x, weight, bias, None, None)
        else:
            _, cache = functional_bn.batchnorm_eval_forward(x, weight, bias, np.zeros(3), np.ones(3))
        dx, dweight, dbias = functional_bn.batchnorm_backward(dy, cache, need_param_grads=False)
        assert dweight is None and dbias is None
        np.testing.assert_array_equal(dx, functional_bn.batchnorm_backward(dy, cache)[0])

