"""2 ranks with SyncBatchNorm (+ DDP)  vs  1 process with BatchNorm2d on the whole batch (float64).

Part 1, the layer alone, with even (3 + 3) and uneven (3 + 5) per-rank batches: each rank's
SyncBatchNorm output and input gradient equal torch's BatchNorm2d run on the concatenated global
batch (with the concatenated random upstream gradient), the per-rank weight/bias gradients sum to
torch's, and the running statistics (random at the start) equal torch's on every rank.
Part 2, training: a resnet20 (SGD with momentum and weight decay, 3 steps) on 2 ranks ends with the
parameters and BN buffers of the same model trained in one process on the whole batch of 8.
"""
import sys

import common  # noqa: F401  (sets sys.path)
import numpy as np
import torch

import numres as nr
from torch_reference import randomize_batchnorms

out_path = sys.argv[1]
comm = nr.distributed.init()
rank, world = nr.distributed.get_rank(), nr.distributed.get_world_size()
assert world == 2, "run with mpiexec -n 2"
result = {"world_size": world}

# --- part 1: the layer against torch's BatchNorm2d over the global batch ----------------------------
# Two splits of the global batch: even (3 + 3) and uneven (3 + 5).  With uneven shares the global
# mean and variance must weight each rank by its count: averaging the per-rank statistics gives
# other numbers, and so does dividing the summed gradient terms by the local count.
rng = np.random.default_rng(7)
channels = 5
layer_errors = {}
for split in ((3, 3), (3, 5)):
    n = sum(split)
    x_global = rng.standard_normal((n, channels, 5, 7)) * 2.0 + 0.5
    x_global[split[0]:] += 1.5                   # the ranks' shares differ in distribution too
    dy_global = rng.standard_normal(x_global.shape)
    weight, bias = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
    running_mean, running_var = 0.1 * rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    mine = slice(sum(split[:rank]), sum(split[:rank + 1]))
    for relu in (False, True):
        sync_bn = nr.nn.SyncBatchNorm(channels, dtype="float64")
        sync_bn.weight.data[...] = weight
        sync_bn.bias.data[...] = bias
        sync_bn.running_mean[...] = running_mean
        sync_bn.running_var[...] = running_var
        y = sync_bn(x_global[mine].copy(), relu=relu)
        dx = sync_bn.backward(dy_global[mine].copy())
        summed = np.concatenate([sync_bn.weight.grad, sync_bn.bias.grad])
        nr.distributed.all_reduce(summed)
        torch_bn = torch.nn.BatchNorm2d(channels, dtype=torch.float64)
        with torch.no_grad():
            torch_bn.weight.copy_(torch.from_numpy(weight))
            torch_bn.bias.copy_(torch.from_numpy(bias))
            torch_bn.running_mean.copy_(torch.from_numpy(running_mean))
            torch_bn.running_var.copy_(torch.from_numpy(running_var))
        xt = torch.from_numpy(x_global).requires_grad_(True)
        yt = torch_bn(xt)
        if relu:
            yt = torch.relu(yt)
        yt.backward(torch.from_numpy(dy_global))
        tag = f"{split[0]}+{split[1]}.{'relu' if relu else 'plain'}"
        layer_errors[f"{tag}.output"] = common.rel_err(y, yt.detach().numpy()[mine])
        layer_errors[f"{tag}.input_grad"] = common.rel_err(dx, xt.grad.numpy()[mine])
        layer_errors[f"{tag}.weight_grad"] = common.rel_err(summed[:channels], torch_bn.weight.grad.numpy())
        layer_errors[f"{tag}.bias_grad"] = common.rel_err(summed[channels:], torch_bn.bias.grad.numpy())
        layer_errors[f"{tag}.running_mean"] = common.rel_err(sync_bn.running_mean, torch_bn.running_mean.numpy())
        layer_errors[f"{tag}.running_var"] = common.rel_err(sync_bn.running_var, torch_bn.running_var.numpy())
        if int(sync_bn.num_batches_tracked) != int(torch_bn.num_batches_tracked):
            layer_errors[f"{tag}.num_batches_tracked"] = float("inf")
result["layer_errors"] = common.gathered_worst(comm, layer_errors)
result["local_batches"] = comm.allgather(int(mine.stop - mine.start))


# --- part 2: three SGD steps of resnet20 ----------------------------------------------------------
def build():
    nr.manual_seed(3)
    model = nr.resnet20(num_classes=10, dtype="float64")
    randomize_batchnorms(model, seed=4)
    return model


steps, local_batch = 3, 4
data_rng = np.random.default_rng(11)
batches = [(data_rng.standard_normal((world * local_batch, 3, 8, 8)), data_rng.integers(0, 10, world * local_batch))
           for _ in range(steps)]
sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)

reference = build()                              # one process, the whole batch of 8
reference_opt = nr.optim.SGD(reference.parameters(), **sgd)
criterion = nr.nn.CrossEntropyLoss()
for x, target in batches:
    reference_opt.zero_grad()
    criterion(reference(x), target)
    reference.backward(criterion.backward())
    reference_opt.step()

model = build()
if rank == 1:                                    # a different start on rank 1: DDP must broadcast rank 0's
    for p in model.parameters():
        p.data += 1.0
model = nr.nn.SyncBatchNorm.convert_sync_batchnorm(model)
ddp = nr.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.05)
opt = nr.optim.SGD(ddp.parameters(), **sgd)
local_criterion = nr.nn.CrossEntropyLoss()
for x, target in batches:
    part = slice(rank * local_batch, (rank + 1) * local_batch)
    opt.zero_grad()
    local_criterion(ddp(x[part].copy()), target[part])
    ddp.backward(local_criterion.backward())
    opt.step()

expected = reference.state_dict()
errors = {}
for key, value in model.state_dict().items():
    errors[key] = common.rel_err(value, expected[key])
merged = common.gathered_worst(comm, errors)
result["train_errors_worst"] = common.worst(merged)
result["train_keys"] = len(merged)
result["sync_bn_count"] = sum(isinstance(m, nr.nn.SyncBatchNorm) for m in model.modules())
result["buckets"] = len(ddp.bucket_names)
common.write_result(out_path, result, rank)
