"""Start-up of a data-parallel job: who am I, how many are we, and what happens when one of us fails.

A job is launched by ``mpiexec -n N python ...`` (or ``mpirun``, or ``srun`` under Slurm); every
process then calls :func:`init`, which joins ``MPI.COMM_WORLD`` through mpi4py.  Nothing here is a
transport of its own: MPI starts the processes and carries host arrays, NCCL (through CuPy) carries
GPU arrays (see :mod:`numres.distributed.communicators`).

* ``get_rank()``       - this process's index in the job, ``0 .. world_size - 1``.
* ``get_world_size()`` - how many processes take part.
* ``get_local_rank()`` - this process's index among the processes on the same machine (MPI's
  shared-memory split); on GPUs process ``local_rank`` takes device ``local_rank % device_count``.

Before :func:`init` (or without any launcher) a program is a job of one: rank 0 of 1.

**Failure.**  A collective waits for every rank, so a rank that dies with an exception would leave
the others waiting forever.  :func:`init` therefore installs a ``sys.excepthook`` that prints the
traceback, prefixed with the rank, and then calls ``MPI_Abort``, which ends every process of the
job at once (``abort_on_exception=False`` leaves the hook alone).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

_state = {"comm": None, "rank": 0, "world_size": 1, "local_rank": 0, "previous_excepthook": None}


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("numres.distributed needs mpi4py and an MPI library: pip install 'numres[mpi]' "
                          "(installs mpi4py and mpich)") from exc
    return MPI


def init(backend: str = "numpy", *, abort_on_exception: bool = True, comm=None):
    """Join the job started by ``mpiexec``/``srun``; returns the MPI communicator of the job.

    ``backend="cupy"`` also selects this process's GPU (``local_rank % device_count``).  Calling
    ``init`` again returns the same communicator.  ``comm`` runs the job on a sub-communicator of
    ``MPI.COMM_WORLD`` instead of all of it.
    """
    if _state["comm"] is not None:
        return _state["comm"]
    MPI = _import_mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    _state.update(comm=comm, rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=node_comm.Get_rank())
    node_comm.Free()
    if abort_on_exception and _state["previous_excepthook"] is None:
        _state["previous_excepthook"] = sys.excepthook
        sys.excepthook = _abort_job_on_uncaught_exception
    if backend == "cupy":
        select_device()
    return comm


def select_device() -> int:
    """Bind this process to GPU ``local_rank % device_count`` (one process per GPU); returns the device id.
    Call it before any CuPy array is made (``init(backend="cupy")`` does)."""
    from .. import backend as B
    cupy = B.get_xp("cupy")
    device = _state["local_rank"] % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


# Set by the launchers for each process: MPICH/Intel MPI (and srun --mpi=pmi2), Open MPI, MVAPICH.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes an MPI launcher started this job with (1 when none did), read from the
    environment without starting MPI."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


ABORT_GRACE_SECONDS = 0.5


def _flush_before_abort(wait=True):
    """Flush this rank's output, then give the launcher a moment to forward it: MPI_Abort kills every
    process at once, and MPICH's mpiexec was seen to drop a message written just before it (about one
    job in twenty here), leaving the user a failed job and no word of why."""
    sys.stderr.flush()
    sys.stdout.flush()
    if wait:
        time.sleep(ABORT_GRACE_SECONDS)


def _abort_job_on_uncaught_exception(exc_type, exc, tb):
    """Print the failing rank's traceback, then end the whole job (every rank) with MPI_Abort."""
    rank, size, comm = _state["rank"], _state["world_size"], _state["comm"]
    if comm is None or size == 1:          # a job of one: the usual traceback, the usual exit
        (_state["previous_excepthook"] or sys.__excepthook__)(exc_type, exc, tb)
        return
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    prefix = f"[numres rank {rank}/{size}] "
    sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")))
    sys.stderr.write(f"{prefix}{exc_type.__name__} on rank {rank}: aborting all {size} ranks (MPI_Abort)\n")
    _flush_before_abort()
    comm.Abort(1)


def abort(message: str, code: int = 1):
    """Print ``message`` (with the rank) and end every rank of the job now."""
    sys.stderr.write(f"[numres rank {_state['rank']}/{_state['world_size']}] {message}\n")
    comm = _state["comm"]
    _flush_before_abort(comm is not None)
    if comm is not None:
        comm.Abort(code)
    raise SystemExit(code)


def is_initialized() -> bool:
    """True after :func:`init`."""
    return _state["comm"] is not None


def get_rank() -> int:
    return _state["rank"]


def get_world_size() -> int:
    return _state["world_size"]


def get_local_rank() -> int:
    return _state["local_rank"]


def get_comm():
    """The job's MPI communicator; a clear error before :func:`init`."""
    if _state["comm"] is None:
        raise RuntimeError("numres.distributed is not initialised: call numres.distributed.init() first "
                           "(under mpiexec -n N)")
    return _state["comm"]


def is_main_process() -> bool:
    """True on rank 0, the rank that prints and writes files."""
    return _state["rank"] == 0
