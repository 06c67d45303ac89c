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
* :class:`StepLR`           ``eta_t = eta_0 * gamma ** (t // step_size)``
* :class:`ExponentialLR`    ``eta_t = eta_0 * gamma ** t``
* :class:`OneCycleLR`       Smith's one-cycle policy, stepped once per *batch*: the lr rises from
  ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of ``total_steps``, then falls to
  ``max_lr / div_factor / final_div_factor`` (``three_phase``: back down to the start first, then to the
  minimum), each piece a half cosine or a straight line; the momentum (SGD's ``momentum``, Adam's
  ``beta1``) moves the opposite way between ``max_momentum`` and ``base_momentum``
* :class:`ReduceLROnPlateau` driven by a metric, not a clock: ``step(metric)`` multiplies the lr by
  ``factor`` once the metric has failed to improve for more than ``patience`` epochs

PyTorch computes StepLR and ExponentialLR by multiplying the previous lr (its "chainable" form);
numres uses their closed forms, which agree to rounding (a few units in the last place after
hundreds of steps) as long as nothing else changes the lr.

``state_dict()``/``load_state_dict()`` save and restore the position, so a resumed
run continues the schedule where it stopped.
"""
from __future__ import annotations

import bisect
import math

__all__ = ["LRScheduler", "MultiStepLR", "CosineAnnealingLR", "LinearLR", "SequentialLR", "linear_warmup",
           "StepLR", "ExponentialLR", "OneCycleLR", "ReduceLROnPlateau"]


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


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` epochs: ``eta_t = eta_0 * gamma ** (t // step_size)``."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be a positive integer number of epochs, got {step_size!r}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    """Multiply the lr by ``gamma`` every epoch: ``eta_t = eta_0 * gamma ** t``."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** epoch


def _per_group(value, optimizer, name):
    """One value per parameter group: a list/tuple of as many, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"expected {len(optimizer.param_groups)} values for {name}, got {len(value)}")
        return list(value)
    return [value] * len(optimizer.param_groups)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin, 2017) with ``torch.optim.lr_scheduler.OneCycleLR``'s arguments.

    Step it after every batch; it runs for ``total_steps`` steps (or ``epochs * steps_per_epoch``).
    With ``initial = max_lr / div_factor`` and ``min = initial / final_div_factor``, the phases end at
    step ``pct_start * total_steps - 1`` and ``total_steps - 1``::

        two phases:    initial -> max_lr,  max_lr -> min
        three_phase:   initial -> max_lr (ends at pct_start * total - 1),
                       max_lr -> initial (ends at 2 * pct_start * total - 2),  initial -> min

    Within a phase from step ``s0`` to ``s1``, at step ``t`` with ``p = (t - s0) / (s1 - s0)``, the lr is
    ``end + (start - end) * (1 + cos(pi p)) / 2`` (``anneal_strategy="cos"``) or
    ``start + (end - start) p`` (``"linear"``).  With ``cycle_momentum`` the momentum goes
    ``max_momentum -> base_momentum`` while the lr rises and back while it falls (three_phase: stays at
    ``max_momentum`` in the last phase); it is SGD's ``momentum`` or the first of Adam's ``betas``.
    ``max_lr``, ``base_momentum`` and ``max_momentum`` may be lists, one value per parameter group.
    Stepping past ``total_steps`` is an error, as in PyTorch.
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, last_epoch=-1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer (it has no param_groups)")
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"Expected positive integer {name}, but got {value}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        if not isinstance(pct_start, (int, float)) or not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        self.anneal_strategy, self.three_phase, self.cycle_momentum = anneal_strategy, bool(three_phase), \
            bool(cycle_momentum)
        up = float(pct_start * self.total_steps) - 1
        if self.three_phase:
            self._phases = [(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (float(2 * pct_start * self.total_steps) - 2, "max_lr", "initial_lr", "base_momentum",
                             "max_momentum"),
                            (self.total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self._phases = [(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (self.total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group, lr in zip(groups, _per_group(max_lr, optimizer, "max_lr")):
                group["initial_lr"] = lr / div_factor
                group["max_lr"] = lr
                group["min_lr"] = group["initial_lr"] / final_div_factor
        if self.cycle_momentum:
            defaults = getattr(optimizer, "defaults", {})
            if "momentum" not in defaults and "betas" not in defaults:
                raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
            self.use_beta1 = "betas" in defaults
            if last_epoch == -1:
                for group, low, high in zip(groups, _per_group(base_momentum, optimizer, "base_momentum"),
                                            _per_group(max_momentum, optimizer, "max_momentum")):
                    self._set_momentum(group, high)
                    group["max_momentum"], group["base_momentum"] = high, low
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group, value):
        if self.use_beta1:
            group["betas"] = (value, *tuple(group["betas"])[1:])
        else:
            group["momentum"] = value

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps is "
                             f"{self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0
            for index, (end, lr_from, lr_to, m_from, m_to) in enumerate(self._phases):
                if step <= end or index == len(self._phases) - 1:
                    # a phase of no length (pct_start=1 at its very last step) is complete; PyTorch divides by 0
                    pct = (step - start) / (end - start) if end != start else 1.0
                    lrs.append(self._anneal(group[lr_from], group[lr_to], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[m_from], group[m_to], pct))
                    break
                start = end
        return lrs


class ReduceLROnPlateau(LRScheduler):
    """Cut the lr when a metric stops improving, with ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rules.

    Call ``step(metric)`` once per epoch (the validation loss, say; ``mode="max"`` for an accuracy).  A
    metric ``a`` improves on the best so far when, for ``threshold_mode="rel"``,
    ``a < best * (1 - threshold)`` (``"min"``) or ``a > best * (1 + threshold)`` (``"max"``), and for
    ``"abs"``, ``a < best - threshold`` or ``a > best + threshold``.  After more than ``patience``
    epochs in a row without improvement each group's lr becomes ``max(lr * factor, min_lr)`` (a change
    smaller than ``eps`` is skipped), and the count waits ``cooldown`` epochs before it starts again.

    Reading the metric is a host read (``float(metric)``) - the decision needs the number.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0, eps=1e-8):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer (it has no param_groups)")
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode} is unknown!")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode} is unknown!")
        self.optimizer = optimizer
        self.factor = factor
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(optimizer.param_groups):
                raise ValueError(f"expected {len(optimizer.param_groups)} min_lrs, got {len(min_lr)}")
            self.min_lrs = list(min_lr)
        else:
            self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.patience, self.cooldown, self.eps = patience, cooldown, eps
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        self._reset()

    def _reset(self):
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def is_better(self, a, best) -> bool:
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, metrics=None, epoch=None):
        """Record this epoch's ``metrics`` (a number or a 0-d array) and reduce the lr if it has plateaued."""
        if metrics is None:
            raise TypeError("ReduceLROnPlateau.step() needs the metric it watches, e.g. step(val_loss)")
        current = float(metrics)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _reduce_lr(self):
        for group, min_lr in zip(self.optimizer.param_groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new
