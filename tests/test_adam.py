"""numres.optim.Adam / AdamW against torch.optim.Adam / AdamW (single-tensor path): parameters and
moments after every step, parameter groups, state dicts (PyTorch's layout, bit-exact resume), and
the GPU path under the guard backend (no host round trip in step())."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
from conftest import assert_close, to_torch
from numres.testing import GuardedArray, no_transfers
from test_optim import twin_nets

OPTIMIZERS = {"Adam": (nr.optim.Adam, torch.optim.Adam), "AdamW": (nr.optim.AdamW, torch.optim.AdamW)}

FLOAT32_TRAINING_BOUND = 1e-5     # see test_training_a_network_matches_torch
VARIANTS = {
    "defaults": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2, amsgrad=True),
    "weight_decay": dict(lr=5e-3, weight_decay=0.1),
    "amsgrad+wd+maximize": dict(lr=5e-3, weight_decay=0.05, amsgrad=True, maximize=True),
    # 1 - beta1 >= 1/2 takes the other branch of PyTorch's lerp; a large eps matters in the denominator
    "low_betas+eps": dict(lr=2e-2, betas=(0.3, 0.6), eps=1e-3),
    "low_betas+amsgrad+wd": dict(lr=2e-2, betas=(0.5, 0.9), weight_decay=0.2, amsgrad=True),
}

# Shapes that cover a vector, a matrix, a conv weight stored channels-last (the tiled path walks
# memory order) and one large enough to be split into several tiles across threads.
SHAPES = [(5,), (4, 7), (6, 3, 3, 3), (300, 700)]


def random_params(rng, dtype="float64"):
    arrays = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
    arrays[2] = np.ascontiguousarray(arrays[2].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)   # channels-last
    ours = [nr.nn.Parameter(a) for a in arrays]
    theirs = [torch.nn.Parameter(torch.from_numpy(np.array(a, order="C"))) for a in arrays]
    return ours, theirs


def set_random_grads(rng, ours, theirs):
    for a, b in zip(ours, theirs):
        g = rng.standard_normal(a.shape) * rng.uniform(0.01, 3.0)
        a.grad = np.empty_like(a.data)          # same memory layout as the parameter
        a.grad[...] = g
        b.grad = torch.from_numpy(g.copy())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_five_steps_match_torch(name, variant):
    """Identical gradients on both sides: after each of 5 steps every parameter and moment agrees."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    rng = np.random.default_rng(11)
    ours, theirs = random_params(rng)
    opt_ours = ours_cls(ours, **VARIANTS[variant])
    opt_theirs = torch_cls(theirs, foreach=False, **VARIANTS[variant])
    worst = 0.0
    for step in range(5):
        set_random_grads(rng, ours, theirs)
        opt_ours.step()
        opt_theirs.step()
        for index, (a, b) in enumerate(zip(ours, theirs)):
            worst = max(worst, assert_close(a.data, b, "float64", f"param {index} after step {step + 1}"))
    state = opt_ours.state_dict()["state"]
    for index, b in enumerate(theirs):
        reference = opt_theirs.state[b]
        assert state[index]["step"] == float(reference["step"]) == 5.0
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if VARIANTS[variant].get("amsgrad") else ()):
            assert_close(state[index][key], reference[key], "float64", f"{key} of param {index}")
    assert worst < 1e-13, worst


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_param_groups_match_torch(name):
    """Per-group lr, betas, amsgrad, weight decay and maximize; a group option that is left out
    takes the default."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    rng = np.random.default_rng(12)
    ours, theirs = random_params(rng)

    def groups(params):
        return [{"params": params[:2], "lr": 3e-2, "betas": (0.8, 0.95), "amsgrad": True},
                {"params": params[2:], "weight_decay": 0.3, "maximize": True}]

    opt_ours = ours_cls(groups(ours), lr=1e-2, eps=1e-6)
    opt_theirs = torch_cls(groups(theirs), lr=1e-2, eps=1e-6, foreach=False)
    for step in range(5):
        set_random_grads(rng, ours, theirs)
        opt_ours.step()
        opt_theirs.step()
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a.data, b, "float64", f"param {index} after step {step + 1}")
    assert opt_ours.param_groups[1]["lr"] == 1e-2 and opt_ours.param_groups[1]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", ["amsgrad+wd+maximize", "low_betas+amsgrad+wd"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_a_network_matches_torch(name, variant, dtype):
    """Forward, loss, backward and 5 optimizer steps of a small conv net on both sides.

    float64 is checked against torch float64 to 1e-10.  float32 is judged against that float64
    truth alone, to FLOAT32_TRAINING_BOUND = 1e-5 per parameter: about 170 float32 unit roundoffs
    (2^-24 = 6e-8).  Measured: at most 3.3e-7 (numres) and 2.1e-7 (torch's own float32) over these
    variants, so the bound leaves a 30x margin for another CPU's summation order, while a float32
    formula that loses precision (a bias correction or a square root taken in a cancelling order, a
    moment rounded to float16-like precision) or any algorithmic slip lands far above it."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    ours, _ = twin_nets(dtype, seed=21)
    _, truth = twin_nets("float64", seed=21)
    opt_ours = ours_cls(ours.parameters(), **VARIANTS[variant])
    opt_truth = torch_cls(truth.parameters(), foreach=False, **VARIANTS[variant])
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype=dtype)
    rng = np.random.default_rng(22)
    for step in range(5):
        x = rng.standard_normal((4, 3, 7, 7))
        target = rng.integers(0, 5, 4)
        opt_ours.zero_grad()
        crit(ours(x.astype(dtype)), target)
        ours.backward(crit.backward())
        opt_ours.step()
        opt_truth.zero_grad()
        torch.nn.functional.cross_entropy(truth(to_torch(x)), torch.from_numpy(target), label_smoothing=0.1).backward()
        opt_truth.step()
    truth_params = dict(truth.named_parameters())
    assert list(truth_params) == [pname for pname, _ in ours.named_parameters()]
    for pname, p in ours.named_parameters():
        assert p.data.dtype == np.dtype(dtype), pname
        assert_close(p.data, truth_params[pname], dtype, pname,
                     tol=None if dtype == "float64" else FLOAT32_TRAINING_BOUND)


@pytest.mark.parametrize("through_file", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_is_bit_exact(tmp_path, name, through_file):
    """Two steps, save, restore into fresh parameters and a fresh optimizer, three more steps: the
    parameters are bit-for-bit those of a run that never stopped."""
    ours_cls, _ = OPTIMIZERS[name]
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)
    rng = np.random.default_rng(13)
    start = [p.data.copy() for p in random_params(rng)[0]]
    grads = [[rng.standard_normal(a.shape) for a in start] for _ in range(5)]

    def run(params, opt, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.copy()
            opt.step()

    straight = [nr.nn.Parameter(a.copy()) for a in start]
    run(straight, ours_cls(straight, **kwargs), grads)

    first = [nr.nn.Parameter(a.copy()) for a in start]
    opt_first = ours_cls(first, **kwargs)
    run(first, opt_first, grads[:2])
    state = {"params": [p.data for p in first], "optimizer": opt_first.state_dict()}
    if through_file:
        nr.save(state, tmp_path / "adam.npz")
        state = nr.load(tmp_path / "adam.npz")
    resumed = [nr.nn.Parameter(np.array(a)) for a in state["params"]]
    opt_resumed = ours_cls(resumed, lr=123.0)
    opt_resumed.load_state_dict(state["optimizer"])
    assert opt_resumed.param_groups[0]["betas"] == (0.8, 0.99) and opt_resumed.param_groups[0]["amsgrad"]
    assert opt_resumed.state_dict()["state"][0]["step"] == 2.0
    run(resumed, opt_resumed, grads[2:])
    for a, b in zip(resumed, straight):
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_layout_matches_torch_and_loads_torch_state(name, amsgrad):
    """The state dict has torch's keys; torch's own state dict loads into numres, which then takes
    the same next step as torch."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    rng = np.random.default_rng(14)
    ours, theirs = random_params(rng)
    opt_ours = ours_cls(ours, lr=1e-2, amsgrad=amsgrad)
    opt_theirs = torch_cls(theirs, lr=1e-2, amsgrad=amsgrad, foreach=False)
    for _ in range(2):
        set_random_grads(rng, ours, theirs)
        opt_ours.step()
        opt_theirs.step()
    mine, reference = opt_ours.state_dict(), opt_theirs.state_dict()
    assert sorted(mine["state"]) == sorted(reference["state"])
    for index in reference["state"]:
        assert sorted(mine["state"][index]) == sorted(reference["state"][index])
        assert isinstance(mine["state"][index]["step"], float)          # a host number, never a device array
    mine_group, reference_group = mine["param_groups"][0], reference["param_groups"][0]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay", "params"):
        assert mine_group[key] == reference_group[key], key

    # torch's state dict (torch tensors, a tensor step) into a fresh numres optimizer
    fresh = [nr.nn.Parameter(b.detach().numpy().copy()) for b in theirs]
    opt_fresh = ours_cls(fresh, lr=0.5)
    opt_fresh.load_state_dict(opt_theirs.state_dict())
    assert opt_fresh.state_dict()["state"][0]["step"] == 2.0
    set_random_grads(rng, fresh, theirs)
    opt_fresh.step()
    opt_theirs.step()
    for index, (a, b) in enumerate(zip(fresh, theirs)):
        assert_close(a.data, b, "float64", f"param {index} after loading torch's state")


def test_adamw_differs_from_adam_with_l2_and_equals_adam_decoupled():
    rng = np.random.default_rng(15)
    start = rng.standard_normal((6, 5))
    grads = [rng.standard_normal((6, 5)) for _ in range(3)]
    results = {}
    for label, make in {"adam": lambda p: nr.optim.Adam(p, lr=0.1, weight_decay=0.5),
                        "adamw": lambda p: nr.optim.AdamW(p, lr=0.1, weight_decay=0.5),
                        "adam_decoupled": lambda p: nr.optim.Adam(p, lr=0.1, weight_decay=0.5,
                                                                  decoupled_weight_decay=True)}.items():
        param = nr.nn.Parameter(start.copy())
        opt = make([param])
        for g in grads:
            param.grad = g.copy()
            opt.step()
        results[label] = param.data
    np.testing.assert_array_equal(results["adamw"], results["adam_decoupled"])
    assert np.abs(results["adamw"] - results["adam"]).max() > 1e-3


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_on_the_guard_backend_makes_no_host_round_trip(name):
    """The GPU path: moments live on the device, the step count on the host, and a step reads no
    device value (the guard refuses float(), .item() and .get() inside no_transfers())."""
    ours_cls, _ = OPTIMIZERS[name]
    rng = np.random.default_rng(16)
    host, _ = random_params(rng)
    device = [nr.nn.Parameter(nr.backend.convert(p.data, "guard")) for p in host]
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)
    opt_host, opt_device = ours_cls(host, **kwargs), ours_cls(device, **kwargs)
    for _ in range(3):
        for h, d in zip(host, device):
            g = rng.standard_normal(h.shape)
            h.grad = g.copy()
            d.grad = nr.backend.asarray(g, "guard")
        opt_host.step()
        with no_transfers():
            opt_device.step()
    for h, d in zip(host, device):
        assert isinstance(d.data, GuardedArray)
        np.testing.assert_allclose(nr.to_numpy(d.data), h.data, rtol=1e-14, atol=1e-14)
    state = opt_device.state_dict()["state"][0]
    assert isinstance(state["step"], float) and isinstance(state["exp_avg"], GuardedArray)


def test_moments_follow_the_model_when_it_moves():
    """After ``model.to(dtype=...)`` the moments are converted to the parameters' new dtype."""
    nr.manual_seed(3)
    model = nr.nn.Linear(4, 3, dtype="float64")
    opt = nr.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(17)
    for _ in range(2):
        opt.zero_grad()
        model(rng.standard_normal((2, 4)).astype(model.dtype))
        model.backward(rng.standard_normal((2, 3)).astype(model.dtype))
        opt.step()
        model.to(dtype="float32")
    assert all(value.dtype == np.float32 for state in opt.state_dict()["state"].values()
               for key, value in state.items() if key != "step")


@pytest.mark.parametrize("bad, match", [
    (dict(lr=float("nan")), "learning rate: nan"), (dict(lr=float("inf")), "learning rate: inf"),
    (dict(lr=-1e-3), "learning rate: -0.001"), (dict(betas=(1.0, 0.999)), "beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1: -0.1"),
    (dict(betas=(float("nan"), 0.9)), "index 0: nan"), (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "epsilon value: 0.0"), (dict(eps=-1e-8), "epsilon value"),
    (dict(eps=float("inf")), "epsilon value: inf"), (dict(weight_decay=-0.1), "weight_decay value: -0.1"),
    (dict(weight_decay=float("nan")), "weight_decay value: nan"),
])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_hyperparameters_are_refused(name, bad, match):
    ours_cls, _ = OPTIMIZERS[name]
    params = [nr.nn.Parameter(np.zeros(3))]
    with pytest.raises(ValueError, match=match):
        ours_cls(params, **bad)
    with pytest.raises(ValueError, match=match):                 # in a group's own options too
        ours_cls([{"params": params, **bad}])
