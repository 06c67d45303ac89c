"""Structural modules: Sequential, Identity, Flatten."""
from __future__ import annotations

from .module import Module


class Sequential(Module):
    """Children run in order; backward runs them in reverse."""

    def __init__(self, *modules, backend=None, dtype=None):
        first = modules[0] if modules else None
        super().__init__(backend=backend or (first.backend if first else "numpy"),
                         dtype=dtype or (first.dtype if first else "float32"))
        for index, module in enumerate(modules):
            setattr(self, str(index), module)

    def __getitem__(self, index):
        if isinstance(index, slice):
            part = Sequential(backend=self.backend, dtype=self.dtype)
            for name in list(self._modules)[index]:          # children keep their names, as in PyTorch
                setattr(part, name, self._modules[name])
            return part
        return list(self._modules.values())[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, grad_output):
        for module in reversed(self._modules.values()):
            grad_output = module.backward(grad_output)
        return grad_output


class Identity(Module):
    """Returns its input; backward returns its upstream gradient."""

    def __init__(self, *args, backend="numpy", dtype="float32", **kwargs):
        super().__init__(backend=backend, dtype=dtype)

    def forward(self, x):
        return x

    def backward(self, grad_output):
        return grad_output


class Flatten(Module):
    """Merges dimensions ``start_dim..end_dim`` (in logical NCHW order, as PyTorch does)."""

    def __init__(self, start_dim=1, end_dim=-1, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        self.check_input(x, ndim=None)
        start = self.start_dim % x.ndim
        end = self.end_dim % x.ndim
        self.save_for_backward(tuple(x.shape))
        return x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])

    def backward(self, grad_output):
        return grad_output.reshape(self.saved_cache())

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
