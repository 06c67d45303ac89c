"""Module hooks: register_forward_pre_hook, register_forward_hook, register_full_backward_hook.

References are PyTorch's own hooks on the same layers (tests/torch_reference.py for whole
models) and plain bookkeeping of what each module was given and returned.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
from conftest import assert_close, copy_torch_params
from torch_reference import build

WEIGHTED = (nr.nn.Conv2d, nr.nn.BatchNorm2d, nr.nn.Linear)


def _weighted_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, WEIGHTED)}


def test_hooks_fire_for_every_conv_bn_linear_of_resnet18(rng):
    model = nr.resnet18(num_classes=5)
    forward, pre, backward = [], [], []
    names = {id(module): name for name, module in model.named_modules()}
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            module.register_forward_pre_hook(lambda m, inputs: pre.append(names[id(m)]))
            module.register_forward_hook(lambda m, inputs, out: forward.append(names[id(m)]))
            module.register_full_backward_hook(lambda m, gin, gout: backward.append(names[id(m)]))
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits = model(x)
    model.backward(rng.standard_normal(logits.shape).astype(np.float32))

    expected = _weighted_names(model)
    assert len(expected) == 20 + 20 + 1         # 20 convolutions, 20 BatchNorms, 1 Linear
    for fired in (forward, pre, backward):
        assert sorted(fired) == sorted(expected)     # each exactly once
    assert pre == forward                            # leaves: pre-hook and hook in the same order
    assert forward[0] == "conv1" and forward[-1] == "fc"
    assert backward[0] == "fc" and backward[-1] == "conv1"


def test_container_hooks_nest(rng):
    model = nr.resnet18(num_classes=3)
    events = []
    for name in ("", "layer1", "layer1.0", "layer1.0.conv1"):
        module = dict(model.named_modules())[name]
        module.register_forward_pre_hook(lambda m, i, name=name: events.append(("enter", name)))
        module.register_forward_hook(lambda m, i, o, name=name: events.append(("leave", name)))
        module.register_full_backward_hook(lambda m, gi, go, name=name: events.append(("backward", name)))
    logits = model(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    model.backward(rng.standard_normal(logits.shape).astype(np.float32))
    assert events == [("enter", ""), ("enter", "layer1"), ("enter", "layer1.0"), ("enter", "layer1.0.conv1"),
                      ("leave", "layer1.0.conv1"), ("leave", "layer1.0"), ("leave", "layer1"), ("leave", ""),
                      ("backward", "layer1.0.conv1"), ("backward", "layer1.0"), ("backward", "layer1"),
                      ("backward", "")]


def test_hooks_see_what_the_module_received_and_returned(rng):
    model = nr.resnet18(num_classes=4, dtype="float64")
    seen = {}
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, inputs, out, name=name: seen.setdefault(name, {}).update(
            x=inputs[0].copy(), y=out.copy()))
        module.register_full_backward_hook(lambda m, gin, gout, name=name: seen.setdefault(name, {}).update(
            gin=gin, gout=tuple(None if g is None else g.copy() for g in gout)))
    x = rng.standard_normal((2, 3, 32, 32))
    logits = model(x)
    dlogits = rng.standard_normal(logits.shape)
    dx = model.backward(dlogits.copy())

    # the model's own hooks see its argument and its result
    assert np.array_equal(seen[""]["x"], x) and np.array_equal(seen[""]["y"], logits)
    assert np.array_equal(seen[""]["gout"][0], dlogits) and seen[""]["gin"][0] is dx
    # along a chain, each module's input is its predecessor's output, and gradients mirror that
    chain = ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2"]
    for before, after in zip(chain, chain[1:]):
        assert np.array_equal(seen[after]["x"], seen[before]["y"])
        assert np.array_equal(seen[before]["gout"][0], seen[after]["gin"][0])
    assert np.array_equal(seen["layer1"]["x"], seen["maxpool"]["y"])
    assert np.array_equal(seen["maxpool"]["gout"][0], seen["layer1"]["gin"][0])
    assert seen["conv1"]["gin"][0] is dx
    # a Linear's grad_input is dL/dy @ W
    assert np.allclose(seen["fc"]["gin"][0], dlogits @ nr.to_numpy(model.fc.weight.data), rtol=1e-12, atol=1e-14)


def test_conv_hook_gradients_match_torch_full_backward_hook(rng):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=True).double()
    layer = nr.nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype="float64")
    copy_torch_params(reference, layer)
    captured, expected = {}, {}
    layer.register_full_backward_hook(lambda m, gin, gout: captured.update(gin=gin[0], gout=gout[0]))
    reference.register_full_backward_hook(lambda m, gin, gout: expected.update(gin=gin[0], gout=gout[0]))

    x = rng.standard_normal((2, 3, 7, 9))
    dy = rng.standard_normal((2, 4, 4, 5))
    tx = torch.from_numpy(x).requires_grad_(True)
    reference(tx).backward(torch.from_numpy(dy))
    layer(x)
    layer.backward(dy)
    assert_close(captured["gout"], expected["gout"], "float64", "grad_output")
    assert_close(captured["gin"], expected["gin"], "float64", "grad_input")
    assert_close(captured["gin"], tx.grad, "float64", "grad_input vs x.grad")


def test_resnet18_hooks_match_torch_per_layer(rng):
    """Per-layer activations and gradients seen by hooks agree with PyTorch's hooks on the reference model.

    numres runs ReLU fused into the BatchNorm before it, so a hook on such a BatchNorm sees the
    output *after* the ReLU (and the gradient with respect to it); its grad_input is dL/d(input)
    as in PyTorch.  The other layers see exactly what PyTorch's do.
    """
    torch.manual_seed(0)
    reference = build("resnet18", num_classes=6).double()
    for module in reference.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False          # PyTorch's full backward hooks forbid in-place ops on outputs
    model = nr.resnet18(num_classes=6, dtype="float64")
    copy_torch_params(reference, model)

    def record(store, to_numpy):
        hooks = {}
        for name, module in store["model"].named_modules():
            if isinstance(module, store["types"]):
                hooks[name] = {}
                module.register_forward_hook(lambda m, i, o, d=hooks[name]: d.update(y=to_numpy(o)))
                module.register_full_backward_hook(
                    lambda m, gi, go, d=hooks[name]: d.update(gin=to_numpy(gi[0]), gout=to_numpy(go[0])))
        return hooks

    theirs = record({"model": reference, "types": (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)},
                    lambda t: None if t is None else t.detach().numpy().copy())
    ours = record({"model": model, "types": WEIGHTED}, lambda a: None if a is None else nr.to_numpy(a).copy())

    x = rng.standard_normal((2, 3, 33, 31))
    dy = rng.standard_normal((2, 6))
    tx = torch.from_numpy(x).requires_grad_(True)
    reference(tx).backward(torch.from_numpy(dy))
    model(x)
    model.backward(dy)

    fused = {name for name, m in model.named_modules() if name.endswith("bn1") or (
        name.endswith("bn2") and isinstance(dict(model.named_modules())[name.rsplit(".", 1)[0]], nr.Bottleneck))}
    assert set(ours) == set(theirs)
    for name in ours:
        if name in fused:
            assert_close(ours[name]["y"], np.maximum(theirs[name]["y"], 0), "float64", f"{name} output (+ReLU)")
        else:
            assert_close(ours[name]["y"], theirs[name]["y"], "float64", f"{name} output")
            assert_close(ours[name]["gout"], theirs[name]["gout"], "float64", f"{name} grad_output")
        assert_close(ours[name]["gin"], theirs[name]["gin"], "float64", f"{name} grad_input")


def test_removed_hooks_stop_firing(rng):
    layer = nr.nn.Linear(3, 2)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, i: calls.append("pre")),
               layer.register_forward_hook(lambda m, i, o: calls.append("forward")),
               layer.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))]
    keep = layer.register_forward_hook(lambda m, i, o: calls.append("kept"))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    layer.backward(np.ones_like(layer(x)) * 0.5)
    assert calls == ["pre", "forward", "kept", "backward"]
    for handle in handles:
        handle.remove()
    handles[0].remove()                     # removing twice is harmless
    calls.clear()
    layer.backward(np.ones_like(layer(x)) * 0.5)
    assert calls == ["kept"]
    keep.remove()
    assert not layer._forward_hooks and not layer._forward_pre_hooks and not layer._backward_hooks


def test_hooks_can_remove_themselves_while_running(rng):
    layer = nr.nn.ReLU()
    calls = []
    handles = {}

    def once(m, i, o):
        calls.append("once")
        handles["once"].remove()
    handles["once"] = layer.register_forward_hook(once)
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    layer(x)
    layer(x)
    assert calls == ["once"]


def test_return_values_replace_input_output_and_grad_input(rng):
    layer = nr.nn.Linear(3, 2, dtype="float64")
    x = rng.standard_normal((4, 3))
    plain = layer(x)

    pre = layer.register_forward_pre_hook(lambda m, inputs: (inputs[0] * 2,))
    assert np.allclose(layer(x), layer.forward(2 * x))
    pre.remove()
    pre = layer.register_forward_pre_hook(lambda m, inputs: inputs[0] * 3)      # a bare array also works
    assert np.allclose(layer(x), layer.forward(3 * x))
    pre.remove()

    hook = layer.register_forward_hook(lambda m, inputs, out: out + 100)
    second = layer.register_forward_hook(lambda m, inputs, out: out * 2)       # hooks chain, in order
    assert np.allclose(layer(x), (plain + 100) * 2)
    hook.remove()
    second.remove()
    assert np.array_equal(layer(x), plain)

    dy = rng.standard_normal((4, 2))
    natural = layer.backward(dy)
    layer.zero_grad()
    layer.register_full_backward_hook(lambda m, gin, gout: (gin[0] * -1,))
    layer(x)                                                  # each backward needs its own forward
    assert np.allclose(layer.backward(dy), -natural)
    none_hook = layer.register_full_backward_hook(lambda m, gin, gout: None)     # None keeps the value
    layer(x)
    assert np.allclose(layer.backward(dy), -natural)
    none_hook.remove()


def test_backward_hook_replacement_propagates_to_earlier_layers(rng):
    """Zeroing one block's grad_input stops every gradient in front of it, as in PyTorch."""
    model = nr.resnet18(num_classes=3)
    model.layer2.register_full_backward_hook(lambda m, gin, gout: (np.zeros_like(gin[0]),))
    logits = model(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    dx = model.backward(rng.standard_normal(logits.shape).astype(np.float32))
    assert not np.any(dx)
    assert not np.any(model.layer1[0].conv1.weight.grad)
    assert np.any(model.layer3[0].conv1.weight.grad)


def test_pre_hook_sees_block_input_and_can_log_shapes(rng):
    model = nr.ResNet(nr.Bottleneck, [1, 1, 2, 1], num_classes=2)
    shapes = []
    for block in list(model.layer3)[:2]:
        block.register_forward_pre_hook(lambda m, inputs: shapes.append(tuple(inputs[0].shape)))
    model(rng.standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert shapes == [(1, 512, 8, 8), (1, 1024, 4, 4)]


@pytest.mark.parametrize("make", [lambda: nr.nn.BatchNorm2d(3), lambda: nr.nn.MaxPool2d(2),
                                  lambda: nr.nn.AdaptiveAvgPool2d(1), lambda: nr.nn.ReLU()])
def test_backward_hook_on_other_layers_matches_torch(rng, make):
    layer = make().to(dtype="float64")
    torch_layer = {nr.nn.BatchNorm2d: lambda: torch.nn.BatchNorm2d(3), nr.nn.MaxPool2d: lambda: torch.nn.MaxPool2d(2),
                   nr.nn.AdaptiveAvgPool2d: lambda: torch.nn.AdaptiveAvgPool2d(1),
                   nr.nn.ReLU: lambda: torch.nn.ReLU()}[type(layer)]().double()
    captured, expected = {}, {}
    layer.register_full_backward_hook(lambda m, gin, gout: captured.update(gin=gin[0]))
    torch_layer.register_full_backward_hook(lambda m, gin, gout: expected.update(gin=gin[0]))
    x = rng.standard_normal((2, 3, 5, 4))
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    torch_layer(torch.from_numpy(x).requires_grad_(True)).backward(torch.from_numpy(dy))
    layer.backward(dy)
    assert_close(captured["gin"], expected["gin"], "float64", f"{type(layer).__name__} grad_input")
