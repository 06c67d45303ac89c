"""Test doubles for numres.

:mod:`numres.testing.guard` is an array module that behaves like CuPy at the host
boundary (no implicit conversion to NumPy, no ``float()`` of an array, no
data-dependent shapes) while computing with NumPy on the CPU.  Importing this
package registers it as backend ``"guard"``, so the CPU test suite can run whole
models with ``backend="guard"`` and catch GPU-path bugs without a GPU.
"""
from .guard import GuardedArray, HostRoundTripError, allow_sync, no_transfers, register

guard_xp = register()

__all__ = ["GuardedArray", "HostRoundTripError", "allow_sync", "no_transfers", "register", "guard_xp"]
