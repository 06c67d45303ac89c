"""Optimizer base: parameter groups, per-parameter state, zero_grad and state dicts like PyTorch's."""
from __future__ import annotations

from .. import backend as B


class Optimizer:
    """Holds ``param_groups`` (lists of Parameters with their hyper-parameters) and per-parameter ``state``.

    ``params`` may be an iterable of :class:`numres.nn.Parameter` or of dicts
    ``{"params": [...], "lr": ...}`` whose keys override ``defaults``.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            unknown = set(group) - set(defaults) - {"params", "initial_lr"}
            if unknown:
                raise ValueError(f"unknown optimizer options {sorted(unknown)}")
            self.param_groups.append({**self.defaults, **group, "params": list(group["params"])})
        self._state = {}

    def state_for(self, param) -> dict:
        return self._state.setdefault(id(param), {})

    def _ordered_params(self):
        return [p for group in self.param_groups for p in group["params"]]

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
        params = self._ordered_params()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            raise ValueError("optimizer state dict does not match this optimizer's parameter groups")
        for saved, mine in zip(groups, self.param_groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        self._state = {}
        for key, value in state_dict["state"].items():
            param = params[int(key)]
            self._state[id(param)] = {
                name: B.convert(array, B.backend_of(param.data), param.data.dtype) if hasattr(array, "shape")
                else array for name, array in value.items()}
