"""Pooling modules over :mod:`numres.functional.pooling`."""
from __future__ import annotations

from ..functional.conv import pair
from ..functional.pooling import is_default_stride
from .module import Module


def _check_window(kernel_size, stride, padding, dilation=1):
    """Refuse impossible window arguments when the layer is built, with PyTorch's rules."""
    pair(kernel_size, "kernel_size", minimum=1)
    if not is_default_stride(stride):
        pair(stride, "stride", minimum=1)
    pair(padding, "padding")
    pair(dilation, "dilation", minimum=1)


def _stride(pool):
    """The pool's stride for the ops: ``stride=()`` is kept as given (PyTorch prints it so) and means the kernel size."""
    return pool.kernel_size if is_default_stride(pool.stride) else pool.stride


class MaxPool2d(Module):
    """Max over each window; padding counts as -inf; the gradient goes to the first maximum.

    With ``return_indices=True`` forward returns ``(y, indices)``: for each output, the flat
    position ``h * W + w`` of its maximum in the input plane (int64), which
    :class:`MaxUnpool2d` takes.  Backward still takes the gradient of ``y`` alone.
    """

    accepts_unbatched = True

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False,
                 *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        _check_window(kernel_size, stride, padding, dilation)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), ceil_mode

    def forward(self, x):
        self.check_input(x, ndim=4)
        arguments = (x, self.kernel_size, _stride(self), self.padding, self.dilation, self.ceil_mode)
        if self.return_indices:
            (y, indices), cache = self.ops.maxpool2d_forward(*arguments, return_indices=True)
            self.save_for_backward(cache)
            return y, indices
        y, cache = self.ops.maxpool2d_forward(*arguments)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.maxpool2d_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class MaxUnpool2d(Module):
    """A partial inverse of :class:`MaxPool2d`: puts each input value at the place its index names
    and zeros everywhere else.  ``forward(x, indices, output_size=None)``; ``output_size`` ((H, W) or
    (N, C, H, W)) picks among the sizes a pooling could have come from.  Backward returns the
    gradient of ``x`` (indices have none).
    """

    accepts_unbatched = True

    def __init__(self, kernel_size, stride=None, padding=0, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride if stride is not None else kernel_size, "stride", minimum=1)
        self.padding = pair(padding, "padding")

    def forward(self, x, indices, output_size=None):
        self.check_input(x, ndim=4)
        if not isinstance(indices, self.xp.ndarray):
            raise TypeError(f"MaxUnpool2d is on backend {self.backend!r} and expects indices as a "
                            f"{self.xp.ndarray.__module__}.ndarray, got {type(indices).__name__}")
        if self.__dict__.get("_unbatched") and indices.ndim == 3:
            indices = indices[None]      # unbatched indices given by keyword (__call__ batches positional ones)
        y, cache = self.ops.maxunpool2d_forward(x, indices, self.kernel_size, self.stride, self.padding,
                                                output_size)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        return self.ops.maxunpool2d_backward(grad_output, self.saved_cache())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Mean over each window; padding counts towards the divisor unless ``count_include_pad=False``."""

    accepts_unbatched = True

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        _check_window(kernel_size, stride, padding)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        self.check_input(x, ndim=4)
        y, cache = self.ops.avgpool2d_forward(x, self.kernel_size, _stride(self), self.padding, self.ceil_mode,
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
