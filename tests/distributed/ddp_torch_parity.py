"""numres DDP against torch DDP (gloo), 2 processes, the same weights and data, float64.

Each MPI rank also joins a torch.distributed gloo group (``init_method=file://``, the second
argument), so both frameworks run side by side in the same two processes.  The model is a small
torchvision-style ResNet (one BasicBlock per stage) with plain BatchNorm2d, its stem convolution
frozen in both.  Checked on every rank:

* after one synchronised backward, every averaged gradient equals torch DDP's;
* with gradient accumulation (two backward passes under ``no_sync()`` and a third synchronised one)
  the result again equals torch DDP's under its own ``no_sync()``;
* the recorded events: which buckets started before the backward computation was over;
* every averaged gradient is the same whole array on both ranks;
* buffer broadcast: with rank 1's BatchNorm buffers perturbed, the next training forward starts from
  rank 0's buffers on both ranks, and each rank's buffers after it equal torch DDP's.
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
result["step_errors_worst"] = common.worst(common.gathered_worst(comm, errors))
result["gradients_compared"] = len(errors)
# every averaged gradient, whole, is the same array on both ranks (bit for bit: one all-reduce)
local_grads = comm.allgather({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
result["ranks_agree"] = list(local_grads[0]) == list(local_grads[1]) and len(local_grads[0]) == 37 and \
    all(np.array_equal(local_grads[0][name], local_grads[1][name]) for name in local_grads[0])
result["ranks_disagree_on"] = [name for name in local_grads[0]
                               if not np.array_equal(local_grads[0][name], local_grads[1].get(name))]

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
# Whole arrays: fc.weight.grad.sum() is 0 in exact arithmetic (softmax cross-entropy), so comparing sums
# would compare rounding noise.  Each rank saw its own batches, so its local gradient differs.
accumulated = comm.allgather(np.array(model.fc.weight.grad, copy=True))
result["no_sync_kept_local"] = not np.array_equal(accumulated[0], accumulated[1])
numres_step(*micro[2])
torch_step(*micro[2])
errors = gradient_errors()
result["no_sync_errors_worst"] = common.worst(common.gathered_worst(comm, errors))

# buffer broadcast: rank 1's BatchNorm buffers are perturbed (in both frameworks alike); the next
# training forward must first copy rank 0's buffers to every rank (broadcast_buffers=True), then
# update them with the local batch.  Each rank's buffers then equal torch DDP's on that rank, and
# rank 1's running statistics no longer carry the perturbation.
if rank == 1:
    for (name, b), (_, tb) in zip(model.named_buffers(), reference.named_buffers()):
        shift = 3 if b.dtype.kind == "i" else 0.25 + 0.5 * np.arange(b.size).reshape(b.shape)
        b[...] = b + shift
        with torch.no_grad():
            tb.copy_(torch.from_numpy(np.asarray(b)))
perturbed = comm.allgather({name: b.copy() for name, b in model.named_buffers()})
result["buffers_differ_before_forward"] = all(not np.array_equal(perturbed[0][k], perturbed[1][k])
                                              for k in perturbed[0])
x, target = batch()
numres_step(x, target)
torch_step(x, target)
buffer_errors = {}
for (name, b), (torch_name, tb) in zip(model.named_buffers(), reference.named_buffers()):
    assert name == torch_name
    if b.dtype.kind == "i":
        buffer_errors[name] = 0.0 if int(b) == int(tb) == int(perturbed[0][name]) + 1 else float("inf")
    else:
        buffer_errors[name] = common.rel_err(b, tb.numpy())
result["buffer_errors_worst"] = common.worst(common.gathered_worst(comm, buffer_errors))
result["buffers_compared"] = len(buffer_errors)
tdist.destroy_process_group()
common.write_result(out_path, result, rank)
