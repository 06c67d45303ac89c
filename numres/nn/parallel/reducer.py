"""Gradient buckets for DistributedDataParallel: fill, reduce while backward runs, average, copy back.

The trainable parameters are taken in **reverse** order of ``model.parameters()``, which is roughly
the order backward produces their gradients, and grouped into buckets of at most ``bucket_cap_bytes``
(the first bucket is smaller, ``first_bucket_cap_bytes``, so communication starts early), each of
one dtype.  Each bucket owns one flat contiguous buffer.

During backward, :meth:`Reducer.mark_ready` is told each parameter whose gradient is final.  When
every parameter of a bucket is ready, its gradients are copied into the buffer and a non-blocking
sum over ranks is started on it.  Buckets are *started in index order* on every rank (a bucket that
completes early waits for the ones before it), because MPI and NCCL need every rank to issue
collectives on a communicator in the same order.  :meth:`Reducer.finish`, at the end of backward,
starts any bucket still missing (a parameter that got no gradient this time contributes zeros),
waits for all, divides by the world size and copies the averages back into ``p.grad``::

    p.grad  <-  (1 / world_size) * sum over ranks r of p.grad[r]

Each step appends ``(event, detail, time)`` to ``events``: ``ready`` (a parameter), ``start``
and ``done`` (a bucket; ``done`` is recorded as soon as a progress test sees it finished), so a
test can check that reductions started while backward was still running.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ... import backend as B


@dataclass
class Bucket:
    index: int
    params: list                 # (name, Parameter) in bucket order
    offsets: list                # start of each parameter in the flat buffer
    dtype: object
    backend: str
    numel: int
    buffer: object = None        # the flat buffer (allocated on first use, then reused)
    pending: int = 0             # parameters whose gradient is not final yet
    work: object = None          # the started reduction
    names: list = field(default_factory=list)


def plan_buckets(named_params, bucket_cap_bytes, first_bucket_cap_bytes):
    """Buckets over ``named_params`` (already in reverse order): consecutive, one dtype and backend each,
    closed when adding the next parameter would pass the cap (a parameter larger than the cap gets a
    bucket of its own)."""
    buckets, current, size = [], [], 0
    cap = first_bucket_cap_bytes

    def close():
        nonlocal current, size, cap
        if current:
            offsets, numel = [], 0
            for _, param in current:
                offsets.append(numel)
                numel += param.data.size
            first = current[0][1].data
            buckets.append(Bucket(len(buckets), current, offsets, first.dtype, B.backend_of(first), numel,
                                  names=[name for name, _ in current]))
            cap = bucket_cap_bytes
        current, size = [], 0

    for name, param in named_params:
        nbytes = param.data.size * param.data.dtype.itemsize
        if current:
            head = current[0][1].data
            if head.dtype != param.data.dtype or B.backend_of(head) != B.backend_of(param.data) or \
                    size + nbytes > cap:
                close()
        current.append((name, param))
        size += nbytes
    close()
    return buckets


class Reducer:
    """Averages the gradients of ``named_params`` over ranks, bucket by bucket, overlapping backward."""

    def __init__(self, named_params, all_reduce_async, world_size, bucket_cap_bytes, first_bucket_cap_bytes):
        self.buckets = plan_buckets(list(reversed(named_params)), bucket_cap_bytes, first_bucket_cap_bytes)
        self._all_reduce_async = all_reduce_async
        self.world_size = world_size
        self._where = {}                                   # id(param) -> (bucket, position)
        for bucket in self.buckets:
            for position, (_, param) in enumerate(bucket.params):
                self._where[id(param)] = (bucket, position)
        self.events: list = []
        self.comm_wait_s = 0.0
        self._ready = set()
        self._next_to_start = 0
        self._active = False

    # --- one backward pass ----------------------------------------------------------------------------

    def prepare(self):
        """Before backward: no parameter is ready, no bucket started."""
        self._ready.clear()
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.params), None
        self._next_to_start = 0
        self.events = []
        self.comm_wait_s = 0.0
        self._active = True

    def mark_ready(self, param, name=""):
        """``param``'s gradient is final for this backward; start every bucket that is now complete."""
        if not self._active or id(param) in self._ready or id(param) not in self._where:
            return
        self._ready.add(id(param))
        bucket, _ = self._where[id(param)]
        bucket.pending -= 1
        self.events.append(("ready", name, time.perf_counter()))
        self._start_complete_buckets()
        self.progress()

    def _start_complete_buckets(self, force=False):
        while self._next_to_start < len(self.buckets):
            bucket = self.buckets[self._next_to_start]
            if bucket.pending > 0 and not force:
                return
            self._start(bucket)
            self._next_to_start += 1

    def _start(self, bucket):
        xp = B.get_xp(bucket.backend)
        if bucket.buffer is None:
            bucket.buffer = xp.empty(bucket.numel, dtype=bucket.dtype)
        for (name, param), offset in zip(bucket.params, bucket.offsets):
            if B.backend_of(param.data) != bucket.backend or param.data.dtype != bucket.dtype:
                raise RuntimeError(f"parameter {name!r} moved to {B.backend_of(param.data)}/{param.data.dtype} after "
                                   f"DistributedDataParallel was built on {bucket.backend}/{bucket.dtype}: move the "
                                   f"model (model.to(...)) before wrapping it")
            view = bucket.buffer[offset:offset + param.data.size]
            if param.grad is None:
                view[...] = 0                                  # no gradient on this rank this time
            else:
                view[...] = param.grad.reshape(-1)
        self.events.append(("start", bucket.index, time.perf_counter()))
        bucket.work = self._all_reduce_async(bucket.buffer)

    def progress(self):
        """Let started reductions move on (MPI progresses non-blocking collectives inside MPI calls)."""
        for bucket in self.buckets[:self._next_to_start]:
            if bucket.work is not None and not bucket.work.done and bucket.work.test():
                self.events.append(("done", bucket.index, time.perf_counter()))

    def finish(self):
        """After backward: start what is left, wait for everything, write the averaged gradients."""
        self._start_complete_buckets(force=True)
        self._active = False
        scale = 1.0 / self.world_size
        for bucket in self.buckets:
            start = time.perf_counter()
            was_done = bucket.work.done
            bucket.work.wait()
            self.comm_wait_s += time.perf_counter() - start
            if not was_done:
                self.events.append(("done", bucket.index, time.perf_counter()))
            if self.world_size > 1:
                bucket.buffer *= scale
            for (_, param), offset in zip(bucket.params, bucket.offsets):
                if not param.requires_grad:
                    continue
                averaged = bucket.buffer[offset:offset + param.data.size].reshape(param.data.shape)
                if param.grad is None:
                    param.grad = averaged.copy()
                else:
                    param.grad[...] = averaged
        self.events.append(("finished", None, time.perf_counter()))
