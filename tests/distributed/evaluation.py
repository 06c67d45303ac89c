"""Distributed evaluation covers the test set exactly once and its allreduced metrics are exact.

Both ranks evaluate the same model on their DistributedEvalSampler shard of the digits test set (and
of an odd-sized subset, so the shards differ in size); the shards are gathered, and the summed
(correct, count, loss) must equal one process evaluating everything.  Also records each rank's
DistributedSampler indices for training, to check that the ranks' shards are disjoint.
"""
import sys

import common  # noqa: F401
import numpy as np

import numres as nr

out_path = sys.argv[1]
nr.distributed.init()
rank, world = nr.distributed.get_rank(), nr.distributed.get_world_size()
nr.manual_seed(1)
model = nr.resnet20(num_classes=10, in_channels=1, dtype="float64").eval()
criterion = nr.nn.CrossEntropyLoss(reduction="sum")


def evaluate(dataset):
    """(correct, count, loss sum) over ``dataset``."""
    totals = np.zeros(3)
    loader = nr.data.DataLoader(dataset, batch_size=64, dtype="float64")
    with nr.no_grad():
        for x, target in loader:
            logits = model(x)
            totals += [float((logits.argmax(axis=1) == target).sum()), len(target), float(criterion(logits, target))]
    return totals


result = {}
full = nr.data.load_dataset("digits", "test")
for name, dataset in (("digits_test", full), ("odd_subset", full.subset(101))):
    sampler = nr.data.DistributedEvalSampler(dataset)
    shards = nr.distributed.all_gather_object(sampler.indices().tolist())
    local = evaluate(nr.data.shard(dataset, sampler.indices()))
    summed = nr.distributed.all_reduce_sums(local)
    single = evaluate(dataset)
    covered = sorted(i for s in shards for i in s)
    result[name] = {"size": len(dataset), "covered_once": covered == list(range(len(dataset))),
                    "shard_sizes": [len(s) for s in shards], "summed": summed.tolist(), "single": single.tolist()}

train_sampler = nr.data.DistributedSampler(1437, shuffle=True, seed=3)
train_sampler.set_epoch(2)
result["train_shards"] = nr.distributed.all_gather_object(train_sampler.indices().tolist())
common.write_result(out_path, result, rank)
