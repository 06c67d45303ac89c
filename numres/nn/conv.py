"""Conv2d: a thin stateful wrapper over :mod:`numres.functional.conv`."""
from __future__ import annotations

from .. import backend as B
from .. import init
from ..functional import conv as F
from .module import Module, Parameter


class Conv2d(Module):
    """2-D convolution with PyTorch's arguments and defaults.

    ``weight`` has PyTorch's shape ``(out_channels, in_channels/groups, kh, kw)`` but is
    stored as ``(kh, kw, in/groups, out)``, so the GEMM in forward and backward reads it
    with no copy.  ``backward(dy, need_input_grad=False)`` skips dL/dx (and returns None),
    which saves the largest GEMM of a network's first layer.
    """

    accepts_unbatched = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={padding_mode!r}: only 'zeros' is supported")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = F.pair(kernel_size, "kernel_size")
        self.stride, self.dilation = F.pair(stride, "stride"), F.pair(dilation, "dilation")
        if padding == "valid":
            padding = 0
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if self.stride != (1, 1) or any(t % 2 for t in total):
                raise NotImplementedError("padding='same' is supported for stride 1 with an even total padding")
            padding = tuple(t // 2 for t in total)
        self.padding = F.pair(padding, "padding")

        shape = (out_channels, in_channels // groups, *self.kernel_size)
        fan_in = init.fans(shape)[0]
        self.weight = Parameter(self._layout_weight(init.default_uniform(shape, fan_in)))
        self.bias = Parameter(B.asarray(init.default_uniform((out_channels,), fan_in), backend, self.dtype)) \
            if bias else None

    def _layout_weight(self, values):
        """Store PyTorch-shaped ``values`` as (kh, kw, in/groups, out) and return the PyTorch-shaped view."""
        stored = B.asarray(values.transpose(2, 3, 1, 0), self.backend, self.dtype)
        return self.xp.ascontiguousarray(stored).transpose(3, 2, 0, 1)

    def reset_weight(self, values):
        """Replace the weight by ``values`` (PyTorch shape, host array), keeping the GEMM-friendly layout."""
        self.weight.data = self._layout_weight(values)

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        y, cache = self.ops.conv2d_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                                    self.stride, self.padding, self.dilation, self.groups)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output, need_input_grad=True):
        dx, dweight, dbias = self.ops.conv2d_backward(grad_output, self.saved_cache(), need_input_grad)
        self.weight.accumulate_grad(dweight)
        if self.bias is not None:
            self.bias.accumulate_grad(dbias)
        return dx

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text
