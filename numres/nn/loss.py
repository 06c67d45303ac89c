"""CrossEntropyLoss as a stateful criterion: ``loss = crit(logits, target); dlogits = crit.backward()``."""
from __future__ import annotations

import numpy as np

from .. import backend as B
from ..functional.loss import REDUCTIONS, is_probability_target
from .module import Module


def _legacy_reduction(size_average, reduce, reduction):
    """PyTorch's deprecated ``size_average``/``reduce`` pair, when given, decides the reduction."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


class CrossEntropyLoss(Module):
    """Softmax cross-entropy with PyTorch's arguments, defaults and definitions
    (see :mod:`numres.functional.loss` for the math).

    * logits ``(N, C)``, ``(N, C, d1, ...)`` (per-pixel losses) or unbatched ``(C,)``;
    * target: integer class indices of the logits' shape without the class axis, or floating class
      probabilities of the logits' own shape;
    * ``weight``: a per-class weight ``(C,)``, kept as a buffer (it is in the state dict, as in
      PyTorch); ``ignore_index``: a class-index target with this value adds nothing and is not counted;
    * ``reduction``: "mean" (divided by the total weight of the counted targets), "sum" or "none";
    * ``label_smoothing`` in [0, 1].

    On the NumPy backend the targets are range-checked and a non-finite loss raises
    :class:`FloatingPointError` (except the NaN that PyTorch also gives for the mean over nothing:
    an empty batch, or every target ignored).  On a GPU those checks would need a device-to-host
    copy, so they are skipped there; a training loop that reads the loss checks it then.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        reduction = _legacy_reduction(size_average, reduce, reduction)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.reduction, self.label_smoothing, self.ignore_index = reduction, float(label_smoothing), int(ignore_index)
        if weight is not None:
            weight = B.asarray(weight, backend, self.dtype).copy()
            if weight.ndim != 1:
                raise ValueError(f"CrossEntropyLoss weight must be a 1-D array with one value per class, "
                                 f"got shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight)

    def _check(self, logits, target):
        xp = B.xp_of(logits)
        if not isinstance(logits, self.xp.ndarray):
            raise TypeError(f"CrossEntropyLoss is on backend {self.backend!r} and expects a "
                            f"{self.xp.ndarray.__module__}.ndarray of logits, got {type(logits).__module__}."
                            f"{type(logits).__name__}")
        if logits.dtype.kind != "f":
            raise TypeError(f"CrossEntropyLoss expects floating-point logits, got dtype {logits.dtype}")
        if logits.ndim < 1:
            raise ValueError(f"CrossEntropyLoss expects logits of shape (N, C), (N, C, d1, ...) or (C,), "
                             f"got shape {tuple(logits.shape)}")
        if not isinstance(target, xp.ndarray):
            raise TypeError(f"CrossEntropyLoss expects target on the same backend as the logits "
                            f"({type(logits).__module__}), got {type(target).__module__}.{type(target).__name__}")
        classes = logits.shape[1] if logits.ndim >= 2 else logits.shape[0]
        sample_shape = logits.shape[:1] + logits.shape[2:] if logits.ndim >= 2 else ()
        if target.dtype.kind == "f":
            if not is_probability_target(logits, target):
                raise TypeError(
                    f"CrossEntropyLoss expects integer class indices of shape {sample_shape} or class probabilities "
                    f"of the logits' shape {tuple(logits.shape)} as target, got dtype {target.dtype} and shape "
                    f"{tuple(target.shape)}")
        elif target.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss expects integer class indices as target, got dtype {target.dtype}")
        elif tuple(target.shape) != sample_shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
                             f"expected {sample_shape}")
        if self.weight is not None and tuple(self.weight.shape) != (classes,):
            raise ValueError(f"CrossEntropyLoss weight has {self.weight.shape[0]} values but the logits have "
                             f"{classes} classes")
        host_checks = B.backend_of(logits) == "numpy"
        if host_checks and target.dtype.kind in "iu" and target.size:
            bad = target[((target < 0) | (target >= classes)) & (target != self.ignore_index)]
            if bad.size:
                raise IndexError(f"target label {int(bad[0])} is out of range for {classes} classes "
                                 f"(and is not ignore_index={self.ignore_index})")
        return host_checks

    def forward(self, logits, target):
        host_checks = self._check(logits, target)
        loss, cache = self.ops.cross_entropy_forward(logits, target, self.reduction, self.label_smoothing,
                                                     weight=self.weight, ignore_index=self.ignore_index)
        loss = B.xp_of(logits).asarray(loss)              # a 0-d array (NumPy reductions give scalars)
        if host_checks and not np.all(np.isfinite(loss)):
            # A mean over no target (every one ignored) is NaN, as in PyTorch; only bad logits are an error.
            if not bool(B.xp_of(logits).isfinite(logits).all()):
                raise FloatingPointError(f"CrossEntropyLoss is not finite ({loss if loss.ndim == 0 else 'some rows'}): "
                                         "the logits contain NaN or infinity")
        self.save_for_backward(cache)
        return loss

    def backward(self, grad_output=None):
        """``dlogits``; ``grad_output`` defaults to 1 (the loss itself is the objective).

        With ``reduction="none"`` the loss is an array, and, as in PyTorch, its gradient must be given.
        """
        cache = self.saved_cache()
        if grad_output is None:
            if self.reduction == "none":
                raise RuntimeError("CrossEntropyLoss(reduction='none') returns one loss per sample: "
                                   "backward() needs their gradient, an array of the loss's shape")
            grad_output = 1.0
        return self.ops.cross_entropy_backward(grad_output, cache)

    def extra_repr(self):
        return ""


class MSELoss(Module):
    """Mean squared error with PyTorch's arguments and definitions:
    ``loss_i = (input_i - target_i)^2``, then the mean (``reduction="mean"``, the default), the sum
    (``"sum"``) or nothing (``"none"``: the elementwise losses, of the input's shape).

    Backward returns ``dL/dinput = 2 (input - target) * g`` (divided by the number of elements for the
    mean), with ``g`` the upstream gradient: 1 by default for a reduced loss, an array of the input's
    shape for ``"none"``.

    ``input`` and ``target`` are floating arrays of one shape, dtype and backend; PyTorch broadcasts a
    different target shape with a warning, numres refuses it.  On the NumPy backend a non-finite loss
    raises :class:`FloatingPointError`.
    """

    def __init__(self, size_average=None, reduce=None, reduction="mean", *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        reduction = _legacy_reduction(size_average, reduce, reduction)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, input, target):
        if not isinstance(input, self.xp.ndarray):
            raise TypeError(f"MSELoss is on backend {self.backend!r} and expects a {self.xp.ndarray.__module__}"
                            f".ndarray input, got {type(input).__module__}.{type(input).__name__}")
        if not isinstance(target, type(input)):
            raise TypeError(f"MSELoss expects target on the input's backend ({type(input).__module__}), got "
                            f"{type(target).__module__}.{type(target).__name__}")
        if input.dtype.kind != "f" or target.dtype != input.dtype:
            raise TypeError(f"MSELoss expects floating input and target of one dtype, got {input.dtype} and "
                            f"{target.dtype}")
        if tuple(input.shape) != tuple(target.shape):
            raise ValueError(f"MSELoss: target shape {tuple(target.shape)} differs from input shape "
                             f"{tuple(input.shape)} (numres does not broadcast them)")
        xp = B.xp_of(input)
        diff = input - target
        squared = diff * diff
        if self.reduction == "mean":
            loss = xp.asarray(squared.mean())
        elif self.reduction == "sum":
            loss = xp.asarray(squared.sum())
        else:
            loss = squared
        if B.backend_of(input) == "numpy" and input.size and not np.all(np.isfinite(loss)):
            raise FloatingPointError("MSELoss is not finite: the input or target contains NaN or infinity")
        self.save_for_backward((diff, input.size))
        return loss

    def backward(self, grad_output=None):
        """``dL/dinput``; ``grad_output`` defaults to 1 for a reduced loss and must be given for ``"none"``."""
        diff, count = self.saved_cache()
        if grad_output is None:
            if self.reduction == "none":
                raise RuntimeError("MSELoss(reduction='none') returns one loss per element: backward() needs "
                                   "their gradient, an array of the input's shape")
            grad_output = 1.0
        scale = 2.0 / max(count, 1) if self.reduction == "mean" else 2.0
        grad = diff * grad_output
        grad *= diff.dtype.type(scale)
        return grad

    def extra_repr(self):
        return ""
