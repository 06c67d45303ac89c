"""numres.optim.SGD against torch.optim.SGD: parameters (and momentum buffers) after every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from conftest import TORCH_DTYPE, assert_close, to_torch

VARIANTS = {
    "plain": dict(lr=0.1),
    "momentum+wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov+wd": dict(lr=0.05, momentum=0.9, weight_decay=5e-3, nesterov=True),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-3),
    "maximize": dict(lr=0.01, momentum=0.5, maximize=True),
}


def small_net(nn, **where):
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, **where), nn.BatchNorm2d(4, **where),
                         nn.ReLU(**where), nn.AdaptiveAvgPool2d(1, **where), nn.Flatten(**where),
                         nn.Linear(4, 5, **where))


def twin_nets(dtype, seed=0):
    nr.manual_seed(seed)
    ours = small_net(nr.nn, dtype=dtype)
    theirs = small_net(torch.nn).to(TORCH_DTYPE[dtype])
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    return ours, theirs


def train_step(ours, theirs, opt_ours, opt_theirs, x, target, dtype):
    """One forward/backward/step on both sides; the loss is cross-entropy with label smoothing."""
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype=dtype)
    opt_ours.zero_grad()
    crit(ours(x), target)
    ours.backward(crit.backward())
    opt_ours.step()
    opt_theirs.zero_grad()
    torch.nn.functional.cross_entropy(theirs(to_torch(x)), torch.from_numpy(target), label_smoothing=0.1).backward()
    opt_theirs.step()


def assert_params_equal(ours, theirs, dtype, when):
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        assert_close(mine[name].data, p, dtype, f"{name} {when}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_three_steps_match_torch(variant, dtype):
    ours, theirs = twin_nets(dtype)
    opt_ours = nr.optim.SGD(ours.parameters(), **VARIANTS[variant])
    opt_theirs = torch.optim.SGD(theirs.parameters(), **VARIANTS[variant])
    rng = np.random.default_rng(1)
    for step in range(3):
        x = rng.standard_normal((4, 3, 7, 7)).astype(dtype)
        target = rng.integers(0, 5, 4)
        train_step(ours, theirs, opt_ours, opt_theirs, x, target, dtype)
        assert_params_equal(ours, theirs, dtype, f"after step {step + 1}")
    if VARIANTS[variant].get("momentum"):
        buffers = opt_ours.state_dict()["state"]
        for index, p in enumerate(theirs.parameters()):
            assert_close(buffers[index]["momentum_buffer"], opt_theirs.state[p]["momentum_buffer"], dtype,
                         f"momentum buffer {index}")


def test_same_gradients_give_the_same_update():
    """Isolates the optimizer: both sides get identical gradients (no model in between)."""
    rng = np.random.default_rng(2)
    shapes = [(3, 2, 3, 3), (5,), (4, 7)]
    ours = [nr.nn.Parameter(rng.standard_normal(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
    kwargs = dict(lr=0.3, momentum=0.7, dampening=0.1, weight_decay=0.05)
    opt_ours, opt_theirs = nr.optim.SGD(ours, **kwargs), torch.optim.SGD(theirs, **kwargs)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            g = rng.standard_normal(a.shape)
            a.grad, b.grad = g.copy(), torch.from_numpy(g.copy())
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert R.rel_err(a.data, b) < 1e-14


def test_param_groups_and_missing_grads():
    """Per-group hyper-parameters; a parameter without a gradient is left alone (as in PyTorch)."""
    ours, theirs = twin_nets("float64", seed=3)
    groups = lambda m: [{"params": list(m[0].parameters()), "lr": 0.5},  # noqa: E731
                        {"params": list(m[5].parameters()), "momentum": 0.9}]
    opt_ours = nr.optim.SGD(groups(ours), lr=0.1, weight_decay=1e-3)
    opt_theirs = torch.optim.SGD(groups(theirs), lr=0.1, weight_decay=1e-3)
    rng = np.random.default_rng(4)
    for step in range(3):
        train_step(ours, theirs, opt_ours, opt_theirs, rng.standard_normal((4, 3, 6, 6)), rng.integers(0, 5, 4),
                   "float64")
        assert_params_equal(ours, theirs, "float64", f"after step {step + 1}")
    frozen = ours[1].weight.data.copy()
    ours[1].weight.grad = None
    opt_ours.step()
    np.testing.assert_array_equal(ours[1].weight.data, frozen)


@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_round_trip(tmp_path, through_file):
    """Two steps, save the optimizer (and model), restore both into fresh objects: the third step is unchanged."""
    kwargs = VARIANTS["nesterov+wd"]
    rng = np.random.default_rng(5)
    data = [(rng.standard_normal((4, 3, 6, 6)), rng.integers(0, 5, 4)) for _ in range(3)]
    ours, theirs = twin_nets("float64", seed=6)
    opt_ours = nr.optim.SGD(ours.parameters(), **kwargs)
    opt_theirs = torch.optim.SGD(theirs.parameters(), **kwargs)
    for x, t in data[:2]:
        train_step(ours, theirs, opt_ours, opt_theirs, x, t, "float64")
    model_state, opt_state = ours.state_dict(), opt_ours.state_dict()
    if through_file:
        nr.save({"model": model_state, "optimizer": opt_state}, tmp_path / "ckpt.npz")
        loaded = nr.load(tmp_path / "ckpt.npz")
        model_state, opt_state = loaded["model"], loaded["optimizer"]
    else:
        model_state = {k: np.array(v) for k, v in model_state.items()}
    restored, _ = twin_nets("float64", seed=99)
    restored.load_state_dict(model_state)
    opt_restored = nr.optim.SGD(restored.parameters(), lr=123.0)
    opt_restored.load_state_dict(opt_state)
    assert opt_restored.param_groups[0]["lr"] == kwargs["lr"] and opt_restored.param_groups[0]["nesterov"]
    train_step(restored, theirs, opt_restored, opt_theirs, *data[2], "float64")
    assert_params_equal(restored, theirs, "float64", "after restoring and stepping")


def test_state_dict_layout_matches_torch():
    ours, theirs = twin_nets("float64")
    opt_ours = nr.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    train_step(ours, theirs, opt_ours, opt_theirs, np.ones((2, 3, 5, 5)) * np.arange(5), np.array([1, 3]), "float64")
    mine, reference = opt_ours.state_dict(), opt_theirs.state_dict()
    assert sorted(mine["state"]) == sorted(reference["state"])
    assert mine["param_groups"][0]["params"] == reference["param_groups"][0]["params"]
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert mine["param_groups"][0][key] == reference["param_groups"][0][key], key


def test_invalid_hyper_parameters():
    params = [nr.nn.Parameter(np.zeros(3))]
    with pytest.raises(ValueError, match="learning rate"):
        nr.optim.SGD(params, lr=-1)
    with pytest.raises(ValueError, match="momentum"):
        nr.optim.SGD(params, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="[Nn]esterov"):
        nr.optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty"):
        nr.optim.SGD([], lr=0.1)


def test_zero_grad():
    param = nr.nn.Parameter(np.ones(3))
    param.grad = np.full(3, 2.0)
    opt = nr.optim.SGD([param], lr=0.1)
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(param.grad, np.zeros(3))
    opt.zero_grad()
    assert param.grad is None
