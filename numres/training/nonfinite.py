"""Where values went non-finite: the failing batch run again with a forward hook on every module."""
from __future__ import annotations

import numpy as np

from .. import backend as B
from ..nn import no_grad


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the first non-finite layer."""


def locate_nonfinite(model, x) -> dict:
    """Run ``model`` forward on ``x`` with hooks; report the first module whose output is not finite.

    Returns ``{"input": bool, "layer": name or None, "layer_type": ..., "parameters": [names]}``.
    Children finish their forward before their parents, so the first hook to see a
    non-finite output belongs to the innermost module where the values went bad.
    """
    xp = B.xp_of(x)

    def finite(array):          # an explicit host read: this is the diagnosis, off the training path
        return bool(B.to_numpy(xp.isfinite(array).all()))

    found = {"input": not finite(x), "layer": None, "layer_type": None,
             "parameters": [name for name, p in model.named_parameters() if not finite(p.data)]}

    def watch(name):
        def hook(module, inputs, output):
            if found["layer"] is None and not finite(output):
                found["layer"], found["layer_type"] = name or "(model)", type(module).__name__
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules()]
    try:
        with no_grad(), np.errstate(all="ignore"):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def describe_nonfinite(what, loss_value, where, found) -> str:
    """One sentence: what went non-finite, where in the run, and which layer (from :func:`locate_nonfinite`)."""
    text = f"{what} ({loss_value}) at {where}: "
    if found["input"]:
        text += "the input batch itself holds NaN or infinity"
    elif found["layer"]:
        text += f"values first went non-finite in layer '{found['layer']}' ({found['layer_type']})"
    else:
        text += "every layer's output is finite; the loss itself overflowed"
    if found["parameters"]:
        names = found["parameters"]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        text += f"; non-finite parameters: {shown}"
    return text + ". Try a lower --lr, a warm-up (--warmup-epochs) or float64."

