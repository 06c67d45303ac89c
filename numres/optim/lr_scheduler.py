"""Learning-rate schedules with ``torch.optim.lr_scheduler``'s names, arguments and values.

A scheduler counts epochs in ``last_epoch`` (0 after construction) and, on every
:meth:`LRScheduler.step`, advances it and writes each parameter group's ``lr``.
The value is computed in closed form from the group's ``initial_lr`` (``eta_0``,
saved in the group by the first scheduler, as PyTorch does) and the epoch ``t``:

* :class:`MultiStepLR`      ``eta_t = eta_0 * gamma ** (number of milestones <= t)``
* :class:`CosineAnnealingLR` ``eta_t = eta_min + (eta_0 - eta_min) * (1 + cos(pi * t / T_max)) / 2``
* :class:`LinearLR`         ``eta_t = eta_0 * (s + (e - s) * min(t, T) / T)`` (start factor s, end factor e)
* :class:`SequentialLR`     runs ``schedulers[i]`` from ``milestones[i-1]`` on, its own epoch restarting at 0
* :func:`linear_warmup`     ``SequentialLR([LinearLR(...), after], [warmup_epochs])``: a linear ramp, then ``after``

``state_dict()``/``load_state_dict()`` save and restore the position, so a resumed
run continues the schedule where it stopped.
"""
from __future__ import annotations

import bisect
import math

__all__ = ["LRScheduler", "MultiStepLR", "CosineAnnealingLR", "LinearLR", "SequentialLR", "linear_warmup"]


class LRScheduler:
    """Base class: subclasses give the closed form ``lr_at(base_lr, epoch)``."""

    def __init__(self, optimizer, last_epoch: int = -1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer (it has no param_groups)")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            missing = [i for i, group in enumerate(optimizer.param_groups) if "initial_lr" not in group]
            if missing:
                raise KeyError(f"param 'initial_lr' is not specified in param_groups[{missing[0]}] "
                               f"when resuming a scheduler at last_epoch={last_epoch}")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr: float, epoch: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list:
        """The learning rates for the current ``last_epoch``."""
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def step(self) -> None:
        """Advance one epoch and set every group's ``lr``."""
        self.last_epoch += 1
        self._apply(self.get_lr())

    def _apply(self, lrs) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self) -> list:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """Everything but the optimizer (which has its own state dict)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        unknown = set(state_dict) - set(self.__dict__)
        if unknown:
            raise KeyError(f"{type(self).__name__}.load_state_dict: unexpected keys {sorted(unknown)}")
        self.__dict__.update(state_dict)


class MultiStepLR(LRScheduler):
    """Multiply the lr by ``gamma`` at each milestone epoch (the paper divides by 10 twice)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class CosineAnnealingLR(LRScheduler):
    """Half a cosine from the initial lr down to ``eta_min`` over ``T_max`` epochs (SGDR without restarts)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        if T_max < 1:
            raise ValueError(f"T_max must be a positive number of epochs, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearLR(LRScheduler):
    """Scale the lr by a factor moving linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` epochs."""

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5,
                 last_epoch: int = -1):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"LinearLR needs 0 < start_factor <= 1 and 0 <= end_factor <= 1, "
                             f"got {start_factor} and {end_factor}")
        if total_iters < 1:
            raise ValueError(f"total_iters must be positive, got {total_iters}")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        progress = min(epoch, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * progress)


class SequentialLR(LRScheduler):
    """``schedulers[0]`` until ``milestones[0]``, then ``schedulers[1]`` (counting from 0 again), and so on."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch: int = -1):
        if len(schedulers) != len(milestones) + 1:
            raise ValueError(f"SequentialLR expects one more scheduler than milestones, got {len(schedulers)} "
                             f"schedulers and {len(milestones)} milestones")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("SequentialLR: every scheduler must drive the same optimizer")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"SequentialLR milestones must increase, got {list(milestones)}")
        self._schedulers = list(schedulers)
        self._milestones = [int(m) for m in milestones]
        for group in optimizer.param_groups:        # undo what constructing the children did to the lr
            group["lr"] = group["initial_lr"]
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        index = bisect.bisect_right(self._milestones, self.last_epoch)
        start = self._milestones[index - 1] if index else 0
        child = self._schedulers[index]
        child.last_epoch = self.last_epoch - start
        lrs = child.get_lr()
        child._last_lr = lrs
        return lrs

    def state_dict(self):
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [scheduler.state_dict() for scheduler in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        children = state.pop("_schedulers")
        if len(children) != len(self._schedulers):
            raise ValueError(f"SequentialLR state has {len(children)} schedulers, this one has "
                             f"{len(self._schedulers)}")
        super().load_state_dict(state)
        for scheduler, child_state in zip(self._schedulers, children):
            scheduler.load_state_dict(child_state)


def linear_warmup(optimizer, after: LRScheduler, warmup_epochs: int, start_factor: float = 0.1) -> SequentialLR:
    """Ramp the lr linearly from ``start_factor * lr`` up to ``lr`` over ``warmup_epochs``, then follow ``after``.

    ``after`` counts its epochs from the end of the warm-up (as in PyTorch's SequentialLR).
    """
    if warmup_epochs < 1:
        raise ValueError(f"warmup_epochs must be positive, got {warmup_epochs}")
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_epochs])
