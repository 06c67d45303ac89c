"""Collectives on arrays of either backend: the helpers layers and training loops call.

Each picks the transport from the array's backend (:func:`communicator_for`): MPI for NumPy,
NCCL for CuPy (or MPI through host memory when NCCL is missing).  In a job of one (before
:func:`~numres.distributed.init`, or ``mpiexec -n 1``) they return their input unchanged.

* ``all_reduce(array)``          - in-place sum over ranks (``op="mean"`` divides by the world size);
* ``all_reduce_async(array)``    - the same, started now; returns a work handle (``wait()``);
* ``broadcast(array, src=0)``    - rank ``src``'s values everywhere, in place;
* ``all_gather_object(obj)`` / ``broadcast_object(obj)`` / ``barrier()`` - for small Python values.
"""
from __future__ import annotations

import numpy as np

from .. import backend as B
from . import process_group as pg
from .communicators import HostStagingCommunicator, MPICommunicator, NCCLCommunicator, nccl_unavailable_reason

_communicators: dict[str, object] = {}


def communicator_for(backend: str):
    """The communicator that reduces arrays of ``backend`` (built on first use, then kept)."""
    if backend not in _communicators:
        comm = pg.get_comm()
        if backend == "numpy":
            _communicators[backend] = MPICommunicator(comm)
        elif backend == "cupy":
            cupy = B.get_xp("cupy")
            reason = nccl_unavailable_reason(cupy)
            _communicators[backend] = NCCLCommunicator(comm, cupy) if reason is None else \
                HostStagingCommunicator(comm, cupy, reason)
        else:
            raise ValueError(f"numres.distributed has no transport for backend {backend!r}")
    return _communicators[backend]


class _DoneWork:
    """The work handle of a job of one: nothing to wait for."""

    done = True

    def test(self):
        return True

    def wait(self):
        return None


def _needs_communication() -> bool:
    return pg.is_initialized() and pg.get_world_size() > 1


def all_reduce_async(array):
    """Start an in-place sum of ``array`` over ranks; returns a handle with ``test()`` and ``wait()``."""
    if not _needs_communication():
        return _DoneWork()
    return communicator_for(B.backend_of(array)).iallreduce(array)


def all_reduce(array, op: str = "sum"):
    """Sum (``op="sum"``) or average (``op="mean"``) ``array`` over ranks, in place; returns it."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce op must be 'sum' or 'mean', got {op!r}")
    if _needs_communication():
        communicator_for(B.backend_of(array)).allreduce(array)
        if op == "mean":
            array /= pg.get_world_size()
    return array


def broadcast(array, src: int = 0):
    """Rank ``src``'s values of ``array`` into every rank's ``array``, in place; returns it."""
    if _needs_communication():
        communicator_for(B.backend_of(array)).broadcast(array, src)
    return array


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list in a job of one)."""
    if not _needs_communication():
        return [obj]
    return pg.get_comm().allgather(obj)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _needs_communication():
        return obj
    return pg.get_comm().bcast(obj, root=src)


def barrier() -> None:
    if _needs_communication():
        pg.get_comm().Barrier()


def all_reduce_sums(values) -> np.ndarray:
    """A host float64 vector of per-rank sums (correct count, example count, loss sum...) summed over ranks."""
    totals = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    return all_reduce(totals)
