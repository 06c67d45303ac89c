"""A second backward without a new forward: caches are freed after use, and ``retain_graph=True`` keeps them.

PyTorch raises on a second ``backward`` through the same graph unless the first one kept it;
numres does the same instead of silently adding the gradients twice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import numres.nn.module as module_state
import torch_reference as R

SECOND_TIME = r"backward\(\) called a second time after its saved cache was freed; run forward again, " \
              r"or pass retain_graph=True to the first backward"


def _small_resnet(seed=0):
    nr.manual_seed(seed)
    model = nr.ResNet(nr.BasicBlock, [1, 1, 1, 1], num_classes=4, dtype="float64")
    R.randomize_batchnorms(model, seed + 1)
    reference = R.ResNet(R.BasicBlock, [1, 1, 1, 1], num_classes=4).double()
    R.load_numres_state(reference, model)
    return model, reference


def _grads(model):
    return {name: None if p.grad is None else np.array(p.grad) for name, p in model.named_parameters()}


def _cached(model):
    return [name for name, m in model.named_modules() if m._cache is not None]


def test_second_backward_raises_and_adds_nothing():
    model, _ = _small_resnet()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16))
    dy = rng.standard_normal((2, 4))
    model(x)
    model.backward(dy)
    first = _grads(model)
    assert _cached(model) == []                                   # every cache let go
    with pytest.raises(RuntimeError, match="ResNet." + SECOND_TIME):
        model.backward(dy)
    after = _grads(model)
    assert all(np.array_equal(after[name], first[name]) for name in first)     # nothing added twice
    model(x)                                                      # a new forward makes backward work again
    model.backward(dy)
    assert all(np.array_equal(p.grad, 2 * first[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("make, shape", [
    (lambda: nr.nn.Conv2d(3, 4, 3, dtype="float64"), (2, 3, 6, 5)),
    (lambda: nr.nn.BatchNorm2d(3, dtype="float64"), (2, 3, 4, 4)),
    (lambda: nr.nn.Linear(5, 2, dtype="float64"), (3, 5)),
    (lambda: nr.nn.MaxPool2d(2), (1, 2, 4, 4)),
    (lambda: nr.nn.ReLU(), (2, 3)),
    (lambda: nr.nn.Flatten(), (2, 3, 2)),
    (lambda: nr.nn.Sequential(nr.nn.Linear(5, 3, dtype="float64"), nr.nn.ReLU()), (2, 5)),
])
def test_every_layer_refuses_a_second_backward(make, shape):
    layer = make()
    rng = np.random.default_rng(1)
    y = layer(rng.standard_normal(shape))
    dy = rng.standard_normal(y.shape)
    layer.backward(dy)
    with pytest.raises(RuntimeError, match=SECOND_TIME):
        layer.backward(dy)


def test_loss_refuses_a_second_backward():
    criterion = nr.nn.CrossEntropyLoss()
    criterion(np.random.default_rng(2).standard_normal((3, 4)), np.array([0, 3, 1]))
    criterion.backward()
    with pytest.raises(RuntimeError, match="CrossEntropyLoss." + SECOND_TIME):
        criterion.backward()


def test_backward_before_forward_and_under_no_grad_keep_their_own_message():
    layer = nr.nn.Linear(3, 2, dtype="float64")
    with pytest.raises(RuntimeError, match=r"called before forward\(\)"):
        layer.backward(np.zeros((1, 2)))
    x = np.random.default_rng(3).standard_normal((1, 3))
    layer(x)
    layer.backward(np.random.default_rng(4).standard_normal((1, 2)))
    with nr.no_grad():
        layer(x)
    with pytest.raises(RuntimeError, match=r"called before forward\(\) \(or the forward ran under numres.no_grad"):
        layer.backward(np.zeros((1, 2)))


def test_retain_graph_keeps_every_cache_and_matches_torch():
    """Two backwards through one forward, the first with retain_graph=True: gradients add up, as in
    PyTorch (checked in float64), and every descendant kept its cache for the second one."""
    model, reference = _small_resnet(seed=3)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 17, 15))
    dy1, dy2 = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    model(x)
    holding = _cached(model)
    assert len(holding) > 20
    dx1 = model.backward(dy1, retain_graph=True)
    assert _cached(model) == holding                              # the flag reached every descendant
    dx2 = model.backward(dy2)
    assert _cached(model) == []

    x_t = torch.from_numpy(x).requires_grad_(True)
    logits = reference(x_t)
    logits.backward(torch.from_numpy(dy1), retain_graph=True)
    first_dx = x_t.grad.clone()
    logits.backward(torch.from_numpy(dy2))
    assert R.rel_err(dx1, first_dx) <= 1e-10
    assert R.rel_err(dx2, x_t.grad - first_dx) <= 1e-10
    torch_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert R.rel_err(p.grad, torch_params[name].grad) <= 1e-10, name
    with pytest.raises(RuntimeError, match=SECOND_TIME):
        model.backward(dy1)


def test_retain_graph_ends_with_its_backward_even_when_it_fails():
    model, _ = _small_resnet()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 16, 16))

    def fail(module, grad_input, grad_output):
        raise ValueError("hook failed")

    handle = model.layer2.register_full_backward_hook(fail)
    model(x)
    with pytest.raises(ValueError, match="hook failed"):
        model.backward(rng.standard_normal((2, 4)), retain_graph=True)
    handle.remove()
    assert module_state._retain_graph is False
    model(x)
    model.backward(rng.standard_normal((2, 4)))
    assert _cached(model) == []


def test_caches_are_freed_as_backward_walks_back():
    """When layer1's backward starts, the later stages have already let their caches go: that is what
    lowers peak memory during backward."""
    model, _ = _small_resnet()
    seen = {}

    def before_layer1(module, grad_input, grad_output):       # runs when layer2's backward has finished
        seen["cached"] = _cached(model)

    model.layer2.register_full_backward_hook(before_layer1)
    rng = np.random.default_rng(7)
    model(rng.standard_normal((2, 3, 16, 16)))
    model.backward(rng.standard_normal((2, 4)))
    cached = seen["cached"]
    assert cached and not any(name.startswith(("layer2", "layer3", "layer4", "fc")) for name in cached), cached
    assert any(name.startswith("layer1") for name in cached)
    assert "" in cached                                          # the model's own cache goes last


def test_training_loop_with_fresh_forwards_is_unaffected():
    """The ordinary loop (forward, loss, backward, step) needs no retain_graph."""
    model, _ = _small_resnet()
    optimizer = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nr.nn.CrossEntropyLoss()
    rng = np.random.default_rng(8)
    for _ in range(2):
        optimizer.zero_grad()
        criterion(model(rng.standard_normal((2, 3, 16, 16))), rng.integers(0, 4, 2))
        model.backward(criterion.backward())
        optimizer.step()
    assert _cached(model) == [] and not criterion._cache
