"""Structural modules: Sequential, ModuleList, ModuleDict, Identity, Flatten."""
from __future__ import annotations

import operator
from collections.abc import Mapping

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


def _backend_and_dtype(modules, backend, dtype):
    """A container's backend and dtype: as given, else its first child's, else numpy/float32."""
    first = modules[0] if modules else None
    return backend or (first.backend if first else "numpy"), dtype or (first.dtype if first else "float32")


def _check_module(module, where):
    if not isinstance(module, Module):
        raise TypeError(f"{where} holds numres Modules, got {type(module).__module__}.{type(module).__name__}")
    return module


class _Holder(Module):
    """A container that only holds modules for its owner's own forward/backward to call."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward of its own: it holds modules for a "
                                  f"Module of yours, whose forward and backward call them")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} has no backward of its own: it holds modules for a "
                                  f"Module of yours, whose forward and backward call them")

    def __getattr__(self, name):
        # Only reached when normal lookup fails: ``holder.a`` (or getattr(holder, "0")) finds a child.
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class ModuleList(_Holder):
    """A list of modules, as PyTorch's: their parameters are named ``"<index>.<name>"`` (``heads.0.weight``).

    Supports ``append``, ``extend``, ``insert``, ``pop``, indexing (negative too), slicing (a new
    ModuleList numbered from 0), assignment and deletion by index, ``len``, iteration, ``+`` and
    ``+=``.  It has no forward or backward: a Module of yours calls its members.
    """

    def __init__(self, modules=None, *, backend=None, dtype=None):
        modules = [] if modules is None else list(modules)
        backend, dtype = _backend_and_dtype(modules, backend, dtype)
        super().__init__(backend=backend, dtype=dtype)
        self.extend(modules)

    def _renumber(self, modules):
        """Store ``modules`` as the children "0", "1", ... (after an insertion or deletion)."""
        self._modules.clear()
        for index, module in enumerate(modules):
            self._modules[str(index)] = module

    def _absolute_index(self, index):
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a ModuleList of length {len(self)}")
        return index % len(self)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index], backend=self.backend, dtype=self.dtype)
        return self._modules[str(self._absolute_index(index))]

    def __setitem__(self, index, module):
        self._modules[str(self._absolute_index(index))] = _check_module(module, "ModuleList")

    def __delitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            del modules[index]
        else:
            del modules[self._absolute_index(index)]
        self._renumber(modules)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __iadd__(self, modules):
        return self.extend(modules)

    def __add__(self, other):
        return ModuleList(list(self) + list(other), backend=self.backend, dtype=self.dtype)

    def append(self, module):
        """Add ``module`` at the end; returns the list."""
        self._modules[str(len(self))] = _check_module(module, "ModuleList")
        return self

    def extend(self, modules):
        """Append each module of an iterable; returns the list."""
        if isinstance(modules, Module) and not isinstance(modules, ModuleList):
            raise TypeError("ModuleList.extend takes an iterable of modules; use append for one module")
        for module in list(modules):
            self.append(module)
        return self

    def insert(self, index, module):
        """Insert ``module`` before position ``index`` (Python's list.insert rule)."""
        modules = list(self._modules.values())
        modules.insert(operator.index(index), _check_module(module, "ModuleList"))
        self._renumber(modules)

    def pop(self, index=-1):
        """Remove and return the module at ``index``."""
        module = self[index]
        del self[index]
        return module

    def __repr__(self):
        """PyTorch's text: runs of identical members are shown once, as ``(0-2): 3 x Linear(...)``."""
        texts = [repr(module) for module in self]
        if not texts:
            return "ModuleList()"
        runs = []                                   # [first index, last index, text]
        for index, text in enumerate(texts):
            if runs and runs[-1][2] == text:
                runs[-1][1] = index
            else:
                runs.append([index, index, text])
        lines = []
        for first, last, text in runs:
            label = f"({first}): " if first == last else f"({first}-{last}): {last - first + 1} x "
            lines.append((label + text).replace("\n", "\n  "))
        return "ModuleList(\n  " + "\n  ".join(lines) + "\n)"


class ModuleDict(_Holder):
    """An ordered dict of modules, as PyTorch's: their parameters are named ``"<key>.<name>"``
    (``branches.a.weight``), in insertion order.

    Supports ``d[key]``, ``d[key] = module``, ``del d[key]``, ``in``, ``len``, iteration over the
    keys, ``keys``, ``values``, ``items``, ``update``, ``pop`` and ``clear``.  It has no forward or
    backward: a Module of yours calls its members.
    """

    def __init__(self, modules=None, *, backend=None, dtype=None):
        pairs = list(_pairs(modules)) if modules is not None else []
        backend, dtype = _backend_and_dtype([module for _, module in pairs], backend, dtype)
        super().__init__(backend=backend, dtype=dtype)
        self.update(pairs)

    def __getitem__(self, key):
        if key not in self._modules:
            raise KeyError(key)
        return self._modules[key]

    def __setitem__(self, key, module):
        if not isinstance(key, str):
            raise TypeError(f"ModuleDict keys are strings, got {type(key).__name__} {key!r}")
        if not key or "." in key:
            raise KeyError(f'module name can\'t be empty or contain ".", got: {key!r}')
        if key not in self._modules and hasattr(self, key):
            raise KeyError(f"attribute {key!r} already exists (a ModuleDict method or attribute): choose "
                           f"another key")
        self._modules[key] = _check_module(module, "ModuleDict")

    def __delitem__(self, key):
        del self._modules[key]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

    def clear(self):
        self._modules.clear()

    def pop(self, key):
        """Remove ``key`` and return its module."""
        module = self[key]
        del self[key]
        return module

    def update(self, modules):
        """Add or replace entries from a mapping (or ModuleDict) or an iterable of ``(key, module)`` pairs."""
        for key, module in _pairs(modules):
            self[key] = module


def _pairs(modules):
    """``(key, module)`` pairs from a mapping, a ModuleDict or an iterable of pairs."""
    if isinstance(modules, (Mapping, ModuleDict)):
        return list(modules.items())
    if isinstance(modules, Module):
        raise TypeError(f"ModuleDict takes a mapping or (key, module) pairs, got a {type(modules).__name__}")
    pairs = []
    for position, item in enumerate(modules):
        try:
            key, module = item
        except (TypeError, ValueError):
            raise ValueError(f"ModuleDict update sequence element #{position} should be a (key, module) pair, "
                             f"got {item!r}") from None
        pairs.append((key, module))
    return pairs


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
