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
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup_epochs must be in 0..epochs-1"):
        TrainConfig(epochs=3, warmup_epochs=3)
