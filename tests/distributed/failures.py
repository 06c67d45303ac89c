"""Jobs that must end within seconds with a clear message, never hang (the first argument picks one).

* ``mismatch``: rank 1 builds a model with a different classifier; DistributedDataParallel raises on
  every rank, and the uncaught error ends the job (MPI_Abort).
* ``crash``: during training, rank 1 raises while rank 0 waits in a collective (DDP's gradient
  reduction); rank 1's excepthook prints its message and aborts the job, which frees rank 0.
"""
import sys
import time

import common  # noqa: F401
import numpy as np

import numres as nr

case = sys.argv[1]
nr.distributed.init()
rank = nr.distributed.get_rank()
nr.manual_seed(0)

if case == "mismatch":
    model = nr.resnet20(num_classes=10 if rank == 0 else 12, dtype="float64")
    nr.nn.parallel.DistributedDataParallel(model)
    print(f"rank {rank}: constructed DDP despite the mismatch", flush=True)
elif case == "crash":
    model = nr.resnet20(num_classes=10, dtype="float64")
    ddp = nr.nn.parallel.DistributedDataParallel(model)
    criterion = nr.nn.CrossEntropyLoss()
    rng = np.random.default_rng(rank)
    for step in range(1000):
        x, target = rng.standard_normal((2, 3, 8, 8)), rng.integers(0, 10, 2)
        criterion(ddp(x), target)
        if rank == 1 and step == 2:
            time.sleep(0.5)                     # rank 0 is inside the gradient reduction by now
            raise ValueError("rank 1 failed on purpose in step 2")
        ddp.backward(criterion.backward())
    print(f"rank {rank}: finished 1000 steps", flush=True)
else:
    raise SystemExit(f"unknown case {case!r}")
