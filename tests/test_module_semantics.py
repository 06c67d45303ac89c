"""Module, optimizer and state-dict semantics that PyTorch users rely on (found in review)."""
import numpy as np
import pytest
import torch

import numres as nr


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_loss_with_reduction_none_needs_its_gradient():
    criterion = nr.nn.CrossEntropyLoss(reduction="none")
    criterion(f32(3, 4), np.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"reduction='none'.*gradient"):
        criterion.backward()
    upstream = f32(3, seed=1)
    logits = torch.tensor(f32(3, 4), requires_grad=True)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="none").backward(
        torch.tensor(upstream))
    assert np.allclose(criterion.backward(upstream), logits.grad.numpy(), atol=1e-6)


def test_loss_gradient_of_the_wrong_shape_is_refused():
    criterion = nr.nn.CrossEntropyLoss()
    loss = criterion(f32(3, 4), np.array([0, 1, 2]))
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    with pytest.raises(ValueError, match=r"shape \(4,\).*shape \(\)"):
        criterion.backward(np.ones(4, np.float32))


def test_loss_runs_forward_hooks():
    criterion = nr.nn.CrossEntropyLoss()
    seen = []
    criterion.register_forward_hook(lambda module, inputs, output: seen.append((len(inputs), float(output))))
    loss = criterion(f32(3, 4), np.array([0, 1, 2]))
    assert seen == [(2, float(loss))]


def test_load_state_dict_copies_nothing_when_a_value_cannot_be_converted():
    model = nr.resnet18(num_classes=5)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = {k: np.zeros_like(v) for k, v in before.items()}
    state["fc.bias"] = np.array(["x"] * 5)
    with pytest.raises(nr.nn.StateDictError, match="fc.bias.*cannot be read as float32"):
        model.load_state_dict(state)
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in before.items())


def test_old_checkpoints_without_num_batches_tracked_load():
    """torchvision's original weights predate num_batches_tracked; PyTorch restarts the count at 0."""
    bn = nr.nn.BatchNorm2d(3)
    bn(f32(2, 3, 4, 4))
    state = {k: v for k, v in nr.nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"}
    assert bn.load_state_dict(state) == ([], [])
    assert int(bn.num_batches_tracked) == 0


def test_skipping_the_stem_gradient_does_not_stick():
    model = nr.resnet18(num_classes=4)
    criterion = nr.nn.CrossEntropyLoss()
    criterion(model(f32(2, 3, 32, 32)), np.array([1, 2]))
    assert model.backward(criterion.backward(), need_input_grad=False) is None
    criterion(model(f32(2, 3, 32, 32)), np.array([1, 2]))
    assert model.backward(criterion.backward()).shape == (2, 3, 32, 32)
    assert model.conv1.backward(np.ones(model.conv1(f32(2, 3, 32, 32)).shape, np.float32)).shape == (2, 3, 32, 32)


def test_a_shared_layer_is_one_parameter_set_updated_once():
    """Like PyTorch, parameters() lists a layer used twice once, so SGD updates it once.
    (numres keeps one cache per module, so a module called twice in one forward pass gets the
    gradient of its last call only; see README.)"""
    shared = nr.nn.Linear(3, 3)
    model = nr.nn.Sequential(shared, shared)
    assert len(list(model.parameters())) == 2
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]    # as PyTorch lists them

    reference_layer = torch.nn.Linear(3, 3)
    reference_layer.load_state_dict({k: torch.tensor(v) for k, v in shared.state_dict().items()})
    reference = torch.nn.Sequential(reference_layer, reference_layer)
    for param, twin in zip(model.parameters(), reference.parameters()):
        gradient = f32(*param.shape, seed=param.size)
        param.grad, twin.grad = gradient.copy(), torch.tensor(gradient)
    nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
    torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9).step()
    assert np.allclose(shared.weight.data, reference_layer.weight.detach().numpy(), atol=1e-7)


def test_sequential_slices_keep_their_names():
    model = nr.nn.Sequential(nr.nn.ReLU(), nr.nn.Linear(2, 2), nr.nn.Linear(2, 3))
    assert list(model[1:].state_dict()) == ["1.weight", "1.bias", "2.weight", "2.bias"]


def test_momentum_follows_a_model_moved_to_another_dtype():
    layer = nr.nn.Linear(3, 2)
    optimizer = nr.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    y = layer(f32(4, 3))
    layer.backward(np.ones_like(y))
    optimizer.step()
    layer.to(dtype="float64")
    layer.zero_grad()
    y = layer(f32(4, 3).astype(np.float64))
    layer.backward(np.ones_like(y))
    optimizer.step()
    assert optimizer.state_for(layer.weight)["momentum_buffer"].dtype == np.float64


def test_gradient_from_another_backend_is_refused_clearly():
    from numres.testing import guard
    layer = nr.nn.ReLU()
    y = layer(f32(2, 3))
    with pytest.raises(TypeError, match="backend 'numpy'"):
        layer.backward(guard.asarray(np.ones_like(y)) if hasattr(guard, "asarray") else guard.xp.asarray(y))
