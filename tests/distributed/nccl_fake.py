"""The NCCL path of numres.distributed against a recording fake of CuPy and ``cupy.cuda.nccl`` (2 ranks).

There is no GPU here, so this checks the *protocol* the NCCL communicator follows, with real MPI
underneath the fake ``allReduce``:

* the unique id is drawn once, on rank 0, and every rank builds its communicator from that id
  (``NcclCommunicator(world_size, id, rank)``);
* ``iallreduce`` makes the side stream wait for the current stream (an event), runs ``allReduce``
  in place on the side stream with the right NCCL dtype, records a done event there, and ``wait()``
  makes the current stream wait for that event (no host synchronisation);
* DDP's Reducer on CuPy-like parameters averages the gradients through this path;
* without NCCL, CuPy arrays go through host memory over MPI, with one RuntimeWarning.
"""
import sys
import types
import warnings

import common  # noqa: F401
import numpy as np
from mpi4py import MPI

import numres as nr
from numres import backend as B
from numres.distributed import collectives
from numres.nn import Parameter
from numres.nn.parallel.reducer import Reducer

out_path = sys.argv[1]
log = []                           # every call the fake sees, in order


class DeviceArray(np.ndarray):
    """A host array that answers to CuPy's ``.data.ptr`` and ``.set()``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def set(self, host):
        log.append(("set", self.size))
        np.copyto(self.view(np.ndarray), host)

    def get(self):
        return np.array(self.view(np.ndarray))


_registry = {}


def device(values, dtype=None):
    array = np.array(values, dtype=dtype).view(DeviceArray)
    _registry[array.data.ptr] = array
    return array


class Stream:
    _next = 1000

    def __init__(self, non_blocking=False, ptr=None):
        self.ptr = ptr if ptr is not None else Stream._next
        Stream._next += 1
        self.non_blocking = non_blocking

    def wait_event(self, event):
        log.append(("wait_event", self.ptr, event.id))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


CURRENT = Stream(ptr=0)


class Event:
    _next = 0

    def __init__(self, disable_timing=False):
        self.id, Event._next = Event._next, Event._next + 1
        self.done = False

    def record(self, stream):
        log.append(("record", stream.ptr, self.id))
        self.done = True


class Nccl(types.ModuleType):
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64, NCCL_SUM = 6, 7, 8, 2, 4, 0
    available = True
    unique_ids_drawn = 0

    def get_unique_id(self):
        Nccl.unique_ids_drawn += 1
        return tuple(np.random.default_rng().integers(0, 255, 128).tolist())

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):
            ids = MPI.COMM_WORLD.allgather(commId)
            log.append(("comm_init", ndev, rank, all(i == ids[0] for i in ids)))

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
            array = _registry[recvbuf]
            log.append(("allReduce", stream, datatype, op, count, sendbuf == recvbuf))
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, array.view(np.ndarray)[:count], op=MPI.SUM)


nccl = Nccl("cupy.cuda.nccl")
cuda = types.ModuleType("cupy.cuda")
cuda.nccl, cuda.Stream, cuda.Event = nccl, Stream, Event
cuda.get_current_stream = lambda: CURRENT
cupy = types.ModuleType("cupy")
cupy.cuda, cupy.ndarray = cuda, DeviceArray
cupy.asnumpy = lambda a: np.array(a.view(np.ndarray))


def empty(shape, dtype=np.float32):
    return device(np.empty(shape, dtype=dtype))


cupy.empty = empty
sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl})
B.register_backend("cupy", lambda: cupy)
B.get_xp("cupy")                  # loaded, so backend_of() knows its arrays (as after a real model.to("cupy"))

nr.distributed.init()
rank, world = nr.distributed.get_rank(), nr.distributed.get_world_size()
result = {}

# --- start-up and one reduction -----------------------------------------------------------------------
a = device(np.arange(6) + 10.0 * rank, np.float32)
nr.distributed.all_reduce(a)
communicator = collectives.communicator_for("cupy")
result["communicator"] = type(communicator).__name__
result["unique_ids_drawn"] = MPI.COMM_WORLD.allgather(Nccl.unique_ids_drawn)
result["comm_init"] = [entry for entry in log if entry[0] == "comm_init"]
result["sum_ok"] = bool(np.array_equal(a.view(np.ndarray), 2 * np.arange(6) + 10.0))
result["side_stream_non_blocking"] = communicator.stream.non_blocking
result["side_stream"] = communicator.stream.ptr
start = max(i for i, entry in enumerate(log) if entry[0] == "comm_init") + 1
result["sequence"] = log[start:]


# --- DDP's reducer on CuPy-like parameters: float64 gradients averaged through NCCL ----------------------
rng = np.random.default_rng(rank)
params = [(f"p{i}", Parameter(device(rng.standard_normal(shape)))) for i, shape in enumerate([(3, 4), (5,), (2, 2)])]
for _, p in params:
    p.grad = device(rng.standard_normal(p.shape) + rank)
local = [p.grad.view(np.ndarray).copy() for _, p in params]
everyone = MPI.COMM_WORLD.allgather(local)
reducer = Reducer(params, nr.distributed.all_reduce_async, world, bucket_cap_bytes=64, first_bucket_cap_bytes=64)
log.clear()
reducer.prepare()
for name, p in reversed(params):
    reducer.mark_ready(p, name)
reducer.finish()
expected = [sum(ranks[i] for ranks in everyone) / world for i in range(len(params))]
result["reducer_error"] = max(common.rel_err(p.grad.view(np.ndarray), e) for (_, p), e in zip(params, expected))
result["reducer_buckets"] = len(reducer.buckets)
result["reducer_nccl_types"] = sorted({entry[2] for entry in log if entry[0] == "allReduce"})

# --- no NCCL: through host memory, one warning --------------------------------------------------------
collectives._communicators.clear()
nccl.available = False
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    b = device(np.full(4, 1.0 + rank))
    nr.distributed.all_reduce(b)
    collectives._communicators.clear()
    c = device(np.full(2, 3.0))
    nr.distributed.all_reduce(c, op="mean")
result["fallback_communicator"] = type(collectives.communicator_for("cupy")).__name__
result["fallback_values_ok"] = bool(np.all(b.view(np.ndarray) == 3.0) and np.all(c.view(np.ndarray) == 3.0))
result["fallback_warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
common.write_result(out_path, result, rank)
