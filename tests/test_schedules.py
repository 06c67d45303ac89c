"""Learning-rate schedules against torch.optim.lr_scheduler, state dicts and the training config's schedules."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import numres as nr
from numres.nn import Parameter
from numres.optim import SGD
from numres.optim import lr_scheduler as S
from numres.training import TrainConfig, build_schedule

T = torch.optim.lr_scheduler
EPOCHS = 14


def numres_optimizer(lr=0.1):
    return SGD([{"params": [Parameter(np.zeros(2))]}, {"params": [Parameter(np.zeros(3))], "lr": lr / 4}],
               lr=lr, momentum=0.9)


def torch_optimizer(lr=0.1):
    return torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)]},
                            {"params": [torch.zeros(3, requires_grad=True)], "lr": lr / 4}], lr=lr, momentum=0.9)


CASES = {
    "multistep": (lambda o: S.MultiStepLR(o, [3, 7, 7], gamma=0.2), lambda o: T.MultiStepLR(o, [3, 7, 7], gamma=0.2)),
    "cosine": (lambda o: S.CosineAnnealingLR(o, T_max=9, eta_min=1e-3),
               lambda o: T.CosineAnnealingLR(o, T_max=9, eta_min=1e-3)),
    "linear": (lambda o: S.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=4),
               lambda o: T.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=4)),
    "warmup+cosine": (lambda o: S.linear_warmup(o, S.CosineAnnealingLR(o, T_max=10), 3, start_factor=0.1),
                      lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 3), T.CosineAnnealingLR(o, T_max=10)],
                                               milestones=[3])),
    "warmup+multistep": (lambda o: S.linear_warmup(o, S.MultiStepLR(o, [2, 5]), 2),
                         lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, 1.0, 2), T.MultiStepLR(o, [2, 5])],
                                                  milestones=[2])),
    "sequential x3": (lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.5, 1.0, 2), S.MultiStepLR(o, [1]),
                                                   S.CosineAnnealingLR(o, 4)], milestones=[2, 6]),
                      lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.5, 1.0, 2), T.MultiStepLR(o, [1]),
                                                   T.CosineAnnealingLR(o, 4)], milestones=[2, 6])),
    "step": (lambda o: S.StepLR(o, step_size=3, gamma=0.5), lambda o: T.StepLR(o, step_size=3, gamma=0.5)),
    "exponential": (lambda o: S.ExponentialLR(o, gamma=0.8), lambda o: T.ExponentialLR(o, gamma=0.8)),
    "onecycle": (lambda o: S.OneCycleLR(o, max_lr=[0.5, 0.2], total_steps=EPOCHS),
                 lambda o: T.OneCycleLR(o, max_lr=[0.5, 0.2], total_steps=EPOCHS)),
    "onecycle linear three-phase": (
        lambda o: S.OneCycleLR(o, 0.3, epochs=2, steps_per_epoch=7, anneal_strategy="linear", three_phase=True),
        lambda o: T.OneCycleLR(o, 0.3, epochs=2, steps_per_epoch=7, anneal_strategy="linear", three_phase=True)),
}


def lr_trace(optimizer, scheduler, epochs=EPOCHS, torch_side=False):
    trace = []
    for _ in range(epochs):
        trace.append([group["lr"] for group in optimizer.param_groups])
        if torch_side:
            optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
    return np.array(trace)


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_matches_torch(case):
    ours, theirs = CASES[case]
    optimizer, reference = numres_optimizer(), torch_optimizer()
    scheduler = ours(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_scheduler = theirs(reference)
    expected = lr_trace(reference, torch_scheduler, torch_side=True)
    got = lr_trace(optimizer, scheduler)
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-15), f"\n{got}\n{expected}"
    assert np.allclose(scheduler.get_last_lr(), torch_scheduler.get_last_lr(), rtol=1e-12)


def test_paper_schedule_values():
    """He et al.: lr 0.1, divided by 10 at the milestones (32k and 48k iterations there)."""
    optimizer = numres_optimizer()
    trace = lr_trace(optimizer, S.MultiStepLR(optimizer, [4, 6]), epochs=8)[:, 0]
    assert np.allclose(trace, [0.1] * 4 + [0.01] * 2 + [0.001] * 2, rtol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip_continues_exactly(case, tmp_path):
    build = CASES[case][0]
    optimizer = numres_optimizer()
    straight = lr_trace(optimizer, build(optimizer))

    first_optimizer = numres_optimizer()
    first = build(first_optimizer)
    head = lr_trace(first_optimizer, first, epochs=5)
    nr.save({"optimizer": first_optimizer.state_dict(), "scheduler": first.state_dict()}, tmp_path / "s.npz")
    saved = nr.load(tmp_path / "s.npz")
    second_optimizer = numres_optimizer(lr=0.7)          # a fresh run with other settings, then restored
    second = build(second_optimizer)
    second_optimizer.load_state_dict(saved["optimizer"])
    second.load_state_dict(saved["scheduler"])
    tail = lr_trace(second_optimizer, second, epochs=EPOCHS - 5)
    assert np.array_equal(np.concatenate([head, tail]), straight)


def test_bad_arguments_are_named():
    optimizer = numres_optimizer()
    with pytest.raises(ValueError, match="T_max must be a positive"):
        S.CosineAnnealingLR(optimizer, T_max=0)
    with pytest.raises(ValueError, match="start_factor"):
        S.LinearLR(optimizer, start_factor=0)
    with pytest.raises(ValueError, match="one more scheduler than milestones"):
        S.SequentialLR(optimizer, [S.MultiStepLR(optimizer, [1])], milestones=[2])
    with pytest.raises(ValueError, match="warmup_epochs must be positive"):
        S.linear_warmup(optimizer, S.MultiStepLR(optimizer, [1]), 0)
    with pytest.raises(TypeError, match="not an optimizer"):
        S.MultiStepLR(object(), [1])
    with pytest.raises(KeyError, match="initial_lr"):
        S.MultiStepLR(numres_optimizer(), [1], last_epoch=3)
    with pytest.raises(KeyError, match="unexpected keys"):
        S.MultiStepLR(optimizer, [1]).load_state_dict({"T_max": 3})


def test_training_config_schedules():
    """The schedules `numres train` builds: paper milestones at 50%/75%, warm-up counted in the epochs."""
    config = TrainConfig(epochs=8, schedule="multistep", lr=0.1)
    assert config.milestones == [4, 6]
    optimizer = numres_optimizer()
    trace = lr_trace(optimizer, build_schedule(optimizer, config), epochs=8)[:, 0]
    assert np.allclose(trace, [0.1] * 4 + [0.01] * 2 + [0.001] * 2)

    config = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2, warmup_start_factor=0.1)
    optimizer = numres_optimizer()
    trace = lr_trace(optimizer, build_schedule(optimizer, config), epochs=10)[:, 0]
    cosine = [0.1 * (1 + np.cos(np.pi * t / 8)) / 2 for t in range(8)]
    assert np.allclose(trace, [0.01, 0.055] + cosine, rtol=1e-12)

    config = TrainConfig(epochs=10, schedule="multistep", milestones=[5, 8], warmup_epochs=2)
    optimizer = numres_optimizer()
    trace = lr_trace(optimizer, build_schedule(optimizer, config), epochs=10)[:, 0]
    assert np.allclose(trace, [0.01, 0.055, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="schedule.*'nonsense'"):
        TrainConfig(schedule="nonsense")
    with pytest.raises(ValueError, match="warmup_epochs must be in 0..epochs-1"):
        TrainConfig(epochs=3, warmup_epochs=3)


# --- StepLR / ExponentialLR over many steps, OneCycleLR's momentum, ReduceLROnPlateau --------------------

@pytest.mark.parametrize("name, kwargs", [("StepLR", dict(step_size=7, gamma=0.9)),
                                          ("ExponentialLR", dict(gamma=0.97)),
                                          ("StepLR", dict(step_size=1, gamma=0.5))])
def test_chainable_schedules_match_torch_over_many_steps(name, kwargs):
    """PyTorch multiplies the previous lr; numres uses the closed form: equal to rounding over 400 steps."""
    optimizer, reference = numres_optimizer(), torch_optimizer()
    scheduler, torch_scheduler = getattr(S, name)(optimizer, **kwargs), getattr(T, name)(reference, **kwargs)
    got, expected = lr_trace(optimizer, scheduler, 400), lr_trace(reference, torch_scheduler, 400, torch_side=True)
    assert np.max(np.abs(got - expected) / expected) < 1e-12


def adam_pair(lr=0.1):
    params = [Parameter(np.zeros(2)), Parameter(np.zeros(3))]
    tensors = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    return (nr.optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": lr / 4}], lr=lr, betas=(0.8, 0.99)),
            torch.optim.Adam([{"params": tensors[:1]}, {"params": tensors[1:], "lr": lr / 4}], lr=lr,
                             betas=(0.8, 0.99)))


def momentum_of(group):
    return group["betas"][0] if "betas" in group else group["momentum"]


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
@pytest.mark.parametrize("options", [dict(), dict(anneal_strategy="linear"), dict(three_phase=True),
                                     dict(three_phase=True, anneal_strategy="linear", pct_start=0.4),
                                     dict(cycle_momentum=False), dict(pct_start=0.0), dict(pct_start=1.0),
                                     dict(base_momentum=[0.7, 0.8], max_momentum=(0.9, 0.99), div_factor=10.0,
                                          final_div_factor=100.0)])
def test_one_cycle_lr_and_momentum_match_torch(optimizer_kind, options):
    total = 103
    optimizer, reference = adam_pair() if optimizer_kind == "adam" else (numres_optimizer(), torch_optimizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = T.OneCycleLR(reference, max_lr=[1.0, 0.25], total_steps=total, **options)
    ours = S.OneCycleLR(optimizer, max_lr=[1.0, 0.25], total_steps=total, **options)
    got, expected = [], []
    for step in range(total):
        got.append([[g["lr"], momentum_of(g)] for g in optimizer.param_groups])
        expected.append([[g["lr"], momentum_of(g)] for g in reference.param_groups])
        if step < total - 1:
            reference.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs.step()
            ours.step()
    got, expected = np.array(got), np.array(expected)
    assert np.max(np.abs(got - expected)) < 1e-14 * np.max(np.abs(expected)), np.abs(got - expected).max()
    keys = ("initial_lr", "max_lr", "min_lr")
    if options.get("cycle_momentum", True):
        keys += ("max_momentum", "base_momentum")
    for key in keys:
        assert [g[key] for g in optimizer.param_groups] == pytest.approx([g[key] for g in reference.param_groups],
                                                                         rel=1e-15)
    ours.step()                                          # step total_steps is allowed; one more is not
    with pytest.raises(ValueError, match="Tried to step 104 times"):
        ours.step()


def test_one_cycle_arguments_are_checked_as_torch_does():
    optimizer = numres_optimizer()
    for kwargs, message in ((dict(), "either total_steps OR"), (dict(total_steps=0), "total_steps"),
                            (dict(epochs=2, steps_per_epoch=0), "steps_per_epoch"),
                            (dict(total_steps=5, pct_start=1.5), "pct_start"),
                            (dict(total_steps=5, anneal_strategy="cosine"), "anneal_strategy"),
                            (dict(total_steps=5, max_lr=[1.0]), "max_lr")):
        kwargs = {"max_lr": 1.0, **kwargs}
        with pytest.raises(ValueError, match=message):
            S.OneCycleLR(optimizer, **kwargs)
        with pytest.raises(ValueError):
            T.OneCycleLR(torch_optimizer(), **kwargs)


def plateau_metrics(count=120, seed=0):
    """A loss that falls, stalls, wobbles within the threshold and falls again."""
    rng = np.random.default_rng(seed)
    steps = np.concatenate([np.linspace(1.0, 0.5, 20), np.full(25, 0.5), 0.5 + 1e-5 * rng.standard_normal(25),
                            np.linspace(0.5, 0.2, 10), 0.2 + 0.05 * rng.random(40)])
    return steps[:count]


@pytest.mark.parametrize("kwargs", [dict(), dict(patience=3), dict(patience=2, cooldown=4, factor=0.5),
                                    dict(mode="max", patience=2), dict(threshold=0.01, threshold_mode="abs"),
                                    dict(patience=1, min_lr=[0.01, 0.004]), dict(patience=0, factor=0.3, min_lr=1e-3),
                                    dict(patience=0, factor=0.99, eps=1e-2),
                                    dict(mode="max", threshold_mode="abs", threshold=1e-3, patience=4, cooldown=1)])
def test_reduce_lr_on_plateau_matches_torch(kwargs):
    optimizer, reference = numres_optimizer(), torch_optimizer()
    ours, theirs = S.ReduceLROnPlateau(optimizer, **kwargs), T.ReduceLROnPlateau(reference, **kwargs)
    got, expected = [], []
    for metric in plateau_metrics():
        ours.step(metric)
        theirs.step(metric)
        got.append([g["lr"] for g in optimizer.param_groups] + [ours.num_bad_epochs, ours.cooldown_counter])
        expected.append([g["lr"] for g in reference.param_groups] + [theirs.num_bad_epochs, theirs.cooldown_counter])
    got, expected = np.array(got), np.array(expected)
    assert np.array_equal(got, expected), np.argwhere(got != expected)[:3]
    assert ours.best == theirs.best and ours.last_epoch == theirs.last_epoch
    assert ours.get_last_lr() == theirs.get_last_lr()


def test_reduce_lr_on_plateau_state_dict_and_errors(tmp_path):
    metrics = plateau_metrics()
    optimizer = numres_optimizer()
    straight = S.ReduceLROnPlateau(optimizer, patience=2, cooldown=1)
    trace = []
    for metric in metrics:
        straight.step(np.asarray(metric))                 # a 0-d array works as the metric
        trace.append(optimizer.param_groups[0]["lr"])
    assert len(set(trace)) > 2
    first_optimizer = numres_optimizer()
    first = S.ReduceLROnPlateau(first_optimizer, patience=2, cooldown=1)
    for metric in metrics[:30]:
        first.step(metric)
    nr.save({"optimizer": first_optimizer.state_dict(), "scheduler": first.state_dict()}, tmp_path / "p.npz")
    saved = nr.load(tmp_path / "p.npz")
    second_optimizer = numres_optimizer()
    second = S.ReduceLROnPlateau(second_optimizer, patience=2, cooldown=1)
    second_optimizer.load_state_dict(saved["optimizer"])
    second.load_state_dict(saved["scheduler"])
    rest = []
    for metric in metrics[30:]:
        second.step(metric)
        rest.append(second_optimizer.param_groups[0]["lr"])
    assert trace[30:] == rest
    for kwargs, message in ((dict(factor=1.0), "Factor should be < 1.0"), (dict(mode="up"), "mode up is unknown"),
                            (dict(threshold_mode="pct"), "threshold mode pct is unknown"),
                            (dict(min_lr=[0.1]), "expected 2 min_lrs")):
        with pytest.raises(ValueError, match=message):
            S.ReduceLROnPlateau(numres_optimizer(), **kwargs)
        with pytest.raises(ValueError):
            T.ReduceLROnPlateau(torch_optimizer(), **kwargs)
    with pytest.raises(TypeError, match="needs the metric"):
        S.ReduceLROnPlateau(numres_optimizer()).step()


def test_new_schedules_bad_arguments():
    with pytest.raises(ValueError, match="step_size"):
        S.StepLR(numres_optimizer(), step_size=0)

    class NoMomentum(nr.optim.Optimizer):
        def step(self):
            pass

    with pytest.raises(ValueError, match="momentum or beta1"):
        S.OneCycleLR(NoMomentum([Parameter(np.zeros(1))], dict(lr=0.1)), 1.0, total_steps=10)
