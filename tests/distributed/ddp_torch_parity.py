"""numres DDP against torch DDP (gloo), 2 processes, the same weights and data, float64.

Each MPI rank also joins a torch.distributed gloo group (``init_method=file://``, the second
argument), so both frameworks run side by side in the same two processes.  The model is a small
torchvision-style ResNet (one BasicBlock per stage) with plain BatchNorm2d, its stem convolution
frozen in both.  Checked on every rank:

* after one synchronised backward, every averaged gradient equals torch DDP's;
* with gradient accumulation (two backward passes under ``no_sync()`` and a third synchronised one)
  the result again equals torch DDP's under its own ``no_sync()``;
* the recorded events: which buckets started before the backward computation was over.
"""
import sys

import common  # noqa: F401
import numpy as np
import torch
import torch.distributed as tdist

import numres as nr
import torch_reference

out_path, store_file = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
comm = nr.distributed.init()
rank, world = nr.distributed.get_rank(), nr.distributed.get_world_size()
tdist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)

nr.manual_seed(5)
model = nr.ResNet(nr.BasicBlock, [1, 1, 1, 1], num_classes=10, dtype="float64")
torch_reference.randomize_batchnorms(model, seed=6)
reference = torch_reference.ResNet(torch_reference.BasicBlock, [1, 1, 1, 1], num_classes=10).double()
torch_reference.load_numres_state(reference, model)
model.conv1.weight.requires_grad = False
reference.conv1.weight.requires_grad_(False)

ddp = nr.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
torch_ddp = torch.nn.parallel.DistributedDataParallel(reference, bucket_cap_mb=1)

rng = np.random.default_rng(100 + rank)          # each rank its own data
criterion = nr.nn.CrossEntropyLoss()
torch_criterion = torch.nn.CrossEntropyLoss()


def batch():
    return rng.standard_normal((4, 3, 32, 32)), rng.integers(0, 10, 4)


def numres_step(x, target):
    criterion(ddp(x), target)
    ddp.backward(criterion.backward())


def torch_step(x, target):
    torch_criterion(torch_ddp(torch.from_numpy(x)), torch.from_numpy(target)).backward()


def gradient_errors():
    errors = {}
    for (name, p), (torch_name, tp) in zip(model.named_parameters(), reference.named_parameters()):
        assert name == torch_name
        if tp.grad is None:
            errors[name] = 0.0 if p.grad is None else float("inf")
        else:
            errors[name] = common.rel_err(p.grad, tp.grad.numpy())
    return errors


result = {}
# one synchronised step
x, target = batch()
numres_step(x, target)
torch_step(x, target)
errors = gradient_errors()
result["frozen_grad_is_none"] = all(g["conv1.weight"] == 0.0 for g in comm.allgather(errors)) and \
    model.conv1.weight.grad is None
result["events"] = [(kind, detail) for kind, detail, _ in ddp.events]
result["buckets"] = ddp.bucket_names
gathered = comm.allgather(errors)
result["step_errors_worst"] = common.worst({k: max(e[k] for e in gathered) for k in errors})
result["gradients_compared"] = len(errors)
local_grads = comm.allgather(float(np.abs(model.fc.weight.grad).sum()))
result["ranks_agree"] = local_grads[0] == local_grads[1]

# gradient accumulation: two local backward passes, then a synchronised one
model.zero_grad()
torch_ddp.zero_grad(set_to_none=True)
micro = [batch() for _ in range(3)]
with ddp.no_sync():
    for x, target in micro[:2]:
        numres_step(x, target)
with torch_ddp.no_sync():
    for x, target in micro[:2]:
        torch_step(x, target)
accumulated_differs = comm.allgather(float(model.fc.weight.grad.sum()))
result["no_sync_kept_local"] = accumulated_differs[0] != accumulated_differs[1]
numres_step(*micro[2])
torch_step(*micro[2])
errors = gradient_errors()
gathered = comm.allgather(errors)
result["no_sync_errors_worst"] = common.worst({k: max(e[k] for e in gathered) for k in errors})
tdist.destroy_process_group()
common.write_result(out_path, result, rank)
