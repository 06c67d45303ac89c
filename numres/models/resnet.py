"""The torchvision ResNet family, with hand-written backward passes.

Architecture, parameter names, initialisation and printed form follow torchvision's
``models/resnet.py`` (ResNet v1.5: a Bottleneck strides in its 3x3 convolution).
Each block's forward is followed by its backward, which replays the forward in
reverse.  At a residual join ``y = relu(F(x) + shortcut(x))`` the gradient
``dL/d(F(x) + shortcut(x))`` flows unchanged into *both* branches, and the two
input gradients add up: this ``+ 1`` in ``dy/dx = F'(x) + shortcut'(x)`` is what
keeps gradients alive in deep networks.

The blocks run their ReLUs fused into the preceding BatchNorm (``bn(x, relu=True)``);
the ``relu`` modules are kept so the printed architecture and the names match
torchvision, but the block applies them through the BatchNorm.  Each conv -> BatchNorm
step goes through :func:`numres.nn.fusion.conv_bn`, which in evaluation mode folds the
BatchNorm into the convolution (and the ReLU into its output pass); training runs them as written.
"""
from __future__ import annotations

from .. import init
from ..nn import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential
from ..nn.fusion import conv_bn, downsample_forward

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"]


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1, **where):
    """3x3 convolution with padding."""
    return Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                  dilation=dilation, **where)


def conv1x1(in_planes, out_planes, stride=1, **where):
    """1x1 convolution."""
    return Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False, **where)


class BasicBlock(Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        where = dict(backend=backend, dtype=dtype)
        self.conv1 = conv3x3(inplanes, planes, stride, **where)
        self.bn1 = BatchNorm2d(planes, **where)
        self.relu = ReLU(inplace=True, **where)
        self.conv2 = conv3x3(planes, planes, **where)
        self.bn2 = BatchNorm2d(planes, **where)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out)
        identity = x if self.downsample is None else downsample_forward(self.downsample, x)
        out = self.ops.add_relu_forward(out, identity)
        self.save_for_backward(out)
        return out

    def backward(self, grad_output):
        grad_sum = self.ops.relu_backward(grad_output, self.saved_cache())
        grad = self.bn2.backward(grad_sum)
        grad = self.conv2.backward(grad)
        grad = self.bn1.backward(grad)
        grad = self.conv1.backward(grad)
        grad_shortcut = grad_sum if self.downsample is None else self.downsample.backward(grad_sum)
        return self.ops.add(grad, grad_shortcut)


class Bottleneck(Module):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand, and a shortcut (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        where = dict(backend=backend, dtype=dtype)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width, **where)
        self.bn1 = BatchNorm2d(width, **where)
        self.conv2 = conv3x3(width, width, stride, groups, dilation, **where)
        self.bn2 = BatchNorm2d(width, **where)
        self.conv3 = conv1x1(width, planes * self.expansion, **where)
        self.bn3 = BatchNorm2d(planes * self.expansion, **where)
        self.relu = ReLU(inplace=True, **where)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = conv_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        out = conv_bn(self.conv3, self.bn3, out)
        identity = x if self.downsample is None else downsample_forward(self.downsample, x)
        out = self.ops.add_relu_forward(out, identity)
        self.save_for_backward(out)
        return out

    def backward(self, grad_output):
        grad_sum = self.ops.relu_backward(grad_output, self.saved_cache())
        grad = self.bn3.backward(grad_sum)
        grad = self.conv3.backward(grad)
        grad = self.bn2.backward(grad)
        grad = self.conv2.backward(grad)
        grad = self.bn1.backward(grad)
        grad = self.conv1.backward(grad)
        grad_shortcut = grad_sum if self.downsample is None else self.downsample.backward(grad_sum)
        return self.ops.add(grad, grad_shortcut)


class ResNet(Module):
    """torchvision's ResNet: a 7x7 stem, four stages of blocks, global average pooling and a classifier.

    Takes ``(N, 3, H, W)`` images, or one unbatched ``(3, H, W)`` image, as PyTorch's layers do: that
    runs as a batch of one and gives ``(num_classes,)`` logits, and backward then takes a
    ``(num_classes,)`` gradient and returns a ``(3, H, W)`` one.
    """

    accepts_unbatched = True

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        self._where = dict(backend=backend, dtype=dtype)
        where = self._where
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, got "
                             f"{replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False, **where)
        self.bn1 = BatchNorm2d(self.inplanes, **where)
        self.relu = ReLU(inplace=True, **where)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1, **where)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = AdaptiveAvgPool2d((1, 1), **where)
        self.fc = Linear(512 * block.expansion, num_classes, **where)

        for module in self.modules():
            if isinstance(module, Conv2d):
                module.reset_weight(init.kaiming_normal(module.weight.shape, mode="fan_out"))
        if zero_init_residual:
            for module in self.modules():
                last_bn = module.bn3 if isinstance(module, Bottleneck) else \
                    module.bn2 if isinstance(module, BasicBlock) else None
                if last_bn is not None:
                    last_bn.weight.data[...] = 0

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        """One stage; the only place that decides downsampling (a strided 1x1 conv + BN shortcut)."""
        where = self._where
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Sequential(conv1x1(self.inplanes, planes * block.expansion, stride, **where),
                                    BatchNorm2d(planes * block.expansion, **where))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        **where)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, **where))
        return Sequential(*layers)

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.conv1.in_channels)
        x = conv_bn(self.conv1, self.bn1, x, relu=True)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        pooled_shape = x.shape
        self.save_for_backward(pooled_shape)
        return self.fc(x.reshape(x.shape[0], -1))

    def backward(self, grad_output, need_input_grad=True):
        """Backpropagate ``dL/dlogits``; returns ``dL/dx``, or None with ``need_input_grad=False``
        (which skips the stem's largest GEMM)."""
        pooled_shape = self.saved_cache()
        grad = self.fc.backward(grad_output).reshape(pooled_shape)
        grad = self.avgpool.backward(grad)
        grad = self.layer4.backward(grad)
        grad = self.layer3.backward(grad)
        grad = self.layer2.backward(grad)
        grad = self.layer1.backward(grad)
        grad = self.maxpool.backward(grad)
        grad = self.bn1.backward(grad)
        return self.conv1.backward(grad, need_input_grad=need_input_grad)


def _resnet(name, block, layers, weights, **kwargs):
    if weights is not None:
        from ..io import load_weights
        from .identify import check_weights_fit
        state = load_weights(weights)
        check_weights_fit(state, name, hint="use numres.{name}(weights=...)")
        kwargs.setdefault("num_classes", int(state["fc.weight"].shape[0]))
        model = ResNet(block, layers, **kwargs)
        model.load_state_dict(state)
        return model
    return ResNet(block, layers, **kwargs)


def resnet18(*, weights=None, **kwargs):
    """ResNet-18 (11.7M parameters)."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, **kwargs)


def resnet34(*, weights=None, **kwargs):
    """ResNet-34 (21.8M parameters)."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, **kwargs)


def resnet50(*, weights=None, **kwargs):
    """ResNet-50 (25.6M parameters)."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def resnet101(*, weights=None, **kwargs):
    """ResNet-101 (44.5M parameters)."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def resnet152(*, weights=None, **kwargs):
    """ResNet-152 (60.2M parameters)."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, **kwargs)


def resnext50_32x4d(*, weights=None, **kwargs):
    """ResNeXt-50 32x4d: 32 groups of width 4 in each 3x3 convolution."""
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(*, weights=None, **kwargs):
    """ResNeXt-101 32x8d."""
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, groups=32, width_per_group=8, **kwargs)


def wide_resnet50_2(*, weights=None, **kwargs):
    """Wide ResNet-50-2: Bottleneck width doubled."""
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, width_per_group=128, **kwargs)


def wide_resnet101_2(*, weights=None, **kwargs):
    """Wide ResNet-101-2."""
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, width_per_group=128, **kwargs)
