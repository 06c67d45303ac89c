"""Stochastic gradient descent with momentum, exactly as ``torch.optim.SGD`` updates.

For each parameter ``p`` with gradient ``g``::

    g = g + weight_decay * p                       (decay joins the gradient, before momentum)
    buf = g                                         on the first step
    buf = momentum * buf + (1 - dampening) * g      afterwards
    g = g + momentum * buf  if nesterov  else  buf
    p = p - lr * g

Parameters that are frozen (``requires_grad = False``) or have no gradient are skipped.
All updates happen in place on the parameter's own array, on its own backend.  On the CPU
the three arrays (parameter, gradient, buffer) are walked together in cache-sized tiles on
all cores, so each crosses memory once per step.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend as B
from ..parallel import map_tiles
from .optimizer import Optimizer, check_number


class SGD(Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def check_hyperparameters(self, options):
        """lr, momentum and weight_decay finite and >= 0, dampening finite (PyTorch allows any); nesterov
        needs a momentum and no dampening."""
        check_number("lr", options["lr"], what="learning rate")
        check_number("momentum", options["momentum"], what="momentum value")
        check_number("dampening", options["dampening"], low=-math.inf, what="dampening value")
        check_number("weight_decay", options["weight_decay"], what="weight_decay value")
        if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def step(self):
        for group in self.param_groups:
            for param in self.parameters_to_update(group):
                self._update(param, group)

    def _update(self, param, group):
        momentum = group["momentum"]
        buf, first_step = None, False
        if momentum:
            state = self.state_for(param)
            buf = state.get("momentum_buffer")
            if buf is not None and (type(buf) is not type(param.data) or buf.dtype != param.data.dtype):
                # the model was moved (module.to) after this buffer was made: follow it
                buf = state["momentum_buffer"] = B.convert(buf, B.backend_of(param.data), param.data.dtype)
            if buf is None:                         # the first step's buffer is the gradient itself
                buf = state["momentum_buffer"] = B.xp_of(param.data).zeros_like(param.grad)
                first_step = True
            else:
                first_step = False
        first_step = bool(momentum) and first_step
        arrays = [param.data, param.grad] + ([buf] if buf is not None else [])
        flat = same_layout_flat(arrays)
        if flat is None:                            # mixed memory layouts: whole-array operations
            self._update_arrays(param.data, param.grad, buf, group, first_step)
            return
        if buf is None:
            flat.append(None)
        map_tiles(lambda tile: self._update_arrays(flat[0][tile], flat[1][tile],
                                                   None if buf is None else flat[2][tile], group, first_step),
                  flat[0].shape[0], 1, B.xp_of(param.data))

    @staticmethod
    def _update_arrays(data, grad, buf, group, first_step=False):
        """The update on matching pieces of the parameter, its gradient and its momentum buffer."""
        momentum = group["momentum"]
        step = -grad if group["maximize"] else grad
        if group["weight_decay"]:
            step = step + group["weight_decay"] * data
        if momentum:
            if first_step:
                buf[...] = step
            else:
                buf *= momentum
                buf += (1.0 - group["dampening"]) * step if group["dampening"] else step
            step = step + momentum * buf if group["nesterov"] else buf
        data -= group["lr"] * step


def same_layout_flat(arrays):
    """1-D views, in memory order, of NumPy arrays that share one contiguous layout; None otherwise
    (other backends update whole arrays: a GPU needs no tiles)."""
    first = arrays[0]
    if not isinstance(first, np.ndarray) or any(
            type(a) is not type(first) or a.shape != first.shape or a.strides != first.strides for a in arrays[1:]):
        return None
    order = sorted(range(first.ndim), key=lambda axis: -first.strides[axis])
    if not first.transpose(order).flags.c_contiguous:
        return None
    return [a.transpose(order).reshape(-1) for a in arrays]
