"""Finite-difference check of any module's hand-written backward.

For a module ``f`` and a fixed random upstream gradient ``r``, the scalar
``L(x, theta) = sum(f(x; theta) * r)`` has the gradients that ``f.backward(r)``
claims to compute.  Each checked entry ``v`` of the input or a parameter is
perturbed both ways::

    dL/dv  ~=  (L(v + h) - L(v - h)) / (2h)          (central difference, error O(h^2))

and compared with the analytic value.  The error reported per tensor is
``max |analytic - numeric| / max(|numeric|, |analytic|)`` over the checked entries; a
tensor whose gradient is (nearly) zero is measured against a thousandth of the largest
gradient in the module instead.  The check
runs in float64 on a deep copy of the module, so the caller's module (its
parameters, buffers and gradients) is never changed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import backend as B
from .nn.module import parameters_changed

SMALL_GRADIENT = 1e-3


@dataclass
class GradcheckResult:
    """Worst relative error per tensor (``"input"`` and each parameter name) and how many entries were checked."""

    errors: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    def passed(self, tolerance: float = 1e-6) -> bool:
        return self.worst <= tolerance

    def __str__(self):
        width = max(len(name) for name in self.errors) if self.errors else 5
        lines = [f"{'tensor':<{width}}  entries  worst rel. error"]
        for name, error in self.errors.items():
            lines.append(f"{name:<{width}}  {self.checked[name]:>7}  {error:.2e}")
        return "\n".join(lines)


def _indices(size, max_entries, rng):
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_entries, replace=False))


def gradcheck(module, x, *, eps=1e-6, max_entries=None, params=True, seed=0, forward_kwargs=None):
    """Compare ``module.backward`` with central differences; returns a :class:`GradcheckResult`.

    ``max_entries`` limits how many (randomly chosen) entries of each tensor are checked,
    which keeps whole-model checks affordable.  BatchNorm in training mode is fine: its
    running statistics change on the copy only.
    """
    forward_kwargs = forward_kwargs or {}
    module = copy.deepcopy(module).to(dtype="float64")
    rng = np.random.default_rng(seed)
    x = B.asarray(B.to_numpy(x), module.backend, "float64")
    y = module(x, **forward_kwargs)
    upstream = B.asarray(rng.standard_normal(y.shape), module.backend, "float64")

    def objective():
        parameters_changed()        # a parameter was written in place: derived values (folded BatchNorm) are stale
        return float(B.to_numpy((module(x, **forward_kwargs) * upstream).sum()))

    module.zero_grad()
    module(x, **forward_kwargs)
    analytic = {"input": module.backward(upstream)}
    targets = {"input": x}
    if params:
        for name, param in module.named_parameters():
            analytic[name] = param.grad
            targets[name] = param.data

    result = GradcheckResult()
    compared = {}
    for name, array in targets.items():
        grad = analytic[name]
        if grad is None:
            raise RuntimeError(f"gradcheck: backward produced no gradient for {name}")
        grad = B.to_numpy(grad)
        flat_positions = _indices(array.size, max_entries, rng)
        numeric, claimed = [], []
        for flat in flat_positions:
            index = np.unravel_index(flat, array.shape)
            original = float(B.to_numpy(array[index]))
            array[index] = original + eps
            plus = objective()
            array[index] = original - eps
            minus = objective()
            array[index] = original
            numeric.append((plus - minus) / (2 * eps))
            claimed.append(grad[index])
        compared[name] = (np.array(numeric), np.array(claimed))
        result.checked[name] = len(flat_positions)

    # A gradient that is truly zero (a conv bias before a training-mode BatchNorm) has no scale of
    # its own; such a tensor is measured against a thousandth of the module's largest gradient.
    floor = SMALL_GRADIENT * max(np.abs(n).max(initial=0.0) for n, _ in compared.values())
    for name, (numeric, claimed) in compared.items():
        scale = max(np.abs(numeric).max(initial=0.0), np.abs(claimed).max(initial=0.0), floor,
                    np.finfo(np.float64).tiny)
        result.errors[name] = float(np.abs(claimed - numeric).max(initial=0.0) / scale)
    return result
