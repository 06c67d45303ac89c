"""The CIFAR-10 networks of He et al. 2015 ("Deep Residual Learning for Image Recognition", section 4.2).

A 3x3 convolution with 16 filters, then three stages of ``n`` blocks each on
feature maps of 32x32, 16x16 and 8x8 with 16, 32 and 64 filters (the first block
of stages 2 and 3 strides by 2), then global average pooling and a fully
connected layer: ``6n + 2`` weighted layers.  n = 3, 5, 7, 9, 18 gives
resnet20/32/44/56/110 (0.27M, 0.46M, 0.66M, 0.85M and 1.7M parameters, the
paper's Table 6).

**Shortcuts** are identities.  Where a block halves the feature map and doubles
the channels, the paper's option A keeps the shortcut parameter-free:
:class:`ZeroPadShortcut` subsamples with stride 2 and appends zero channels.
The **plain** nets (plain20 .. plain110) are the same stacks without shortcuts.

Blocks use numres's :class:`~numres.models.resnet.BasicBlock` (with the option-A
shortcut as its ``downsample``) and run every ReLU fused into the BatchNorm before
it.  Convolutions get Kaiming-normal init (fan_out), as in :mod:`numres.models.resnet`.
``in_channels`` lets the same nets read 1-channel images (the embedded digits).
"""
from __future__ import annotations

from .. import init
from ..io import load_weights
from ..nn import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Linear, Module, ReLU, Sequential
from ..nn.fusion import conv_bn
from .identify import check_weights_fit
from .resnet import BasicBlock, conv3x3

__all__ = ["ZeroPadShortcut", "PlainBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "plain20", "plain32", "plain44", "plain56", "plain110", "CIFAR_MODELS"]


class ZeroPadShortcut(Module):
    """Option A shortcut: ``y[:, :C_in] = x[:, :, ::s, ::s]`` and ``y[:, C_in:] = 0``.

    Forward keeps every ``s``-th row and column (the top-left of each ``s x s`` window,
    as a stride-``s`` 1x1 convolution would) and pads with ``C_out - C_in`` zero channels
    at the end.  It has no parameters, so backward only routes the gradient back::

        dL/dx[:, :, ::s, ::s] = dL/dy[:, :C_in]      and 0 at every other position.
    """

    def __init__(self, in_channels, out_channels, stride=2, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        s = self.stride
        sub = x[:, :, ::s, ::s]
        y = self.xp.zeros((x.shape[0], self.out_channels) + sub.shape[2:], dtype=x.dtype)
        y[:, :self.in_channels] = sub
        self.save_for_backward(x.shape)
        return y

    def backward(self, grad_output):
        shape = self.saved_cache()
        s = self.stride
        dx = self.xp.zeros(shape, dtype=grad_output.dtype)
        dx[:, :, ::s, ::s] = grad_output[:, :self.in_channels]
        return dx

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class PlainBlock(BasicBlock):
    """A BasicBlock without its shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, inplanes, planes, stride=1, *, backend="numpy", dtype="float32"):
        super().__init__(inplanes, planes, stride, downsample=None, backend=backend, dtype=dtype)

    def forward(self, x):
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        return conv_bn(self.conv2, self.bn2, out, relu=True)

    def backward(self, grad_output):
        grad = self.bn2.backward(grad_output)
        grad = self.conv2.backward(grad)
        grad = self.bn1.backward(grad)
        return self.conv1.backward(grad)


class CifarResNet(Module):
    """``6n + 2`` layers: stem conv 16, stages of ``n`` blocks with 16/32/64 filters, average pool, fc.

    Takes ``(N, C, H, W)`` batches or one unbatched ``(C, H, W)`` image, as PyTorch models do."""

    accepts_unbatched = True

    def __init__(self, n, num_classes=10, in_channels=3, shortcuts=True, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if n < 1:
            raise ValueError(f"each stage needs at least one block, got n={n}")
        self._where = dict(backend=backend, dtype=dtype)
        self.shortcuts = shortcuts
        self.inplanes = 16
        self.conv1 = conv3x3(in_channels, 16, **self._where)
        self.bn1 = BatchNorm2d(16, **self._where)
        self.relu = ReLU(inplace=True, **self._where)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = AdaptiveAvgPool2d((1, 1), **self._where)
        self.fc = Linear(64, num_classes, **self._where)
        for module in self.modules():
            if isinstance(module, Conv2d):
                module.reset_weight(init.kaiming_normal(module.weight.shape, mode="fan_out"))

    def _make_layer(self, planes, blocks, stride=1):
        """One stage; its first block strides, and (with shortcuts) gets the option-A shortcut."""
        layers = []
        for index in range(blocks):
            block_stride = stride if index == 0 else 1
            if self.shortcuts:
                downsample = None
                if block_stride != 1 or self.inplanes != planes:
                    downsample = ZeroPadShortcut(self.inplanes, planes, block_stride, **self._where)
                layers.append(BasicBlock(self.inplanes, planes, block_stride, downsample, **self._where))
            else:
                layers.append(PlainBlock(self.inplanes, planes, block_stride, **self._where))
            self.inplanes = planes
        return Sequential(*layers)

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.conv1.in_channels)
        x = conv_bn(self.conv1, self.bn1, x, relu=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        self.save_for_backward(x.shape)
        return self.fc(x.reshape(x.shape[0], -1))

    def backward(self, grad_output, need_input_grad=True):
        """Backpropagate ``dL/dlogits``; returns ``dL/dx``, or None with ``need_input_grad=False``."""
        pooled_shape = self.saved_cache()
        grad = self.fc.backward(grad_output).reshape(pooled_shape)
        grad = self.avgpool.backward(grad)
        grad = self.layer1.backward(self.layer2.backward(self.layer3.backward(grad)))
        grad = self.bn1.backward(grad)
        return self.conv1.backward(grad, need_input_grad=need_input_grad)


def _builder(n, shortcuts, depth):
    kind = "ResNet" if shortcuts else "plain net"
    name = f"{'resnet' if shortcuts else 'plain'}{depth}"

    def build(*, weights=None, num_classes=None, in_channels=None, backend="numpy", dtype="float32"):
        state = None
        if weights is not None:         # the classes and channels come from the weights unless given
            state = load_weights(weights)
            check_weights_fit(state, name, hint="use numres.{name}(weights=...)")
            num_classes = num_classes or int(state["fc.weight"].shape[0])
            in_channels = in_channels or int(state["conv1.weight"].shape[1])
        model = CifarResNet(n, num_classes or 10, in_channels or 3, shortcuts, backend=backend, dtype=dtype)
        if state is not None:
            model.load_state_dict(state)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"The {depth}-layer CIFAR {kind} of He et al. 2015 (n = {n} blocks per stage).\n\n"
                     f"``weights``: a run folder or checkpoint of ``numres train``, a numres ``.npz`` or a ``.pth`` "
                     f"state dict; ``num_classes`` (default 10) and ``in_channels`` (default 3) are then read "
                     f"from it.")
    return build


resnet20, resnet32, resnet44, resnet56, resnet110 = (_builder(n, True, 6 * n + 2) for n in (3, 5, 7, 9, 18))
plain20, plain32, plain44, plain56, plain110 = (_builder(n, False, 6 * n + 2) for n in (3, 5, 7, 9, 18))

CIFAR_MODELS = {f.__name__: f for f in (resnet20, resnet32, resnet44, resnet56, resnet110,
                                         plain20, plain32, plain44, plain56, plain110)}
