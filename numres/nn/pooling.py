"""Pooling modules over :mod:`numres.functional.pooling`."""
from __future__ import annotations

from .module import Module


class MaxPool2d(Module):
    """Max over each window; padding counts as -inf; the gradient goes to the first maximum."""

    accepts_unbatched = True

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False,
                 *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if return_indices:
            raise NotImplementedError("MaxPool2d(return_indices=True) is not supported")
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    def forward(self, x):
        self.check_input(x, ndim=4)
        y, cache = self.ops.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.maxpool2d_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """Mean over each window; padding counts towards the divisor unless ``count_include_pad=False``."""

    accepts_unbatched = True

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        self.check_input(x, ndim=4)
        y, cache = self.ops.avgpool2d_forward(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                       self.count_include_pad, self.divisor_override)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.avgpool2d_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average over PyTorch's adaptive bins, giving ``output_size`` whatever the input size."""

    accepts_unbatched = True

    def __init__(self, output_size, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.output_size = output_size

    def forward(self, x):
        self.check_input(x, ndim=4)
        y, cache = self.ops.adaptive_avgpool2d_forward(x, self.output_size)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.adaptive_avgpool2d_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return f"output_size={self.output_size}"
