"""numres.optim.SGD against torch.optim.SGD: parameters (and momentum buffers) after every step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from conftest import assert_close, to_torch

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
    # The reference is PyTorch in float64 holding the same (float32-rounded) values: a float64 truth, since
    # PyTorch's own float32 differs from CPU to CPU.
    theirs = small_net(torch.nn).to(torch.float64)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)).to(torch.float64) if np.asarray(v).dtype.kind == "f"
                            else torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    return ours, theirs


def train_step(ours, theirs, opt_ours, opt_theirs, x, target, dtype):
    """One forward/backward/step on both sides; the loss is cross-entropy with label smoothing."""
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype=dtype)
    opt_ours.zero_grad()
    crit(ours(x), target)
    ours.backward(crit.backward())
    opt_ours.step()
    opt_theirs.zero_grad()
    torch.nn.functional.cross_entropy(theirs(to_torch(x.astype(np.float64))), torch.from_numpy(target),
                                      label_smoothing=0.1).backward()
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


@pytest.mark.parametrize("bad, match", [
    (dict(lr=float("nan")), "learning rate: nan"), (dict(lr=float("inf")), "learning rate: inf"),
    (dict(lr=-0.1), "learning rate: -0.1"), (dict(momentum=float("nan")), "momentum value: nan"),
    (dict(momentum=-0.9), "momentum value: -0.9"), (dict(weight_decay=float("-inf")), "weight_decay value: -inf"),
    (dict(weight_decay=-1e-4), "weight_decay value: -0.0001"), (dict(dampening=float("nan")), "dampening value: nan"),
])
def test_sgd_refuses_non_finite_and_negative_hyper_parameters(bad, match):
    """Issue 9 item 5: NaN, infinities and negatives are refused up front, naming the value (PyTorch
    refuses the negatives but accepts NaN); a group's own options are checked too."""
    params = [nr.nn.Parameter(np.zeros(3))]
    with pytest.raises(ValueError, match=match):
        nr.optim.SGD(params, **{"lr": 0.1, **bad})
    with pytest.raises(ValueError, match=match):
        nr.optim.SGD([{"params": params, **bad}], lr=0.1)
    with pytest.raises(TypeError, match="must be a number"):
        nr.optim.SGD(params, lr="0.1")


def test_parameters_in_two_groups_are_refused():
    param = nr.nn.Parameter(np.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        nr.optim.SGD([{"params": [param]}, {"params": [param]}], lr=0.1)


def _optimizer_pairs():
    return {"SGD": (nr.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
            "Adam": (nr.optim.Adam, torch.optim.Adam, dict(lr=0.1, weight_decay=0.1, amsgrad=True)),
            "AdamW": (nr.optim.AdamW, torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1))}


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_frozen_parameters_and_missing_gradients_are_skipped(name):
    """Issue 9 item 11: ``requires_grad = False`` (even with a stale gradient) and ``grad is None``
    leave a parameter and its state alone, weight decay included; the others step as in PyTorch."""
    ours_cls, torch_cls, kwargs = _optimizer_pairs()[name]
    rng = np.random.default_rng(31)
    arrays = [rng.standard_normal(shape) for shape in [(4, 3), (5,), (2, 2, 3)]]
    ours = [nr.nn.Parameter(a.copy()) for a in arrays]
    theirs = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    ours[0].requires_grad = False
    theirs[0].requires_grad_(False)
    opt_ours, opt_theirs = ours_cls(ours, **kwargs), torch_cls(theirs, **kwargs)
    for step in range(3):
        ours[0].grad = rng.standard_normal((4, 3))          # a stale gradient on the frozen parameter
        g = rng.standard_normal((2, 2, 3))
        ours[2].grad, theirs[2].grad = g, torch.from_numpy(g.copy())
        ours[1].grad = theirs[1].grad = None                # took no part in this backward
        if step == 0:
            g = rng.standard_normal(5)
            ours[1].grad, theirs[1].grad = g, torch.from_numpy(g.copy())
        opt_ours.step()
        opt_theirs.step()
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a.data, b, "float64", f"param {index} after step {step + 1}")
    np.testing.assert_array_equal(ours[0].data, arrays[0])
    assert 0 not in opt_ours.state_dict()["state"]


def test_fine_tuning_only_fc_of_a_resnet18_moves_nothing_else():
    """The fine-tuning recipe: freeze the backbone, train ``fc`` (with weight decay): only fc moves,
    and the optimizer keeps state for fc alone."""
    nr.manual_seed(5)
    model = nr.resnet18(num_classes=7, dtype="float64")
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    opt = nr.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    crit = nr.nn.CrossEntropyLoss(dtype="float64")
    rng = np.random.default_rng(32)
    model.eval()                                            # keep BN statistics fixed too
    for _ in range(2):
        opt.zero_grad()
        crit(model(rng.standard_normal((2, 3, 16, 16))), rng.integers(0, 7, 2))
        model.backward(crit.backward())
        opt.step()
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert np.abs(p.data - before[name]).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(p.data, before[name], err_msg=name)
    assert sorted(opt.state_dict()["state"]) == [len(before) - 2, len(before) - 1]
