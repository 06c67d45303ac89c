"""Data-parallel training over MPI (host arrays) and NCCL (CuPy arrays).

    mpiexec -n 2 python train.py

    import numres as nr
    nr.distributed.init()                      # join the job; rank, world size, local rank
    model = nr.nn.SyncBatchNorm.convert_sync_batchnorm(nr.resnet50())   # optional
    ddp = nr.nn.parallel.DistributedDataParallel(model)
    sampler = nr.data.DistributedSampler(dataset)                       # one shard per rank

See docs/distributed.md for the design, the scaling model and the measured numbers.
"""
from .collectives import (all_gather_object, all_reduce, all_reduce_async, all_reduce_sums, barrier, broadcast,
                          broadcast_object, communicator_for)
from .launch import find_mpiexec, mpiexec_command
from .process_group import (abort, get_comm, get_local_rank, get_rank, get_world_size, init, is_initialized,
                            is_main_process, launched_world_size, select_device)

__all__ = ["init", "is_initialized", "get_rank", "get_world_size", "get_local_rank", "get_comm", "is_main_process",
           "abort", "select_device", "launched_world_size", "find_mpiexec", "mpiexec_command", "all_reduce", "all_reduce_async", "all_reduce_sums", "broadcast", "all_gather_object",
           "broadcast_object", "barrier", "communicator_for"]
