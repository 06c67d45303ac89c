"""ReLU as a module."""
from __future__ import annotations

from .module import Module


class ReLU(Module):
    """``y = max(x, 0)``.  ``inplace`` is accepted for PyTorch compatibility and shown in the repr;
    numres always returns a new array, because backward reads its mask from the output."""

    def __init__(self, inplace=False, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.inplace = inplace

    def forward(self, x):
        self.check_input(x, ndim=None)
        y, cache = self.ops.relu_forward(x)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.relu_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""
