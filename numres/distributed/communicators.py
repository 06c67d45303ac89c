"""The transports: MPI for host (NumPy) arrays, NCCL for CuPy arrays, MPI through host memory as a fallback.

Each communicator sums arrays over the ranks of the job, in place, and offers the same four calls:

* ``allreduce(array)``  - blocking sum over ranks, in place;
* ``iallreduce(array)`` - starts the same sum and returns a *work* handle at once; ``work.test()``
  says (without blocking) whether it has finished, ``work.wait()`` waits for it;
* ``broadcast(array, root)`` - rank ``root``'s values into every rank's array, in place;
* ``allgather_object(obj)`` - a list of every rank's ``obj`` (small Python objects, pickled by MPI).

Arrays given to them must be contiguous (the bucket buffers of
:class:`~numres.nn.parallel.DistributedDataParallel` are) and must stay alive until the work is done.

**MPI** (``MPICommunicator``): ``Iallreduce`` on ``MPI_IN_PLACE``.  An MPI library progresses a
non-blocking collective inside MPI calls, so ``work.test()`` is also what moves it forward: DDP
calls it between layers while backward runs.

**NCCL** (``NCCLCommunicator``): rank 0 draws NCCL's unique id, MPI broadcasts it, and every rank
builds its ``cupy.cuda.nccl.NcclCommunicator`` from it.  ``iallreduce`` orders the reduction after the
work already queued on the current stream (an event the side stream waits for), runs
``ncclAllReduce`` on a side stream, and records a *done* event there.  ``work.wait()`` makes the
current stream wait for that event: the host never blocks, the GPU keeps the order.

**Fallback** (``HostStagingCommunicator``): a CuPy run without NCCL copies each array to the host,
reduces it with MPI and copies it back.  That is correct but slow (two PCIe copies and a host sync
per bucket), and it says so once with a ``RuntimeWarning``.
"""
from __future__ import annotations

import warnings

import numpy as np


class MPIWork:
    """A started ``Iallreduce``: ``test()`` progresses it without blocking, ``wait()`` finishes it."""

    def __init__(self, request):
        self._request = request
        self.done = False

    def test(self) -> bool:
        if not self.done:
            self.done = bool(self._request.Test())
        return self.done

    def wait(self) -> None:
        if not self.done:
            self._request.Wait()
            self.done = True


class MPICommunicator:
    """Sums NumPy arrays over ``comm`` (an mpi4py communicator)."""

    name = "mpi"

    def __init__(self, comm):
        from mpi4py import MPI
        self._mpi = MPI
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    @staticmethod
    def _flat(array):
        """A 1-D view of ``array`` (MPI cannot write through a 0-d array's buffer)."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"the MPI communicator reduces NumPy arrays, got {type(array).__module__}."
                            f"{type(array).__name__}")
        if not array.flags.c_contiguous:
            raise ValueError("the MPI communicator needs a C-contiguous array (copy it with np.ascontiguousarray)")
        return array.reshape(-1)

    def allreduce(self, array):
        self.comm.Allreduce(self._mpi.IN_PLACE, self._flat(array), op=self._mpi.SUM)
        return array

    def iallreduce(self, array) -> MPIWork:
        return MPIWork(self.comm.Iallreduce(self._mpi.IN_PLACE, self._flat(array), op=self._mpi.SUM))

    def broadcast(self, array, root=0):
        self.comm.Bcast(self._flat(array), root=root)
        return array

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()


class NCCLWork:
    """A reduction queued on the NCCL side stream; ``done_event`` is recorded after it."""

    def __init__(self, cupy, done_event):
        self._cupy = cupy
        self.done_event = done_event
        self.done = False

    def test(self) -> bool:
        if not self.done:
            self.done = bool(self.done_event.done)
        return self.done

    def wait(self) -> None:
        """Order the current stream after the reduction (a device-side wait; the host does not block)."""
        self._cupy.cuda.get_current_stream().wait_event(self.done_event)
        self.done = True


class NCCLCommunicator:
    """Sums CuPy arrays with NCCL; the communicator's unique id travels over MPI (``mpi_comm``)."""

    name = "nccl"

    def __init__(self, mpi_comm, cupy):
        from cupy.cuda import nccl
        self._cupy, self._nccl = cupy, nccl
        self.mpi_comm = mpi_comm
        self.rank, self.world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = mpi_comm.bcast(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(self.world_size, unique_id, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._types = {np.dtype("float32"): nccl.NCCL_FLOAT32, np.dtype("float64"): nccl.NCCL_FLOAT64,
                       np.dtype("float16"): nccl.NCCL_FLOAT16, np.dtype("int32"): nccl.NCCL_INT32,
                       np.dtype("int64"): nccl.NCCL_INT64}

    def _nccl_type(self, array):
        if not isinstance(array, self._cupy.ndarray):
            raise TypeError(f"the NCCL communicator reduces CuPy arrays, got {type(array).__module__}."
                            f"{type(array).__name__}")
        if not array.flags.c_contiguous:
            raise ValueError("the NCCL communicator needs a C-contiguous array")
        try:
            return self._types[np.dtype(array.dtype)]
        except KeyError:
            raise TypeError(f"NCCL cannot reduce arrays of dtype {array.dtype}") from None

    def _on_side_stream(self, launch) -> NCCLWork:
        """Run ``launch(stream_ptr)`` on the side stream after everything queued so far on the current
        stream (an event the side stream waits for); the work handle waits for a *done* event after it."""
        ready = self._cupy.cuda.Event(disable_timing=True)
        ready.record(self._cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        launch(self.stream.ptr)
        done = self._cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return NCCLWork(self._cupy, done)

    def iallreduce(self, array) -> NCCLWork:
        nccl_type = self._nccl_type(array)
        return self._on_side_stream(lambda stream: self.comm.allReduce(
            array.data.ptr, array.data.ptr, array.size, nccl_type, self._nccl.NCCL_SUM, stream))

    def allreduce(self, array):
        self.iallreduce(array).wait()
        return array

    def broadcast(self, array, root=0):
        nccl_type = self._nccl_type(array)
        self._on_side_stream(lambda stream: self.comm.bcast(array.data.ptr, array.size, nccl_type, root,
                                                            stream)).wait()
        return array

    def allgather_object(self, obj):
        return self.mpi_comm.allgather(obj)

    def barrier(self):
        self.mpi_comm.Barrier()


class HostStagingWork:
    """An MPI reduction of a host copy; ``wait()`` copies the result back into the device array."""

    def __init__(self, work: MPIWork, host, device_array):
        self._work, self._host, self._device_array = work, host, device_array
        self.done = False

    def test(self) -> bool:
        return self._work.test()

    def wait(self) -> None:
        if not self.done:
            self._work.wait()
            self._device_array.set(self._host)
            self.done = True


_fallback_warned = False


class HostStagingCommunicator:
    """CuPy arrays reduced by MPI through host memory (used when NCCL is not available)."""

    name = "mpi-host-staging"

    def __init__(self, mpi_comm, cupy, reason=""):
        global _fallback_warned
        self._cupy = cupy
        self._mpi = MPICommunicator(mpi_comm)
        self.rank, self.world_size = self._mpi.rank, self._mpi.world_size
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn("numres.distributed: NCCL is not available" + (f" ({reason})" if reason else "") +
                          "; CuPy arrays are reduced by MPI through host memory, which is much slower. "
                          "Install nvidia-nccl-cu12 (or -cu13) for CuPy's NCCL.", RuntimeWarning, stacklevel=3)

    def iallreduce(self, array) -> HostStagingWork:
        host = np.ascontiguousarray(self._cupy.asnumpy(array))
        return HostStagingWork(self._mpi.iallreduce(host), host, array)

    def allreduce(self, array):
        work = self.iallreduce(array)
        work.wait()
        return array

    def broadcast(self, array, root=0):
        host = np.ascontiguousarray(self._cupy.asnumpy(array))
        self._mpi.broadcast(host, root)
        array.set(host)
        return array

    def allgather_object(self, obj):
        return self._mpi.allgather_object(obj)

    def barrier(self):
        self._mpi.barrier()


def nccl_unavailable_reason(cupy) -> str | None:
    """Why CuPy's NCCL cannot be used here, or None when it can."""
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        return f"cupy.cuda.nccl cannot be imported: {exc}"
    if not getattr(nccl, "available", True):
        return "CuPy was built without NCCL"
    return None
