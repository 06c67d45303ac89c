"""Adam and AdamW, exactly as ``torch.optim.Adam`` / ``torch.optim.AdamW`` update.

For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...`` (counted per parameter)::

    g = -g                                  if maximize
    p = p * (1 - lr * weight_decay)         AdamW (decoupled decay: the moments never see it)
    g = g + weight_decay * p                Adam  (L2 decay joins the gradient)
    m = m + (1 - beta1) * (g - m)           first moment  (= beta1 * m + (1 - beta1) * g)
    v = beta2 * v + (1 - beta2) * g * g     second moment
    v_max = max(v_max, v)                   if amsgrad; then v_max stands for v below
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

``m``, ``v`` and ``v_max`` start at zero.  The two factors ``1 - beta**t`` are the bias
corrections: they undo the pull towards zero of moments that start at zero.  The first
moment is updated as PyTorch's ``lerp`` does it (for a weight of 1/2 or more, the same
value computed from the other end, ``g - beta1 * (g - m)``).

The step count ``t`` lives on the host as a Python float (PyTorch's ``state["step"]``), so
the scalar factors are host numbers and a step on the GPU never reads a device value.
Parameters that are frozen (``requires_grad = False``) or have no gradient are skipped.
On the CPU the parameter, its gradient and its moments are walked together in cache-sized
tiles on all cores, as SGD does.

``state_dict()`` has PyTorch's layout: ``state[i]`` holds ``step``, ``exp_avg``,
``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) for the i-th parameter.
"""
from __future__ import annotations

from .. import backend as B
from ..parallel import map_tiles
from .optimizer import Optimizer, check_number
from .sgd import same_layout_flat


class Adam(Optimizer):
    """Adam (Kingma & Ba), with PyTorch's arguments and defaults.

    ``decoupled_weight_decay=True`` turns it into AdamW, as in PyTorch.
    """

    host_state_keys = ("step",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False):
        try:
            betas = tuple(betas)
        except TypeError:
            raise TypeError(f"betas must be a pair of numbers (beta1, beta2), got {betas!r}") from None
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=bool(maximize), decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults)

    def check_hyperparameters(self, options):
        """lr and weight_decay finite and >= 0, eps finite and > 0, each beta in [0, 1)."""
        check_number("lr", options["lr"], what="learning rate")
        check_number("eps", options["eps"], low_open=True, what="epsilon value")
        betas = options["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (betas must be a pair (beta1, beta2))")
        for index, beta in enumerate(betas):
            check_number(f"betas[{index}]", beta, high=1.0, high_open=True, what=f"beta parameter at index {index}")
        check_number("weight_decay", options["weight_decay"], what="weight_decay value")

    def step(self):
        for group in self.param_groups:
            for param in self.parameters_to_update(group):
                self._update(param, group)

    def _moments(self, param, amsgrad):
        """The parameter's state, created at zero on its first step; arrays follow the parameter if
        the model was moved (``module.to``) since they were made."""
        state = self.state_for(param)
        xp = B.xp_of(param.data)
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        if not state:
            state["step"] = 0.0
        for name in names:
            array = state.get(name)
            if array is None:
                state[name] = xp.zeros_like(param.data)
            elif type(array) is not type(param.data) or array.dtype != param.data.dtype:
                state[name] = B.convert(array, B.backend_of(param.data), param.data.dtype)
        return state, [state[name] for name in names]

    def _update(self, param, group):
        state, moments = self._moments(param, group["amsgrad"])
        state["step"] += 1.0
        step = state["step"]
        beta1, beta2 = group["betas"]
        scalars = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
            step_size=group["lr"] / (1.0 - beta1 ** step), bias_correction2_sqrt=(1.0 - beta2 ** step) ** 0.5)
        arrays = [param.data, param.grad] + moments
        flat = same_layout_flat(arrays)
        if flat is None:                            # another backend, or mixed memory layouts: whole arrays
            self._update_arrays(*arrays, **scalars)
            return
        map_tiles(lambda tile: self._update_arrays(*(a[tile] for a in flat), **scalars),
                  flat[0].shape[0], 1, B.xp_of(param.data))

    @staticmethod
    def _update_arrays(data, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1, beta2, eps,
                       weight_decay, decoupled, maximize, step_size, bias_correction2_sqrt):
        """One step on matching pieces of the parameter, its gradient and its moments (in place)."""
        xp = B.xp_of(data)
        if maximize:
            grad = -grad
        if weight_decay:
            if decoupled:
                data *= 1.0 - lr * weight_decay
            else:
                grad = grad + weight_decay * data
        weight = 1.0 - beta1
        if weight < 0.5:
            exp_avg += weight * (grad - exp_avg)
        else:
            exp_avg[...] = grad - (grad - exp_avg) * (1.0 - weight)
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * grad * grad
        if max_exp_avg_sq is not None:
            xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        else:
            second_moment = exp_avg_sq
        denominator = xp.sqrt(second_moment)
        denominator /= bias_correction2_sqrt
        denominator += eps
        data -= step_size * (exp_avg / denominator)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay`` before the
    Adam step, so the decay never enters the moments.  PyTorch's default ``weight_decay`` is 1e-2."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=True)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:         # an AdamW always decouples, whatever the file says
            group["decoupled_weight_decay"] = True
