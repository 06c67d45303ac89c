"""Stochastic gradient descent with momentum, exactly as ``torch.optim.SGD`` updates.

For each parameter ``p`` with gradient ``g``::

    g = g + weight_decay * p                       (decay joins the gradient, before momentum)
    buf = g                                         on the first step
    buf = momentum * buf + (1 - dampening) * g      afterwards
    g = g + momentum * buf  if nesterov  else  buf
    p = p - lr * g

All updates happen in place on the parameter's own array, on its own backend.
"""
from __future__ import annotations

from .. import backend as B
from ..parallel import map_items
from .optimizer import Optimizer


class SGD(Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def step(self):
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if params:
                map_items(lambda param: self._update(param, group), params, B.xp_of(params[0].data))

    def _update(self, param, group):
        momentum = group["momentum"]
        grad = -param.grad if group["maximize"] else param.grad
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * param.data
        if momentum:
            state = self.state_for(param)
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy(order="K")
            else:
                buf *= momentum
                buf += (1.0 - group["dampening"]) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        param.data -= group["lr"] * grad
