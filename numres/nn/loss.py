"""CrossEntropyLoss as a stateful criterion: ``loss = crit(logits, target); dlogits = crit.backward()``."""
from __future__ import annotations

import numpy as np

from .. import backend as B
from ..functional.loss import REDUCTIONS
from .module import Module


class CrossEntropyLoss(Module):
    """Softmax cross-entropy on ``(N, C)`` logits and integer class targets ``(N,)``.

    On the NumPy backend the targets are range-checked and a non-finite loss raises
    :class:`FloatingPointError`.  On a GPU those checks would need a device-to-host copy,
    so they are skipped there; a training loop that reads the loss checks it then.
    """

    def __init__(self, reduction="mean", label_smoothing=0.0, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.reduction, self.label_smoothing = reduction, float(label_smoothing)

    def forward(self, logits, target):
        xp = B.xp_of(logits)
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss expects logits of shape (N, C), got {tuple(logits.shape)}")
        if not isinstance(target, xp.ndarray):
            raise TypeError(f"CrossEntropyLoss expects target on the same backend as the logits "
                            f"({type(logits).__module__}), got {type(target).__module__}.{type(target).__name__}")
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"CrossEntropyLoss expects integer class indices as target, got dtype {target.dtype}")
        if target.shape != (logits.shape[0],):
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
                             f"expected ({logits.shape[0]},)")
        host_checks = B.backend_of(logits) == "numpy"
        classes = logits.shape[1]
        if host_checks and target.size and (target.min() < 0 or target.max() >= classes):
            bad = target[(target < 0) | (target >= classes)]
            raise IndexError(f"target label {int(bad[0])} is out of range for {classes} classes")
        loss, cache = self.ops.cross_entropy_forward(logits, target, self.reduction, self.label_smoothing)
        loss = xp.asarray(loss)                       # a 0-d array (NumPy reductions give scalars)
        if host_checks and not np.all(np.isfinite(loss)):
            raise FloatingPointError(f"CrossEntropyLoss is not finite ({loss if loss.ndim == 0 else 'some rows'}): "
                                     "the logits contain NaN or infinity")
        self.save_for_backward(cache)
        return loss

    def backward(self, grad_output=None):
        """``dlogits``; ``grad_output`` defaults to 1 (the loss itself is the objective).

        With ``reduction="none"`` the loss is a vector, and, as in PyTorch, its gradient must be given.
        """
        cache = self.saved_cache()
        if grad_output is None:
            if self.reduction == "none":
                raise RuntimeError("CrossEntropyLoss(reduction='none') returns one loss per sample: "
                                   "backward() needs their gradient, an (N,) array")
            grad_output = 1.0
        return self.ops.cross_entropy_backward(grad_output, cache)

    def extra_repr(self):
        return ""
