"""Conv2d: a thin stateful wrapper over :mod:`numres.functional.conv` (im2col) and, for 3x3
stride-1 layers, :mod:`numres.functional.winograd`, as :func:`numres.functional.set_conv_algorithm` chooses."""
from __future__ import annotations

import functools

from .. import backend as B
from .. import init
from ..functional.geometry import pair
from ..functional.padding import PADDING_MODES, conv_padding
from ..functional.fused import FoldedConvCache, folded_conv_bn_backward
from ..config import is_reference_mode
from ..functional import conv_algorithms
from .module import Module, Parameter


class Conv2d(Module):
    """2-D convolution with PyTorch's arguments and defaults.

    ``weight`` has PyTorch's shape ``(out_channels, in_channels/groups, kh, kw)`` but is
    stored as ``(kh, kw, in/groups, out)``, so the GEMM in forward and backward reads it
    with no copy.  ``backward(dy, need_input_grad=False)`` skips dL/dx (and returns None),
    which saves the largest GEMM of a network's first layer; a frozen weight
    (``requires_grad = False``) skips the weight-gradient GEMM.

    ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` (an odd total puts the extra
    row/column at the bottom/right, as PyTorch does); ``padding_mode`` is ``"zeros"``,
    ``"reflect"``, ``"replicate"`` or ``"circular"``.
    """

    accepts_unbatched = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.padding_mode = padding_mode
        # PyTorch keeps "same" / "valid" as given, and numbers as a pair.
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding")
        self._plain_padding()                  # checks the padding now ("same" needs stride 1)

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

    def _plain_padding(self):
        """The padding as a plain (ph, pw) pair when it is symmetric zero padding (the common case), else None."""
        (top, bottom), (left, right) = conv_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        plain = self.padding_mode == "zeros" and top == bottom and left == right
        return (top, left) if plain else None

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        weight, bias = self.weight.data, None if self.bias is None else self.bias.data
        plain_padding = self._plain_padding()
        if is_reference_mode():         # the textbook convolution, whatever the algorithm setting
            padding = plain_padding if plain_padding is not None else \
                conv_padding(self.padding, self.kernel_size, self.stride, self.dilation)
            y, cache = self.ops.conv2d_forward(x, weight, bias, self.stride, padding, self.dilation, self.groups,
                                               padding_mode=self.padding_mode)
        elif plain_padding is not None:
            y, cache = conv_algorithms.conv2d_forward(x, weight, bias, self.stride, plain_padding, self.dilation,
                                                      self.groups, ops=self.ops)
        else:   # "same" with an odd total, or a non-zero padding mode: padded explicitly first
            y, cache = conv_algorithms.conv2d_forward(x, weight, bias, self.stride, self.padding, self.dilation,
                                                      self.groups, padding_mode=self.padding_mode, ops=self.ops)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output, need_input_grad=True):
        """dL/dx; accumulates the gradients of the weight and bias, skipping the GEMM of a frozen weight."""
        cache = self.saved_cache()
        if isinstance(cache, FoldedConvCache):
            return self._folded_backward(grad_output, need_input_grad)
        dx, dweight, dbias = conv_algorithms.conv2d_backward(
            grad_output, cache, need_input_grad, need_weight_grad=self.weight.requires_grad,
            need_bias_grad=self.bias is not None and self.bias.requires_grad, ops=self.ops)
        self.weight.accumulate_grad(dweight)
        if self.bias is not None:
            self.bias.accumulate_grad(dbias)
        return dx

    def _folded_backward(self, grad_output, need_input_grad):
        """Backward of a forward that ran with the next BatchNorm folded in (:mod:`numres.nn.fusion`):
        accumulates this layer's gradients and the BatchNorm's, whose backward applied only the ReLU mask."""
        cache = self.saved_cache()
        bn_params = [p for p in (cache.bn_weight, cache.bn_bias) if p is not None]
        conv_params = [p for p in (self.weight, self.bias) if p is not None]
        dx, dweight, dbias, dbn_weight, dbn_bias = folded_conv_bn_backward(
            grad_output, cache, functools.partial(conv_algorithms.conv2d_backward, ops=self.ops),
            need_input_grad, need_conv_grads=any(p.requires_grad for p in conv_params),
            need_bn_grads=any(p.requires_grad for p in bn_params))
        self.weight.accumulate_grad(dweight)
        if self.bias is not None:
            self.bias.accumulate_grad(dbias)
        if cache.bn_weight is not None:
            cache.bn_weight.accumulate_grad(dbn_weight)
        if cache.bn_bias is not None:
            cache.bn_bias.accumulate_grad(dbn_bias)
        return dx

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"      # "same" / "valid" print bare, as in PyTorch
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text
