"""Every hand-written backward against central finite differences (``numres.gradcheck``, float64).

These checks need no PyTorch: they compare each backward with the derivative of the
module's own forward.  Inputs are random normal, so no ReLU or max-pool input sits
within the finite-difference step of a kink.
"""
from __future__ import annotations

import numpy as np
import pytest

import numres as nr
from numres.models.resnet import BasicBlock, Bottleneck, conv1x1

TOL = 1e-6        # central differences with h = 1e-6 in float64 are good to about 1e-8 here


@pytest.fixture(autouse=True)
def seeded_initialisation():
    """Each test draws its weights from the same seed, whatever ran before it: an unlucky draw could put
    a ReLU input within the finite-difference step of its kink (seen once, in a full-suite run)."""
    nr.manual_seed(0)


def check(module, x, tol=TOL, **kwargs):
    """Run gradcheck and assert that every tensor (input and each parameter) passed."""
    result = nr.gradcheck(module, x, **kwargs)
    expected = {"input", *(name for name, _ in module.named_parameters())} if kwargs.get("params", True) \
        else {"input"}
    assert set(result.errors) == expected, "gradcheck skipped a tensor"
    assert result.worst < tol, f"finite differences disagree with backward:\n{result}"
    return result


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def randomize_bn(bn, seed):
    rng = np.random.default_rng(seed + 1000)     # not the inputs' seeds: x must not equal running_mean
    c = bn.num_features
    if bn.affine:
        bn.weight.data[...] = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)
        bn.bias.data[...] = rng.standard_normal(c)
    if bn.track_running_stats:
        bn.running_mean[...] = rng.standard_normal(c)
        bn.running_var[...] = rng.uniform(0.5, 2.0, c)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 5, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), (1, 2, 5, 4)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 7, 5)),
    (dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3, bias=False), (1, 3, 1, 1)),
    (dict(in_channels=4, out_channels=2, kernel_size=1, stride=2, bias=False), (2, 4, 5, 5)),
])
def test_conv2d(kwargs, shape):
    check(nr.nn.Conv2d(**kwargs, dtype="float64"), rand(*shape))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm(train, relu, affine):
    bn = nr.nn.BatchNorm2d(3, affine=affine, dtype="float64")
    randomize_bn(bn, 1)
    bn.train(train)
    check(bn, rand(2, 3, 3, 4, seed=1), forward_kwargs={"relu": relu})


def test_relu():
    check(nr.nn.ReLU(dtype="float64"), rand(2, 3, 4, 5, seed=2))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=3, stride=2, ceil_mode=True),
])
def test_maxpool(kwargs):
    check(nr.nn.MaxPool2d(**kwargs, dtype="float64"), rand(2, 2, 7, 6, seed=3))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), divisor_override=5),
])
def test_avgpool(kwargs):
    check(nr.nn.AvgPool2d(**kwargs, dtype="float64"), rand(2, 2, 7, 6, seed=4))


@pytest.mark.parametrize("size", [1, (3, 2), (4, None), (5, 8)])
def test_adaptive_avgpool(size):
    check(nr.nn.AdaptiveAvgPool2d(size, dtype="float64"), rand(2, 2, 7, 5, seed=5))


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    check(nr.nn.Linear(5, 4, bias=bias, dtype="float64"), rand(3, 5, seed=6))
    check(nr.nn.Linear(5, 4, bias=bias, dtype="float64"), rand(2, 3, 5, seed=7))


def test_flatten_identity_sequential():
    check(nr.nn.Flatten(dtype="float64"), rand(2, 3, 2, 2, seed=8))
    check(nr.nn.Identity(dtype="float64"), rand(2, 3, seed=9))
    # No conv bias before a training-mode BN: its true gradient is exactly zero, leaving only rounding noise.
    seq = nr.nn.Sequential(nr.nn.Conv2d(2, 3, 3, padding=1, bias=False, dtype="float64"),
                           nr.nn.BatchNorm2d(3, dtype="float64"),
                           nr.nn.ReLU(dtype="float64"), nr.nn.MaxPool2d(2, dtype="float64"),
                           nr.nn.Flatten(dtype="float64"), nr.nn.Linear(12, 4, dtype="float64"))
    check(seq, rand(2, 2, 4, 4, seed=10))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_cross_entropy(reduction, smoothing):
    crit = nr.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing, dtype="float64")
    check(crit, rand(4, 5, seed=11), forward_kwargs={"target": np.array([0, 4, 2, 2])})


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_basic_block(train, stride):
    where = dict(dtype="float64")
    downsample = None if stride == 1 else nr.nn.Sequential(conv1x1(4, 6, stride, **where),
                                                           nr.nn.BatchNorm2d(6, **where))
    block = BasicBlock(4, 4 if stride == 1 else 6, stride, downsample, **where)
    for i, module in enumerate(block.modules()):
        if isinstance(module, nr.nn.BatchNorm2d):
            randomize_bn(module, 20 + i)
    block.train(train)
    check(block, rand(2, 4, 5, 5, seed=12), max_entries=25)


@pytest.mark.parametrize("train", [True, False])
def test_bottleneck_with_downsample(train):
    """A ResNeXt-style Bottleneck: grouped, strided 3x3 and a strided 1x1 + BN shortcut."""
    where = dict(dtype="float64")
    downsample = nr.nn.Sequential(conv1x1(6, 16, 2, **where), nr.nn.BatchNorm2d(16, **where))
    block = Bottleneck(6, 4, stride=2, downsample=downsample, groups=2, base_width=64, **where)
    for i, module in enumerate(block.modules()):
        if isinstance(module, nr.nn.BatchNorm2d):
            randomize_bn(module, 40 + i)
    block.train(train)
    check(block, rand(2, 6, 5, 5, seed=13), max_entries=25)


def test_bottleneck_without_downsample():
    block = Bottleneck(16, 4, dtype="float64")
    check(block, rand(2, 16, 3, 3, seed=14), max_entries=20)


@pytest.mark.slow
def test_resnet18_train_mode():
    """The whole model: one random entry of the input and of each of the 62 parameters.

    64x64 with batch 1 keeps at least 4 values per channel in layer4's BatchNorms.  A stem weight
    moves thousands of activations at once, so a step of 1e-6 can carry one across a ReLU or max-pool
    kink (an O(h) error; seen at 1e-3 for other draws); the fixed seed and one entry per tensor avoid
    that, and test_resnet.py checks every gradient exactly against PyTorch.
    """
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=7, dtype="float64")
    check(model, rand(1, 3, 64, 64, seed=15), max_entries=1, tol=1e-5)


@pytest.mark.slow
def test_resnet18_eval_mode_input_gradient():
    nr.manual_seed(1)
    model = nr.resnet18(num_classes=7, dtype="float64")
    for i, module in enumerate(model.modules()):
        if isinstance(module, nr.nn.BatchNorm2d):
            randomize_bn(module, 100 + i)
    model.eval()
    check(model, rand(1, 3, 32, 32, seed=16), max_entries=8, params=False, tol=1e-5)


class _WrongReLU(nr.nn.ReLU):
    """A ReLU whose backward is off by a factor of 1.01: gradcheck must notice."""

    def backward(self, grad_output):
        return 1.01 * super().backward(grad_output)


def test_gradcheck_catches_a_wrong_backward():
    result = nr.gradcheck(_WrongReLU(dtype="float64"), rand(3, 4, seed=17))
    assert 0.005 < result.errors["input"] < 0.02


def test_gradcheck_leaves_the_module_untouched():
    conv = nr.nn.Conv2d(2, 2, 3, dtype="float64")
    conv.weight.grad = np.zeros_like(conv.weight.data)
    before = {k: v.copy() for k, v in conv.state_dict().items()}
    nr.gradcheck(conv, rand(1, 2, 4, 4, seed=18))
    assert conv.dtype == np.float64 and not conv.weight.grad.any() and conv.bias.grad is None
    for key, value in conv.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_gradcheck_refuses_a_float32_module():
    """Finite differences in float32 cannot check a backward: no verdict at all, and the fix is named."""
    with pytest.raises(ValueError, match=r"float64 module, got float32.*to\(dtype='float64'\)"):
        nr.gradcheck(nr.nn.Linear(3, 2), rand(2, 3, seed=19))


class _CorruptedLinear(nr.nn.Linear):
    """A Linear whose backward writes ``value`` into entry ``entry`` (flat) of one gradient, or scales it."""

    def __init__(self, tensor, entry=0, value=np.nan, scale=None):
        super().__init__(4, 3, dtype="float64")
        self.tensor, self.entry, self.value, self.scale = tensor, entry, value, scale

    def backward(self, grad_output):
        dx = super().backward(grad_output)
        grad = dx if self.tensor == "input" else getattr(self, self.tensor).grad
        if self.scale is not None:
            grad *= self.scale
        else:
            grad.reshape(-1)[self.entry] = self.value
        return dx


CORRUPTED = ["input", "weight", "bias"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("entry", ["first", "later"])
@pytest.mark.parametrize("tensor", CORRUPTED)
def test_gradcheck_fails_on_a_non_finite_gradient(tensor, entry, value):
    """NaN or +-inf in any entry of any gradient fails, with that tensor named, even when the entry is not
    among the sampled ones (max_entries=1 checks one entry per tensor, but every entry is looked at)."""
    module = _CorruptedLinear(tensor, value=value)
    size = {"input": 2 * 4, "weight": 3 * 4, "bias": 3}[tensor]
    module.entry = 0 if entry == "first" else size - 1
    for max_entries in (None, 1):
        result = nr.gradcheck(module, rand(2, 4, seed=20), max_entries=max_entries)
        assert not result.passed() and not result.passed(tolerance=1e9)
        assert result.failed_tensors() == [tensor]
        assert tensor in result.problems and "entry" in result.problems[tensor]
        assert not result.worst <= 1e-6, "worst dropped the non-finite error"
        assert f"FAIL" in str(result) and tensor in str(result)


@pytest.mark.parametrize("tensor", CORRUPTED)
def test_gradcheck_fails_on_a_one_percent_error(tensor):
    """A gradient 1% off fails, whichever tensor it is in, not only the input's."""
    result = nr.gradcheck(_CorruptedLinear(tensor, scale=1.01), rand(2, 4, seed=21))
    assert result.failed_tensors() == [tensor]
    assert 0.005 < result.errors[tensor] < 0.02
    assert not result.passed()


def test_gradcheck_fails_on_a_non_finite_forward():
    """A forward that is not finite near the checked point gives non-finite numeric gradients: a failure."""
    class LogLayer(nr.nn.Module):
        def forward(self, x):
            self.x = x
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log(x)

        def backward(self, dy):             # finite everywhere: only the numeric side goes bad
            return dy / np.where(self.x == 0, 1.0, self.x)

    x = np.abs(rand(2, 3, seed=22)) + 0.5
    x[1, 2] = 1e-7                     # log(x - h) is NaN: only this entry's difference breaks
    result = nr.gradcheck(LogLayer(dtype="float64"), x)
    assert result.errors["input"] == np.inf and not result.passed()
    assert "not finite around entry (1, 2)" in result.problems["input"]


def test_worst_keeps_nan_and_inf():
    """Python's max() drops a NaN unless it comes first; worst must not."""
    for errors in ({"input": 1e-10, "weight": np.nan, "bias": 1e-11}, {"a": np.nan, "b": 0.0}):
        result = nr.GradcheckResult(errors=errors, checked={k: 1 for k in errors})
        assert np.isnan(result.worst) and not result.passed()
    result = nr.GradcheckResult(errors={"input": 1e-10, "bias": np.inf}, checked={"input": 1, "bias": 1})
    assert result.worst == np.inf and not result.passed()


def test_result_prints_a_verdict_with_its_tolerance():
    good = nr.gradcheck(nr.nn.Linear(4, 3, dtype="float64"), rand(2, 4, seed=23), tolerance=1e-7)
    assert good.passed() and str(good).splitlines()[-1].startswith("PASS") and "1e-07" in str(good)
    bad = nr.gradcheck(_CorruptedLinear("bias", scale=1.01), rand(2, 4, seed=23))
    assert str(bad).splitlines()[-1].startswith("FAIL") and "<- fails" in str(bad)
