"""BatchNorm2d: a stateful wrapper over :mod:`numres.functional.batchnorm`."""
from __future__ import annotations

import numpy as np

from ..functional.batchnorm import BatchNormCache
from .module import Module, Parameter, parameters_changed


class BatchNorm2d(Module):
    """Per-channel batch normalisation with PyTorch's arguments, buffers and update rule.

    ``bn(x, relu=True)`` applies a ReLU in the same pass (and its mask in backward);
    the residual blocks use it for their conv-BN-ReLU steps.

    ``bias=False`` (PyTorch 2.13, keyword-only) keeps the learnable weight and drops the bias;
    ``affine=False`` has neither.  An empty batch (N = 0) gives an empty output; in training mode
    it still counts in ``num_batches_tracked`` but leaves the running statistics alone, as in PyTorch.
    When every parameter is frozen (``requires_grad = False``), backward skips their reductions
    where ``dx`` does not need them (evaluation mode).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 *, bias=True, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.has_bias = bool(affine and bias)
        xp = self.xp
        if affine:
            self.weight = Parameter(xp.ones(num_features, dtype=self.dtype))
            self.bias = Parameter(xp.zeros(num_features, dtype=self.dtype)) if self.has_bias else None
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", xp.zeros(num_features, dtype=self.dtype))
            self.register_buffer("running_var", xp.ones(num_features, dtype=self.dtype))
            self.register_buffer("num_batches_tracked", xp.zeros((), dtype=np.int64))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0
            parameters_changed()

    def forward(self, x, relu=False):
        self.check_input(x, ndim=4, channels=self.num_features)
        weight = None if self.weight is None else self.weight.data
        bias = None if self.bias is None else self.bias.data
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            # Refused before num_batches_tracked counts the batch (PyTorch counts it, then refuses).
            raise ValueError(f"BatchNorm2d in training mode needs more than 1 value per channel, got input of "
                             f"shape {tuple(x.shape)}")
        if self.training or self.running_mean is None:
            momentum = self.momentum
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                if momentum is None:              # cumulative moving average
                    momentum = 1.0 / self.num_batches_tracked
            update = self.training and self.track_running_stats
            y, cache = self.ops.batchnorm_train_forward(x, weight, bias, self.running_mean if update else None,
                                                 self.running_var if update else None, momentum, self.eps, relu)
        else:
            y, cache = self.ops.batchnorm_eval_forward(x, weight, bias, self.running_mean, self.running_var, self.eps, relu)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        cache = self.saved_cache()
        if getattr(cache, "folded_into_conv", False):
            # Folded into the convolution before it (numres.nn.fusion): only the ReLU mask is left here;
            # that convolution's backward gives this layer's parameter gradients.
            return self.ops.relu_backward(grad_output, cache.output) if cache.relu else grad_output
        learning = [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]
        if not learning and isinstance(cache, BatchNormCache):
            # Frozen (or no) parameters: only dx.  (A GPU kernel's cache gets its fused pass, which
            # yields the sums anyway.)
            dx, _, _ = self.ops.batchnorm_backward(grad_output, cache, need_param_grads=False)
            return dx
        dx, dweight, dbias = self.ops.batchnorm_backward(grad_output, cache)
        if self.weight is not None:
            self.weight.accumulate_grad(dweight)
        if self.bias is not None:
            self.bias.accumulate_grad(dbias)
        return dx

    def extra_repr(self):
        # PyTorch 2.13 prints "bias=<has a bias>" always; numres keeps the classic format when there
        # is a bias (the text torchvision's models print) and shows the field only when it is False
        # (bias=False or affine=False), exactly as PyTorch 2.13 prints it then.
        bias = "" if self.bias is not None else ", bias=False"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}{bias}, "
                f"track_running_stats={self.track_running_stats}")


