"""Freezing parameters for fine-tuning: ``p.requires_grad = False`` and ``module.requires_grad_(False)``.

A frozen parameter gets no gradient, its layer skips the weight-gradient work, optimizers leave
it alone, and the input gradient that flows through it is unchanged.  Checked against PyTorch in
float64 (relative error <= 1e-10) and by central finite differences.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from numres.functional import conv_algorithms
from numres.functional.dispatch import ops_for

TOL64 = 1e-10


def _resnet18(seed=0, num_classes=5):
    nr.manual_seed(seed)
    model = nr.resnet18(num_classes=num_classes, dtype="float64")
    R.randomize_batchnorms(model, seed + 1)
    reference = R.build("resnet18", num_classes=num_classes).double()
    R.load_numres_state(reference, model)
    return model, reference


def _freeze_all_but_fc(model):
    returned = model.requires_grad_(False)
    assert returned is model                                    # chainable, as torch's
    assert model.fc.requires_grad_(True) is model.fc
    return model


def test_requires_grad_flags_every_parameter_and_keeps_listing_them():
    model = nr.resnet18(num_classes=3)
    names = [name for name, _ in model.named_parameters()]
    _freeze_all_but_fc(model)
    assert [name for name, _ in model.named_parameters()] == names        # frozen ones are still listed
    assert len(list(model.parameters())) == len(names)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert list(model.state_dict()) == list(nr.resnet18(num_classes=3).state_dict())
    model.requires_grad_()                                                # default True unfreezes
    assert all(p.requires_grad for p in model.parameters())
    param = model.fc.weight
    assert param.requires_grad_(False) is param and not param.requires_grad


def test_fine_tuning_only_fc_matches_torch_and_moves_nothing_else():
    """Three SGD steps (momentum, weight decay) with every parameter handed to the optimizer but only
    fc trainable: fc follows PyTorch to 1e-10, every other parameter stays bit-identical with grad None,
    and the BN running statistics (which train mode still updates) follow PyTorch."""
    model, reference = _resnet18()
    _freeze_all_but_fc(model).train()
    reference.requires_grad_(False)
    reference.fc.requires_grad_(True)
    reference.train()
    before = {name: nr.to_numpy(p.data).copy() for name, p in model.named_parameters()}
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    optimizer = nr.optim.SGD(model.parameters(), **hyper)
    torch_optimizer = torch.optim.SGD(reference.parameters(), **hyper)
    criterion = nr.nn.CrossEntropyLoss()
    rng = np.random.default_rng(7)
    for _ in range(3):
        x = rng.standard_normal((3, 3, 32, 32))
        target = rng.integers(0, 5, 3)
        optimizer.zero_grad()
        criterion(model(x), target)
        model.backward(criterion.backward(), need_input_grad=False)
        for name, p in model.named_parameters():
            if not name.startswith("fc."):
                assert p.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
        torch_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(target)).backward()
        torch_optimizer.step()

    torch_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert not np.array_equal(p.data, before[name]), f"{name} did not move"
            error = R.rel_err(p.data, torch_params[name])
            assert error <= TOL64, f"{name}: {error:.2e} from torch"
        else:
            assert np.array_equal(p.data, before[name]), f"frozen {name} moved"
            assert p.grad is None
    torch_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if buffer.dtype.kind == "f":
            assert R.rel_err(buffer, torch_buffers[name]) <= TOL64, name
        else:
            assert np.array_equal(buffer, torch_buffers[name].numpy()), name


class _Spy:
    """Wraps a functional op and records the value of one keyword in each call (its default when absent)."""

    def __init__(self, function, keyword):
        self.function, self.keyword, self.calls = function, keyword, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs.get(self.keyword, True))
        return self.function(*args, **kwargs)


def test_frozen_layers_skip_their_weight_gradient_work(monkeypatch):
    """The time a frozen backbone saves is the weight-gradient GEMMs (and BN's parameter reductions) it
    skips: every frozen layer asks its backward op for no parameter gradient; the trainable fc does."""
    model, _ = _resnet18()
    _freeze_all_but_fc(model).train()
    ops = ops_for(model.backend)
    spies = {}
    # Convolutions are spied where every algorithm's backward is chosen (im2col, Winograd, implicit GEMM).
    for owner, op, keyword in [(conv_algorithms, "conv2d_backward", "need_weight_grad"),
                               (ops, "batchnorm_backward", "need_param_grads"),
                               (ops, "linear_backward", "need_weight_grad")]:
        spies[op] = _Spy(getattr(owner, op), keyword)
        monkeypatch.setattr(owner, op, spies[op])
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32))
    logits = model(x)
    model.backward(np.random.default_rng(4).standard_normal(logits.shape))
    conv_count = sum(isinstance(m, nr.nn.Conv2d) for m in model.modules())
    bn_count = sum(isinstance(m, nr.nn.BatchNorm2d) for m in model.modules())
    assert spies["conv2d_backward"].calls == [False] * conv_count
    assert spies["batchnorm_backward"].calls == [False] * bn_count
    assert spies["linear_backward"].calls == [True]

    for spy in spies.values():
        spy.calls.clear()
    model.requires_grad_(True)                                  # unfrozen: every layer computes its gradients
    logits = model(x)
    model.backward(np.random.default_rng(5).standard_normal(logits.shape))
    assert spies["conv2d_backward"].calls == [True] * conv_count
    assert spies["batchnorm_backward"].calls == [True] * bn_count


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_input_gradient_through_a_frozen_backbone_matches_torch(mode):
    """dL/dx through frozen convolutions and BatchNorms (eval: running statistics; train: batch
    statistics) is what PyTorch gives with the same parameters frozen."""
    model, reference = _resnet18(seed=2)
    _freeze_all_but_fc(model)
    reference.requires_grad_(False)
    reference.fc.requires_grad_(True)
    getattr(model, mode)()
    getattr(reference, mode)()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 33, 31))                    # odd sizes
    upstream = rng.standard_normal((2, 5))
    x_t = torch.from_numpy(x).requires_grad_(True)
    logits_t = reference(x_t)
    logits_t.backward(torch.from_numpy(upstream))
    logits = model(x)
    dx = model.backward(upstream)
    assert R.rel_err(logits, logits_t) <= TOL64
    assert R.rel_err(dx, x_t.grad) <= TOL64
    assert R.rel_err(model.fc.weight.grad, reference.fc.weight.grad) <= TOL64
    assert R.rel_err(model.fc.bias.grad, reference.fc.bias.grad) <= TOL64
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("fc."))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_backbone_input_gradient_passes_finite_differences(mode):
    nr.manual_seed(4)
    model = nr.models.cifar.CifarResNet(1, num_classes=3, dtype="float64")     # 8 layers, 16-64 channels
    R.randomize_batchnorms(model, 5)
    _freeze_all_but_fc(model)
    getattr(model, mode)()
    x = np.random.default_rng(6).standard_normal((2, 3, 9, 7))
    result = nr.gradcheck(model, x, params=False, max_entries=30)
    assert result.checked["input"] == 30
    assert result.passed(1e-6), str(result)


def test_a_single_frozen_parameter():
    """``p.requires_grad = False`` on one parameter: that one gets no gradient, its neighbour does."""
    rng = np.random.default_rng(9)
    conv = nr.nn.Conv2d(3, 4, 3, padding=1, dtype="float64")
    conv.weight.requires_grad = False
    reference = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(nr.to_numpy(conv.weight.data)))
        reference.bias.copy_(torch.from_numpy(nr.to_numpy(conv.bias.data)))
    reference.weight.requires_grad_(False)
    x = rng.standard_normal((2, 3, 7, 5))
    dy = rng.standard_normal((2, 4, 7, 5))
    x_t = torch.from_numpy(x).requires_grad_(True)
    reference(x_t).backward(torch.from_numpy(dy))
    conv(x)
    dx = conv.backward(dy)
    assert conv.weight.grad is None
    assert R.rel_err(conv.bias.grad, reference.bias.grad) <= TOL64
    assert R.rel_err(dx, x_t.grad) <= TOL64
