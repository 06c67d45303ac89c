"""BatchNorm folded into the convolution before it (evaluation mode), and the fused conv output pass.

Folded and unfolded evaluation forwards must agree to 1e-12 in float64; float32 is judged
against a float64 truth; backward through a folded model is checked against PyTorch and by
finite differences; the folded weights are remade after every kind of parameter change; hooks
and training mode run the unfolded path.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from error_measure import worst
from torch_reference import build, load_numres_state, model_parity, randomize_batchnorms, rel_err

import numres as nr
from numres.functional import conv as C
from numres.functional import fused
from numres.functional.batchnorm import BatchNormCache
from numres.models.cifar import CIFAR_MODELS
from numres.nn.fusion import FoldedBatchNormCache, conv_bn

RNG = np.random.default_rng(1234)


def make(name, dtype="float64", seed=0):
    builder = CIFAR_MODELS[name] if name in CIFAR_MODELS else getattr(nr, name)
    model = builder(num_classes=10, dtype=dtype)
    randomize_batchnorms(model, seed)
    return model.eval()


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nr.nn.BatchNorm2d)]


def image(n=2, size=32, channels=3):
    return RNG.standard_normal((n, channels, size, size))


@pytest.fixture(autouse=True)
def folding_on():
    nr.nn.set_batchnorm_folding(True)
    yield
    nr.nn.set_batchnorm_folding(True)


# --- folded forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "resnet20", "plain20"])
@pytest.mark.parametrize("algorithm", ["im2col", "auto"])
def test_folded_eval_forward_equals_unfolded_float64(name, algorithm):
    model = make(name)
    x = image()
    with nr.functional.conv_algorithm(algorithm):
        with nr.nn.batchnorm_folding(False):
            unfolded = model(x)
            assert all(isinstance(bn._cache, BatchNormCache) for bn in batchnorms(model))
        folded = model(x)
    # Every conv -> BN pair of these nets folded: no BatchNorm ran a pass of its own.
    assert all(isinstance(bn._cache, FoldedBatchNormCache) for bn in batchnorms(model))
    assert rel_err(folded, unfolded) <= 1e-12


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_float32_against_float64_truth(name):
    model64 = make(name)
    reference = build(name, num_classes=10).double().eval()
    load_numres_state(reference, model64)
    x = image()
    with torch.no_grad():
        truth = reference(torch.from_numpy(x)).numpy()
    model32 = copy.deepcopy(model64).to(dtype="float32")
    folded = model32(x.astype(np.float32))
    with nr.nn.batchnorm_folding(False):
        unfolded = model32(x.astype(np.float32))
    assert folded.dtype == np.float32
    assert rel_err(folded, truth) <= 1e-4
    assert rel_err(folded, truth) <= 3 * rel_err(unfolded, truth) + 1e-6   # folding costs no accuracy
    assert rel_err(model64(x), truth) <= 1e-10                          # and float64 folded is exact


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
@pytest.mark.parametrize("algorithm", ["im2col", "winograd"])
def test_eval_backward_through_folded_model_matches_torch(name, algorithm):
    """Gradients through a folded evaluation-mode model are the unfolded model's: checked against
    PyTorch's autograd in float64 (input gradient, every parameter gradient, buffers untouched).
    The forward must really have folded every BatchNorm (checked between forward and backward)."""
    model = make(name, seed=3)
    reference = build(name, num_classes=10).double().eval()
    load_numres_state(reference, model)
    x, upstream = image(), RNG.standard_normal((2, 10))
    folded = []

    def every_batchnorm_folded(m):
        folded.append([isinstance(bn._cache, FoldedBatchNormCache) for bn in batchnorms(m)])

    with nr.functional.conv_algorithm(algorithm):
        errors = model_parity(model, reference, x, upstream, after_forward=every_batchnorm_folded)
        assert all(isinstance(bn._cache, type(None)) for bn in batchnorms(model))   # freed after backward
    assert len(folded) == 1 and len(folded[0]) == len(batchnorms(model)) and all(folded[0]), folded
    name, error = worst(errors)
    assert error <= 1e-10, (name, error)


class ConvBn(nr.nn.Module):
    """One conv -> BN (-> ReLU) pair, through conv_bn, for the finite-difference checks."""

    def __init__(self, conv, relu):
        super().__init__(dtype="float64")
        self.conv, self.bn, self.relu = conv, nr.nn.BatchNorm2d(conv.out_channels, dtype="float64"), relu
        randomize_batchnorms(self, seed=7)

    def forward(self, x):
        return conv_bn(self.conv, self.bn, x, relu=self.relu)

    def backward(self, grad_output):
        return self.conv.backward(self.bn.backward(grad_output))


@pytest.mark.parametrize("conv_kwargs, relu", [
    (dict(kernel_size=3, padding=1, bias=True), True),
    (dict(kernel_size=3, stride=2, padding=1, groups=2, bias=False), False),
    (dict(kernel_size=1, bias=True), False),
])
def test_folded_pair_backward_agrees_with_finite_differences_and_torch(conv_kwargs, relu):
    conv = nr.nn.Conv2d(4, 6, dtype="float64", **conv_kwargs)
    pair = ConvBn(conv, relu).eval()
    x = RNG.standard_normal((2, 4, 7, 9))
    result = nr.gradcheck(pair, x, seed=2)
    assert result.worst <= 1e-6, str(result)

    upstream = RNG.standard_normal(pair(x).shape)
    assert isinstance(pair.bn._cache, FoldedBatchNormCache)
    pair.zero_grad()
    pair(x)
    dx = pair.backward(upstream)
    xt = torch.from_numpy(x).requires_grad_(True)
    w = torch.from_numpy(np.array(conv.weight.data)).requires_grad_(True)
    b = None if conv.bias is None else torch.from_numpy(np.array(conv.bias.data)).requires_grad_(True)
    gamma = torch.from_numpy(np.array(pair.bn.weight.data)).requires_grad_(True)
    beta = torch.from_numpy(np.array(pair.bn.bias.data)).requires_grad_(True)
    z = TF.conv2d(xt, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = TF.batch_norm(z, torch.from_numpy(pair.bn.running_mean.copy()), torch.from_numpy(pair.bn.running_var.copy()),
                      gamma, beta, training=False, eps=pair.bn.eps)
    if relu:
        y = torch.relu(y)
    y.backward(torch.from_numpy(upstream))
    assert rel_err(dx, xt.grad) <= 1e-10
    assert rel_err(conv.weight.grad, w.grad) <= 1e-10
    if b is not None:
        assert rel_err(conv.bias.grad, b.grad) <= 1e-10
    assert rel_err(pair.bn.weight.grad, gamma.grad) <= 1e-10
    assert rel_err(pair.bn.bias.grad, beta.grad) <= 1e-10


def test_frozen_parameters_get_no_gradient_through_a_folded_pair():
    pair = ConvBn(nr.nn.Conv2d(3, 5, 3, padding=1, bias=False, dtype="float64"), True).eval()
    pair.conv.weight.requires_grad_(False)
    x = RNG.standard_normal((2, 3, 6, 6))
    y = pair(x)
    pair.backward(RNG.standard_normal(y.shape))
    assert pair.conv.weight.grad is None and pair.bn.weight.grad is not None
    pair.requires_grad_(False)
    pair.zero_grad()
    y = pair(x)
    dx = pair.backward(RNG.standard_normal(y.shape))
    assert dx.shape == x.shape and all(p.grad is None for p in pair.parameters())


# --- when the folded weights are remade --------------------------------------------------------------

def assert_folded_matches_unfolded(model, x):
    folded = model(x)
    assert all(isinstance(bn._cache, FoldedBatchNormCache) for bn in batchnorms(model))
    with nr.nn.batchnorm_folding(False):
        unfolded = model(x)
    assert rel_err(folded, unfolded) <= 1e-12
    return folded


def test_refolds_after_optimizer_step():
    model = make("resnet18")
    x = image()
    before = assert_folded_matches_unfolded(model, x)
    optimizer = nr.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(x)
    model.backward(RNG.standard_normal((2, 10)))        # evaluation-mode backward, through the folded pairs
    optimizer.step()
    after = assert_folded_matches_unfolded(model, x)
    assert rel_err(after, before) > 1e-3                # the step did change the output


def test_refolds_after_load_state_dict_and_to_dtype():
    model, other = make("resnet18", seed=0), make("resnet18", seed=1)
    x = image()
    before = assert_folded_matches_unfolded(model, x)
    model.load_state_dict(other.state_dict())
    after = assert_folded_matches_unfolded(model, x)
    assert rel_err(after, other(x)) <= 1e-12 and rel_err(after, before) > 1e-3

    model32 = make("resnet18", seed=2).to(dtype="float32")
    model32(x.astype(np.float32))                        # folded in float32 first
    model32.to(dtype="float64")
    out = assert_folded_matches_unfolded(model32, x)
    assert out.dtype == np.float64
    assert all(conv.__dict__["_folded"][3].weight.dtype == np.float64
               for conv in model32.modules() if isinstance(conv, nr.nn.Conv2d))


def test_refolds_when_an_array_is_replaced_and_on_eval_after_an_in_place_write():
    model = make("resnet18")
    x = image()
    assert_folded_matches_unfolded(model, x)
    bn = model.layer1[0].bn1
    bn.weight.data = bn.weight.data * 1.7                # a new array: noticed at the next forward
    assert_folded_matches_unfolded(model, x)
    bn.running_var[...] *= 3.0                            # written in place: documented to need eval()
    model.eval()
    assert_folded_matches_unfolded(model, x)
    bn.reset_running_stats()                              # a method that writes buffers bumps the count itself
    assert_folded_matches_unfolded(model, x)


# --- the unfolded path -------------------------------------------------------------------------------

def test_hooks_on_a_batchnorm_run_that_pair_unfolded_and_fire():
    model = make("resnet50")
    x = image()
    expected = model(x)
    block = model.layer2[0]
    seen = {}
    handles = [
        block.bn2.register_forward_hook(lambda m, inputs, out: seen.update(bn_in=inputs[0], bn_out=out)),
        block.conv2.register_forward_hook(lambda m, inputs, out: seen.update(conv_out=out)),
        block.bn2.register_full_backward_hook(lambda m, gin, gout: seen.update(bn_grad=gin[0])),
        block.downsample.register_forward_hook(lambda m, inputs, out: seen.update(shortcut=out)),
    ]
    out = model(x)
    assert rel_err(out, expected) <= 1e-12
    # The hooked pairs ran unfolded: the hook saw the BatchNorm's real input (the conv's output).
    assert isinstance(block.bn2._cache, BatchNormCache) and isinstance(block.downsample[1]._cache, BatchNormCache)
    assert seen["bn_in"] is seen["conv_out"]
    assert "shortcut" in seen
    # Every other pair still folded.
    assert isinstance(block.bn1._cache, FoldedBatchNormCache) and isinstance(model.layer1[0].bn1._cache,
                                                                             FoldedBatchNormCache)
    model.backward(RNG.standard_normal((2, 10)))
    assert seen["bn_grad"].shape == seen["bn_in"].shape
    for handle in handles:
        handle.remove()
    model(x)
    assert isinstance(block.bn2._cache, FoldedBatchNormCache)


def test_training_mode_never_folds_and_drops_the_folded_weights():
    model = make("resnet18")
    x = image()
    model(x)
    assert all("_folded" in conv.__dict__ for conv in model.modules() if isinstance(conv, nr.nn.Conv2d))
    model.train()
    model(x)
    assert all(isinstance(bn._cache, BatchNormCache) and bn._cache.training for bn in batchnorms(model))
    assert not any("_folded" in conv.__dict__ for conv in model.modules() if isinstance(conv, nr.nn.Conv2d))


def test_no_grad_inference_keeps_nothing_and_equals_the_folded_forward():
    model = make("resnet50")
    x = image()
    with_grad = model(x)
    with nr.no_grad():
        inference = model(x)
    assert np.array_equal(inference, with_grad)
    assert all(m._cache is None for m in model.modules())
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(RNG.standard_normal((2, 10)))


def test_switch_and_its_errors():
    model = make("resnet18")
    x = image()
    nr.nn.set_batchnorm_folding(False)
    assert not nr.nn.is_batchnorm_folding_enabled()
    model(x)
    assert all(isinstance(bn._cache, BatchNormCache) for bn in batchnorms(model))
    nr.nn.set_batchnorm_folding(True)
    with pytest.raises(TypeError, match="True or False"):
        nr.nn.set_batchnorm_folding("no")


# --- the fused output pass ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, kernel, stride, padding, groups", [
    ((3, 8, 9, 7), (3, 3), (1, 1), (1, 1), 1),
    ((2, 8, 9, 7), (3, 3), (2, 2), (1, 1), 2),
    ((4, 8, 5, 6), (1, 1), (1, 1), (0, 0), 1),
    ((2, 6, 8, 8), (1, 1), (2, 2), (0, 0), 3),
    ((1, 3, 11, 11), (7, 7), (2, 2), (3, 3), 1),
])
@pytest.mark.parametrize("relu, with_bias", [(True, True), (False, True), (True, False)])
def test_conv_bias_relu_forward_matches_torch_in_small_chunks(monkeypatch, shape, kernel, stride, padding, groups,
                                                              relu, with_bias):
    monkeypatch.setattr(C, "WORKSPACE_ELEMENTS", 300)          # several image chunks
    x = RNG.standard_normal(shape).transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)   # channels-last
    weight = RNG.standard_normal((12, shape[1] // groups, *kernel))
    bias = RNG.standard_normal(12) if with_bias else None
    y, cache = fused.conv2d_bias_relu_forward(x, weight, bias, stride, padding, (1, 1), groups, relu=relu)
    expected = TF.conv2d(torch.from_numpy(x), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                         stride, padding, 1, groups)
    if relu:
        expected = torch.relu(expected)
    assert rel_err(y, expected) <= 1e-12
    # The cache is the im2col path's: its backward applies unchanged.
    dy = RNG.standard_normal(y.shape)
    _, dweight, _ = C.conv2d_backward(dy, cache)
    assert dweight.shape == weight.shape


def test_fold_conv_bn_in_float32_rounds_once():
    weight = RNG.standard_normal((6, 4, 3, 3))
    stats = [RNG.uniform(0.5, 1.5, 6), 0.1 * RNG.standard_normal(6), 0.1 * RNG.standard_normal(6),
             RNG.uniform(0.5, 2.0, 6)]
    exact = fused.fold_conv_bn(weight, None, *stats, 1e-5)
    single = fused.fold_conv_bn(weight.astype(np.float32), None, *[s.astype(np.float32) for s in stats], 1e-5)
    assert single.weight.dtype == np.float32 and single.bias.dtype == np.float32
    assert rel_err(single.weight, exact.weight) <= 2e-7 and rel_err(single.bias, exact.bias) <= 2e-7
