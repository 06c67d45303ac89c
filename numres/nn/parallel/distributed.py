"""DistributedDataParallel: one model replica per process, gradients averaged over the processes.

    ddp = nr.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    logits = ddp(x)                      # this rank's share of the batch
    ddp.backward(crit.backward())        # returns when p.grad holds the average over all ranks
    opt.step()                           # every rank takes the same step

Each rank computes the gradient of its own mean loss; averaging over the ``W`` ranks gives the
gradient of the mean loss over the global batch (all local batches of one size)::

    grad = (1 / W) * sum_r dL_r/dtheta      with  L_r = mean loss over rank r's examples

**Construction.**  Every rank reports the names, shapes, dtypes and ``requires_grad`` of its parameters
and buffers (one ``allgather``); if any rank differs from rank 0, every rank raises the same
``RuntimeError`` naming the differences, so no rank is left waiting in a collective.  Then rank 0's
parameters and buffers are broadcast to all ranks, so every replica starts identical.

**Knowing when a gradient is final.**  numres has no autograd graph, but each module's backward
accumulates the gradients of its *own* parameters and returns, and the module base class runs its
full backward hooks right after.  DDP registers one such hook on every module that owns trainable
parameters: when it fires, those parameters' gradients are final for this backward (a module runs
backward once per forward), and the :class:`~numres.nn.parallel.reducer.Reducer` is told.  Buckets
fill in the order backward reaches the layers (the reverse of the parameter order), and each
complete bucket's sum over ranks starts at once (MPI ``Iallreduce``; NCCL on a side stream) while
backward goes on with the earlier layers.  ``backward`` returns after every bucket is reduced and
averaged.  ``ddp.events`` records the order: a ``start`` before ``backward_done`` is overlap.

**Options.**  ``no_sync()`` skips the reduction (gradients accumulate locally; the next synchronised
backward averages the accumulated sum).  Parameters with ``requires_grad=False`` are left out.
``broadcast_buffers=True`` (as in torch) copies rank 0's buffers (BatchNorm running statistics) to
every rank before each training forward.  A parameter that gets no gradient in some backward is
always handled (it contributes zeros and receives the average), so ``find_unused_parameters`` is
accepted for torch compatibility and changes nothing; ``device_ids`` and ``output_device`` are
accepted and ignored (each process owns one device, chosen by :func:`numres.distributed.init`).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ... import backend as B
from ... import distributed as dist
from ..module import Module, is_grad_enabled
from .reducer import Reducer

DEFAULT_FIRST_BUCKET_MB = 1.0


class DistributedDataParallel(Module):
    """Wraps ``module`` (already on its backend and dtype); its parameters become ``module.<name>`` here, as in torch."""

    def __init__(self, module: Module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=25, find_unused_parameters=False):
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel wraps a numres Module, got {type(module).__name__}")
        if dim != 0:
            raise ValueError(f"DistributedDataParallel splits the batch along dim 0 only, got dim={dim}")
        if process_group is not None:
            raise ValueError("numres DistributedDataParallel runs on the whole job; process_group must be None")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        super().__init__(backend=module.backend, dtype=module.dtype)
        self.module = module
        self.broadcast_buffers = broadcast_buffers
        self.bucket_cap_mb = bucket_cap_mb
        self.find_unused_parameters = find_unused_parameters
        self.require_backward_grad_sync = True
        self.world_size = dist.get_world_size()
        self._check_same_model_everywhere()
        self._broadcast_state()
        trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.__dict__["reducer"] = Reducer(trainable, dist.all_reduce_async, self.world_size,
                                           int(bucket_cap_mb * 2 ** 20),
                                           int(min(bucket_cap_mb, DEFAULT_FIRST_BUCKET_MB) * 2 ** 20))
        self.__dict__["_hook_handles"] = self._register_gradient_hooks(trainable)
        self.__dict__["events"] = []

    # --- construction -----------------------------------------------------------------------------------

    def _signature(self):
        params = [("parameter", name, tuple(p.shape), str(p.dtype), p.requires_grad)
                  for name, p in self.module.named_parameters()]
        buffers = [("buffer", name, tuple(b.shape), str(b.dtype), None) for name, b in self.module.named_buffers()]
        return params + buffers

    def _check_same_model_everywhere(self):
        """Raise the same clear error on every rank when any rank built a different model than rank 0."""
        signatures = dist.all_gather_object(self._signature())
        problems = []
        for rank, signature in enumerate(signatures[1:], start=1):
            if signature != signatures[0]:
                problems += _differences(signatures[0], signature, rank)
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise RuntimeError("DistributedDataParallel: the ranks built different models (every rank must build "
                               "the same architecture):\n  " + "\n  ".join(shown))

    def _broadcast_state(self):
        """Rank 0's parameters and buffers to every rank: one broadcast per dtype, through a flat buffer."""
        arrays = [p.data for p in self.module.parameters()] + list(self.module.buffers())
        self._broadcast_arrays(arrays)

    def _broadcast_arrays(self, arrays):
        if self.world_size == 1 or not arrays:
            return
        groups = {}
        for array in arrays:
            groups.setdefault((B.backend_of(array), np.dtype(array.dtype).str), []).append(array)
        for (backend, dtype), members in groups.items():
            xp = B.get_xp(backend)
            flat = xp.empty(sum(a.size for a in members), dtype=np.dtype(dtype))
            offset = 0
            for array in members:
                flat[offset:offset + array.size] = array.reshape(-1)
                offset += array.size
            dist.broadcast(flat, 0)
            offset = 0
            for array in members:
                array[...] = flat[offset:offset + array.size].reshape(array.shape)
                offset += array.size

    def _register_gradient_hooks(self, trainable):
        """A full backward hook on each module that owns trainable parameters: after its backward, they are final."""
        owned = {id(p): name for name, p in trainable}
        handles = []
        for _, module in self.module.named_modules():
            mine = [(owned[id(p)], p) for p in module._parameters.values() if p is not None and id(p) in owned]
            if not mine:
                continue

            def gradients_final(_module, _grad_input, _grad_output, mine=mine):
                for name, param in mine:
                    self.reducer.mark_ready(param, name)

            handles.append(module.register_full_backward_hook(gradients_final))
        return handles

    # --- running ----------------------------------------------------------------------------------------

    def sync_buffers(self):
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        self._broadcast_arrays(list(self.module.buffers()))

    def forward(self, *inputs, **kwargs):
        if self.broadcast_buffers and self.training and self.world_size > 1:
            self.sync_buffers()
        return self.module(*inputs, **kwargs)

    def backward(self, grad_output, *args, **kwargs):
        """The wrapped module's backward, with the gradients averaged over ranks before it returns."""
        synchronise = self.require_backward_grad_sync and self.world_size > 1 and is_grad_enabled()
        if not synchronise:
            return self.module.backward(grad_output, *args, **kwargs)
        self.reducer.prepare()
        grad_input = self.module.backward(grad_output, *args, **kwargs)
        self.reducer.events.append(("backward_done", None, time.perf_counter()))
        self.reducer.finish()
        self.__dict__["events"] = self.reducer.events
        return grad_input

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this block accumulate gradients locally, without communication."""
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    @property
    def comm_wait_s(self) -> float:
        """Seconds the last synchronised backward spent waiting for reductions after its own work was done."""
        return self.reducer.comm_wait_s

    @property
    def bucket_names(self) -> list:
        """The parameter names of each bucket, in the order buckets are reduced."""
        return [list(bucket.names) for bucket in self.reducer.buckets]



def _differences(reference, signature, rank) -> list:
    """Readable differences between rank 0's parameter/buffer list and rank ``rank``'s."""
    ours = {(kind, name): rest for kind, name, *rest in reference}
    theirs = {(kind, name): rest for kind, name, *rest in signature}
    problems = []
    for (kind, name), rest in ours.items():
        if (kind, name) not in theirs:
            problems.append(f"rank {rank} has no {kind} {name!r}")
        elif theirs[(kind, name)] != rest:
            (shape, dtype, grad), (other_shape, other_dtype, other_grad) = rest, theirs[(kind, name)]
            extra = f" requires_grad={grad}" if kind == "parameter" else ""
            other_extra = f" requires_grad={other_grad}" if kind == "parameter" else ""
            problems.append(f"{kind} {name!r}: rank 0 has shape {shape} {dtype}{extra}, rank {rank} has shape "
                            f"{other_shape} {other_dtype}{other_extra}")
    problems += [f"rank {rank} has an extra {kind} {name!r}" for kind, name in theirs if (kind, name) not in ours]
    if not problems:
        problems.append(f"rank {rank} lists its parameters and buffers in a different order than rank 0")
    return problems
