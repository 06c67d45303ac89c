"""Finite-difference check of any module's hand-written backward.

For a module ``f`` and a fixed random upstream gradient ``r``, the scalar
``L(x, theta) = sum(f(x; theta) * r)`` has the gradients that ``f.backward(r)``
claims to compute.  Each checked entry ``v`` of the input or a parameter is
perturbed both ways::

    dL/dv  ~=  (L(v + h) - L(v - h)) / (2h)          (central difference, error O(h^2))

and compared with the analytic value.  The error reported per tensor is
``max |analytic - numeric| / max(|numeric|, |analytic|)`` over the checked entries; a
tensor whose gradient is (nearly) zero is measured against a thousandth of the largest
gradient in the module instead.

Two rules keep the verdict honest:

* **Non-finite is failure.**  A NaN or infinity anywhere in an analytic gradient (every
  entry is looked at, not only the sampled ones) or in a numeric one makes that tensor's
  error ``inf`` and names the tensor and the first bad entry in :attr:`GradcheckResult.problems`.
  ``worst`` is the largest error with NaN and infinity kept, never dropped.
* **Float64 only.**  In float32 the rounding error of ``L`` (about 1e-7 of its size) divided
  by ``2h`` swamps the gradient, so finite differences cannot check a float32 backward at
  any useful tolerance.  A float32 module is refused with the one-line fix
  (``module.to(dtype="float64")``).  The check runs on a deep copy, so the caller's module
  (its parameters, buffers and gradients) is never changed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from . import backend as B
from .nn.module import parameters_changed

SMALL_GRADIENT = 1e-3
DEFAULT_TOLERANCE = 1e-6


@dataclass
class GradcheckResult:
    """Worst relative error per tensor (``"input"`` and each parameter name), how many entries were
    checked, and the tolerance the verdict uses.  ``problems`` names each tensor whose gradient
    held a NaN or an infinity."""

    errors: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE
    problems: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        """The largest per-tensor error; NaN or infinity if any tensor's error is one (never dropped)."""
        if not self.errors:
            return 0.0
        values = list(self.errors.values())
        if any(math.isnan(value) for value in values):
            return math.nan
        return max(values)

    def passed(self, tolerance: float | None = None) -> bool:
        """True when every tensor's error is finite and at most ``tolerance`` (default: the check's own)."""
        limit = self.tolerance if tolerance is None else tolerance
        return bool(self.errors) and all(math.isfinite(e) and e <= limit for e in self.errors.values())

    def failed_tensors(self, tolerance: float | None = None) -> list[str]:
        limit = self.tolerance if tolerance is None else tolerance
        return [name for name, e in self.errors.items() if not (math.isfinite(e) and e <= limit)]

    def __str__(self):
        width = max([len(name) for name in self.errors] + [6])
        lines = [f"{'tensor':<{width}}  entries  worst rel. error"]
        for name, error in self.errors.items():
            mark = "" if math.isfinite(error) and error <= self.tolerance else "   <- fails"
            lines.append(f"{name:<{width}}  {self.checked[name]:>7}  {error:.2e}{mark}")
        for name, problem in self.problems.items():
            lines.append(f"{name}: {problem}")
        verdict = "PASS" if self.passed() else "FAIL"
        lines.append(f"{verdict}: worst relative error {self.worst:.2e} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def _indices(size, max_entries, rng):
    if max_entries is None or size <= max_entries:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_entries, replace=False))


def _first_non_finite(values):
    """A description of the first NaN or infinite entry of ``values``, or None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return None
    index = np.unravel_index(bad[0], values.shape)
    index = tuple(int(i) for i in index)
    return f"{values[index]} at entry {index if len(index) > 1 else index[0]}"


def _require_float64(module):
    dtypes = {str(np.dtype(p.data.dtype)) for p in module.parameters()} | {str(np.dtype(module.dtype))}
    if dtypes != {"float64"}:
        raise ValueError(
            f"gradcheck needs a float64 module, got {'/'.join(sorted(dtypes))}: finite differences in float32 "
            f"cannot check a backward (rounding swamps the difference); check a float64 copy, "
            f"e.g. nr.gradcheck(copy.deepcopy(model).to(dtype='float64'), x)")


def gradcheck(module, x, *, eps=1e-6, max_entries=None, params=True, seed=0, forward_kwargs=None,
              tolerance=DEFAULT_TOLERANCE):
    """Compare ``module.backward`` with central differences; returns a :class:`GradcheckResult`.

    ``module`` must be float64 (a float32 module raises ValueError with the fix).  ``max_entries``
    limits how many (randomly chosen) entries of each tensor are compared, which keeps whole-model
    checks affordable; every entry of every analytic gradient is still checked for NaN and
    infinity.  ``tolerance`` is what ``result.passed()`` and the printed verdict use.  BatchNorm
    in training mode is fine: its running statistics change on the copy only.
    """
    _require_float64(module)
    forward_kwargs = forward_kwargs or {}
    module = copy.deepcopy(module)
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

    result = GradcheckResult(tolerance=tolerance)
    compared = {}
    for name, array in targets.items():
        grad = analytic[name]
        if grad is None:
            raise RuntimeError(f"gradcheck: backward produced no gradient for {name}")
        grad = B.to_numpy(grad)
        if grad.shape != tuple(array.shape):
            raise RuntimeError(f"gradcheck: the gradient of {name} has shape {grad.shape}, "
                               f"but {name} has shape {tuple(array.shape)}")
        bad = _first_non_finite(grad)
        if bad is not None:
            result.problems[name] = f"backward gave {bad}"
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
        numeric = np.array(numeric, dtype=np.float64).reshape(-1)
        bad = _first_non_finite(numeric)
        if bad is not None and name not in result.problems:
            at = np.unravel_index(flat_positions[np.flatnonzero(~np.isfinite(numeric))[0]], array.shape)
            result.problems[name] = f"the forward is not finite around entry {tuple(int(i) for i in at)}"
        compared[name] = (numeric, np.array(claimed, dtype=np.float64).reshape(-1))
        result.checked[name] = len(flat_positions)

    # A gradient that is truly zero (a conv bias before a training-mode BatchNorm) has no scale of
    # its own; such a tensor is measured against a thousandth of the module's largest gradient.
    finite_scales = [np.abs(n[np.isfinite(n)]).max(initial=0.0) for n, _ in compared.values()]
    floor = SMALL_GRADIENT * max(finite_scales, default=0.0)
    for name, (numeric, claimed) in compared.items():
        if name in result.problems:
            result.errors[name] = math.inf
            continue
        scale = max(np.abs(numeric).max(initial=0.0), np.abs(claimed).max(initial=0.0), floor,
                    np.finfo(np.float64).tiny)
        result.errors[name] = float(np.abs(claimed - numeric).max(initial=0.0) / scale)
    return result
