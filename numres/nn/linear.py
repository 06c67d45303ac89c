"""Linear (fully connected) layer."""
from __future__ import annotations

from .. import backend as B
from .. import init
from .module import Module, Parameter


class Linear(Module):
    """``y = x @ weight.T + bias`` on inputs of shape ``(..., in_features)``; PyTorch's default init.

    A frozen weight (``requires_grad = False``) gets no gradient and its GEMM is skipped in backward.
    """

    def __init__(self, in_features, out_features, bias=True, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(B.asarray(init.default_uniform((out_features, in_features), in_features),
                                          backend, self.dtype))
        self.bias = Parameter(B.asarray(init.default_uniform((out_features,), in_features), backend, self.dtype)) \
            if bias else None

    def forward(self, x):
        self.check_input(x, ndim=None)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs whose last dimension is in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        y, cache = self.ops.linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)
        self.save_for_backward(cache)
        return y

    def backward(self, grad_output):
        dx, dweight, dbias = self.ops.linear_backward(grad_output, self.saved_cache(),
                                                      need_weight_grad=self.weight.requires_grad)
        self.weight.accumulate_grad(dweight)
        if self.bias is not None:
            self.bias.accumulate_grad(dbias)
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
