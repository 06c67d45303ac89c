"""Optimizer base: parameter groups, per-parameter state, zero_grad and state dicts like PyTorch's.

Every optimizer checks its hyper-parameters when it is built (the defaults and each group's own
values): a NaN, an infinity or a value outside its range is a ``ValueError`` that names the
option and the value.  PyTorch refuses negative values too, but accepts NaN; numres does not,
because a NaN learning rate only shows up later as a diverged run.

:meth:`Optimizer.parameters_to_update` is the one place that decides which parameters a step
touches: those with ``requires_grad`` and a gradient (a frozen parameter, or one that took no
part in the last backward, is left alone, weight decay included, as in PyTorch).
"""
from __future__ import annotations

import functools
import math
import numbers

from .. import backend as B
from ..nn.module import parameters_changed


def check_number(name: str, value, *, low: float = 0.0, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, what: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the range [low, high]
    (``low_open``/``high_open`` exclude the end points).  ``what`` names it in the message."""
    label = what or name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {label}: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {label}: {value!r} ({name} must be a finite number)")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lower = f"{'(' if low_open else '['}{low:g}"
        upper = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {label}: {value!r} ({name} must lie in {lower}, {upper})")


def _noting_parameter_change(step):
    """Wrap a subclass's ``step`` so that it bumps :func:`numres.nn.module.parameters_changed`
    (kept values derived from the parameters, such as folded BatchNorm weights, are then remade)."""
    @functools.wraps(step)
    def noting_step(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        finally:
            parameters_changed()

    noting_step.notes_parameter_change = True
    return noting_step


class Optimizer:
    """Holds ``param_groups`` (lists of Parameters with their hyper-parameters) and per-parameter ``state``.

    ``params`` may be an iterable of :class:`numres.nn.Parameter` or of dicts
    ``{"params": [...], "lr": ...}`` whose keys override ``defaults``.

    Subclasses check one group's hyper-parameters in :meth:`check_hyperparameters` and name
    the state entries that are host numbers rather than arrays in ``host_state_keys``.
    """

    host_state_keys: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "notes_parameter_change", False):
            cls.step = _noting_parameter_change(step)

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.check_hyperparameters(self.defaults)
        if isinstance(params, dict) or hasattr(params, "shape") or hasattr(params, "data"):
            raise TypeError(f"params must be an iterable of Parameters or of dicts, got a {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        self._state = {}
        for group in groups:
            self.add_param_group(group)

    def check_hyperparameters(self, options: dict) -> None:
        """Raise ``ValueError`` for a bad value in ``options`` (the defaults or one group)."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a group ``{"params": [...], option: value, ...}``; options it leaves out take the defaults."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"a parameter group is a dict with a 'params' entry, got {param_group!r}")
        unknown = set(param_group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ValueError(f"unknown optimizer options {sorted(unknown)}")
        params = param_group["params"]
        params = [params] if hasattr(params, "data") else list(params)
        if any(not hasattr(p, "data") for p in params):
            raise TypeError("optimizer params must be numres Parameters (model.parameters()), got "
                            + ", ".join(sorted({type(p).__name__ for p in params if not hasattr(p, 'data')})))
        group = {**self.defaults, **param_group, "params": params}
        self.check_hyperparameters(group)
        present = {id(p) for p in self._ordered_params()}
        if any(id(p) in present for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear more than once (in one group or in two groups)")
        self.param_groups.append(group)

    def state_for(self, param) -> dict:
        return self._state.setdefault(id(param), {})

    def _ordered_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def parameters_to_update(group):
        """The group's parameters a step changes: trainable (``requires_grad``) and with a gradient."""
        return [p for p in group["params"] if getattr(p, "requires_grad", True) and p.grad is not None]

    def zero_grad(self, set_to_none: bool = True):
        for param in self._ordered_params():
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad[...] = 0

    def step(self):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"state": {index: {name: array}}, "param_groups": [{..., "params": [indices]}]}``, as PyTorch lays it out."""
        index = {id(p): i for i, p in enumerate(self._ordered_params())}
        state = {index[key]: dict(value) for key, value in self._state.items() if key in index}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict):
        """Restore groups' options and per-parameter state (arrays are copied to each parameter's backend, dtype
        and memory layout; the entries in ``host_state_keys``, such as Adam's step count, become Python floats)."""
        params = self._ordered_params()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            raise ValueError("optimizer state dict does not match this optimizer's parameter groups")
        for saved, mine in zip(groups, self.param_groups):
            mine.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
        self._state = {}
        for key, value in state_dict["state"].items():
            param = params[int(key)]
            self._state[id(param)] = {name: self._loaded_state_value(name, array, param)
                                      for name, array in value.items()}

    def _loaded_state_value(self, name, value, param):
        """One saved state entry, ready for ``param``: arrays are copied (the optimizer must not share
        memory with the state dict it was given) onto the parameter's backend, dtype and memory layout."""
        if name in self.host_state_keys:
            return float(B.to_numpy(value)) if hasattr(value, "shape") else float(value)
        if not hasattr(value, "shape"):
            return value
        if tuple(value.shape) != tuple(param.data.shape):
            raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)}, but its parameter has "
                             f"shape {tuple(param.data.shape)}: the state dict belongs to another model")
        backend = B.backend_of(param.data)
        loaded = B.get_xp(backend).empty_like(param.data)       # the parameter's memory layout (tiled updates)
        loaded[...] = B.asarray(value, backend, param.data.dtype)
        return loaded

