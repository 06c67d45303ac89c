"""Which implementation of each functional op a backend uses.

Every op in :mod:`numres.functional` is generic array code that runs on any backend.
A backend may register a faster version of an op (a CUDA kernel, say) under the
same name and signature; :func:`ops_for` hands modules the registered version
where there is one and the generic one otherwise.  Tests check each registered
kernel against the generic op it replaces.

Inside ``nr.reference_mode()`` every backend gets :mod:`numres.reference` instead: the
textbook functions, under the same names and signatures, so that a whole model runs on them.
"""
from __future__ import annotations

import numres.functional as generic
from numres.config import is_reference_mode

_KERNELS: dict[str, dict[str, object]] = {}


def register_kernel(backend: str, name: str, function) -> None:
    """Use ``function`` for op ``name`` on ``backend``; it must match the generic op's signature."""
    if not hasattr(generic, name):
        raise ValueError(f"no generic functional op named {name!r} to accelerate")
    _KERNELS.setdefault(backend, {})[name] = function
    _NAMESPACES.pop(backend, None)


def unregister_kernel(backend: str, name: str) -> None:
    _KERNELS.get(backend, {}).pop(name, None)
    _NAMESPACES.pop(backend, None)


class Ops:
    """Attribute access gives the op for one backend: its kernel if registered, else the generic op."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name):
        function = _KERNELS.get(self.backend, {}).get(name) or getattr(generic, name)
        setattr(self, name, function)
        return function


_NAMESPACES: dict[str, Ops] = {}


def ops_for(backend: str):
    """The ops a module on ``backend`` calls: :mod:`numres.reference` in reference mode, else the engine's."""
    if is_reference_mode():
        import numres.reference
        return numres.reference
    if backend not in _NAMESPACES:
        _NAMESPACES[backend] = Ops(backend)
    return _NAMESPACES[backend]
