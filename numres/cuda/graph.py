"""A whole training step captured in a CUDA graph and replayed (CuPy stream capture).

A ResNet-50 step launches a few thousand kernels; at small batch sizes the time Python and
the driver spend launching them is a large part of the step.  Captured once, the step replays
as a single graph launch::

    model, crit, opt = ..., ..., ...            # on backend "cupy"
    train_step(model, crit, opt, x0, t0)        # one ordinary (eager) step first
    step = CapturedTrainStep(model, crit, opt, x0, t0)
    for x, t in batches:                        # same shapes, dtypes and layout as x0, t0
        loss = step(x, t)                       # copies x, t into the graph's buffers, replays

What a graph needs, and how this class provides it:

* **Static shapes.**  Every replay runs the same kernels on the same addresses.  Inputs are
  copied into buffers captured with the graph (``step.x``, ``step.target``); the returned loss is
  a 0-d device array that each replay overwrites (copy it to keep it).
* **No host round-trips.**  Capture fails on a device-to-host copy or synchronisation; numres's
  training step has none (the guard backend checks that in CI).
* **Memory.**  Arrays made during capture come from a private :class:`cupy.cuda.MemoryPool`
  that nothing else allocates from, so the addresses the graph writes stay reserved for as long
  as this object lives; :meth:`close` releases them.
* **Warm state.**  Kernels must be compiled and the optimizer's momentum buffers must exist
  before capture, hence one eager step first (checked).  Gradients are reset to ``None`` before
  capture, so each replay writes fresh gradients into the same arrays.
* **Baked-in scalars.**  The learning rate, momentum and weight decay are kernel arguments
  recorded at capture: after changing them (an LR schedule), capture again.

Not run on a GPU in the session that wrote it; ``tests/test_gpu.py`` checks it against eager
steps wherever a GPU is present.
"""
from __future__ import annotations

from .. import backend as B


def train_step(model, criterion, optimizer, x, target):
    """One eager step: zero grads, forward, loss, backward, SGD step; returns the loss (device array)."""
    optimizer.zero_grad()
    loss = criterion(model(x), target)
    model.backward(criterion.backward())
    optimizer.step()
    return loss


def _empty_like_layout(xp, array):
    """An uninitialised array with ``array``'s shape, dtype and memory order (channels-last stays so)."""
    order = sorted(range(array.ndim), key=lambda axis: -array.strides[axis])
    inverse = sorted(range(array.ndim), key=lambda axis: order[axis])
    return xp.empty(tuple(array.shape[a] for a in order), dtype=array.dtype).transpose(inverse)


class CapturedTrainStep:
    """``model``'s training step on batches shaped like ``example_input``/``example_target``, as a CUDA graph."""

    def __init__(self, model, criterion, optimizer, example_input, example_target):
        cupy = B.get_xp("cupy")
        if model.backend != "cupy":
            raise ValueError(f"CUDA graphs need a model on backend 'cupy', not {model.backend!r}")
        self._check_warm(optimizer)
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()
        cupy.cuda.Device().synchronize()                # eager work on other streams is done
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            self.x = _empty_like_layout(cupy, example_input)
            self.target = cupy.empty_like(example_target)
            self.x[...] = example_input
            self.target[...] = example_target
            model.zero_grad(set_to_none=True)
            optimizer.zero_grad(set_to_none=True)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self.loss = train_step(model, criterion, optimizer, self.x, self.target)
            finally:
                self.graph = self.stream.end_capture()
        self.graph.upload(self.stream)
        self.stream.synchronize()

    @staticmethod
    def _check_warm(optimizer):
        for group in optimizer.param_groups:
            if not group.get("momentum"):
                continue
            for param in group["params"]:
                if optimizer.state_for(param).get("momentum_buffer") is None:
                    raise RuntimeError("run one eager training step before capturing: the optimizer's momentum "
                                       "buffers (and the compiled kernels) must exist when the graph is recorded")

    def __call__(self, x, target):
        """Copy ``x``/``target`` into the graph's buffers and replay the step; returns the loss array.

        ``x`` and ``target`` must have the example's shapes and dtypes; device arrays are copied on
        the graph's stream after the current stream's queued work, host arrays are uploaded.
        """
        if self.graph is None:
            raise RuntimeError("this captured step was closed")
        cupy = B.get_xp("cupy")
        if tuple(x.shape) != self.x.shape or tuple(target.shape) != self.target.shape:
            raise ValueError(f"a captured step replays fixed shapes: expected input {self.x.shape} and target "
                             f"{self.target.shape}, got {tuple(x.shape)} and {tuple(target.shape)}")
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self.stream:
            for buffer, value in ((self.x, x), (self.target, target)):
                if isinstance(value, cupy.ndarray):
                    buffer[...] = value
                else:
                    buffer[...] = cupy.asarray(value)
            self.graph.launch(self.stream)
        cupy.cuda.get_current_stream().wait_event(self.stream.record())
        return self.loss

    def close(self):
        """Drop the graph and give its memory back."""
        self.graph = None
        self.loss = self.x = self.target = None
        self.pool.free_all_blocks()
