"""A PyTorch ResNet with torchvision's structure: the oracle numres is checked against.

torchvision cannot be installed here, so this file rebuilds its ``models/resnet.py``
architecture from ``torch.nn`` modules: the same attribute names and order (hence the
same ``state_dict`` keys and the same printed text), ResNet v1.5 (the Bottleneck strides
in its 3x3 convolution), ResNeXt groups, wide blocks and dilation instead of stride.
Autograd provides every gradient, so nothing here shares code or logic with numres.
The helpers at the end (``rel_err``, ``model_parity``) compare a numres model with it;
the tests and ``benchmarks/parity_resnet50.py`` share them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import numres

import error_measure


def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.groups, self.base_width = groups, width_per_group
        dilate = replace_stride_with_dilation or [False, False, False]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0])
        self.layer2 = self._stage(block, 128, layers[1], 2, dilate[0])
        self.layer3 = self._stage(block, 256, layers[2], 2, dilate[1])
        self.layer4 = self._stage(block, 512, layers[3], 2, dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _stage(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                        dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}),
}


def build(name, **kwargs):
    """The reference model called ``name`` (a torchvision builder name)."""
    block, layers, extra = ARCHS[name]
    return ResNet(block, layers, **{**extra, **kwargs})


def classic_repr(module) -> str:
    """``str(module)`` in PyTorch's classic format: without the ``bias=`` field newer torch adds to BatchNorm2d."""
    return str(module).replace(", bias=True, track_running_stats", ", track_running_stats")


# --- comparing a numres model with its reference ------------------------------------------------------

def rel_err(actual, expected, *, allow_matching_inf=False) -> float:
    """``max|actual - expected| / max|expected|`` over one tensor (0 when both are all zeros).

    ``expected`` is the reference (PyTorch).  Either may be a numres array (any backend) or a
    torch tensor.  Shapes must agree exactly (never broadcast).  Any NaN or infinity, on either
    side or on both, gives ``inf`` (a failure that ``max()`` cannot drop); the one exception,
    opted into with ``allow_matching_inf=True``, is identical infinities on both sides (a max-pool
    window lying wholly in padding gives -inf).  See tests/error_measure.py, the shared measure.
    """
    return error_measure.rel_err(_host(actual), _host(expected), allow_matching_inf=allow_matching_inf)


def _host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return numres.backend.to_numpy(value)


def load_numres_state(torch_model, nr_model):
    """Copy every parameter and buffer of the numres model into the reference (strict, by name)."""
    state = {k: torch.from_numpy(np.array(_host(v))) for k, v in nr_model.state_dict().items()}
    dtype = next(torch_model.parameters()).dtype
    torch_model.load_state_dict({k: v if v.dtype == torch.int64 else v.to(dtype) for k, v in state.items()})


def randomize_batchnorms(nr_model, seed=0):
    """Non-trivial BN affine parameters and running statistics (not 1/0), so no check passes by luck."""
    rng = np.random.default_rng(seed)
    for module in nr_model.modules():
        if isinstance(module, numres.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data[...] = rng.uniform(0.5, 1.5, c)
            module.bias.data[...] = 0.1 * rng.standard_normal(c)
            module.running_mean[...] = 0.1 * rng.standard_normal(c)
            module.running_var[...] = rng.uniform(0.5, 2.0, c)
            module.num_batches_tracked[...] = 5


def torch_pass(torch_model, x, upstream) -> dict:
    """One forward and backward of the reference in its current mode; every result as a host array.

    ``x`` and ``upstream`` (dL/dlogits) are host arrays, cast to the model's dtype.
    """
    dtype = next(torch_model.parameters()).dtype
    torch_model.zero_grad()
    x_t = torch.from_numpy(np.array(x, order="C")).to(dtype).requires_grad_(True)
    logits = torch_model(x_t)
    logits.backward(torch.from_numpy(np.array(upstream)).to(dtype))
    return {"logits": _host(logits), "input_grad": _host(x_t.grad),
            "param_grads": {k: _host(p.grad) for k, p in torch_model.named_parameters()},
            "buffers": {k: _host(b).copy() for k, b in torch_model.named_buffers()}}


def numres_pass(nr_model, x, upstream, after_forward=None) -> dict:
    """The same for a numres model; ``x`` keeps its memory layout (a channels-last view stays one).

    ``after_forward(nr_model)``, if given, runs between forward and backward (to check what the
    forward left in the caches, e.g. that BatchNorm folded)."""
    nr_model.zero_grad()
    convert = numres.backend.convert
    logits = nr_model(convert(x, nr_model.backend, nr_model.dtype))
    if after_forward is not None:
        after_forward(nr_model)
    dx = nr_model.backward(convert(upstream, nr_model.backend, nr_model.dtype))
    return {"logits": _host(logits), "input_grad": _host(dx),
            "param_grads": {k: _host(p.grad) for k, p in nr_model.named_parameters()},
            "buffers": {k: _host(b).copy() for k, b in nr_model.named_buffers()}}


def compare_passes(result, reference) -> dict:
    """``{tensor: rel_err}`` for logits, input gradient, each parameter gradient and each float buffer.

    Integer buffers (num_batches_tracked) must be equal; a missing or extra name is an error.
    """
    for group in ("param_grads", "buffers"):
        if list(result[group]) != list(reference[group]):
            raise AssertionError(f"{group} names differ: {sorted(set(result[group]) ^ set(reference[group]))}")
    errors = {"logits": rel_err(result["logits"], reference["logits"]),
              "input gradient": rel_err(result["input_grad"], reference["input_grad"])}
    errors.update({f"grad {k}": rel_err(v, reference["param_grads"][k]) for k, v in result["param_grads"].items()})
    for name, value in result["buffers"].items():
        expected = reference["buffers"][name]
        if np.issubdtype(expected.dtype, np.integer):
            if not np.array_equal(value, expected):
                raise AssertionError(f"buffer {name}: numres {value} vs reference {expected}")
        else:
            errors[f"buffer {name}"] = rel_err(value, expected)
    return errors


def model_parity(nr_model, torch_model, x, upstream, after_forward=None) -> dict:
    """Errors of one numres forward/backward against the reference (both holding equal weights)."""
    return compare_passes(numres_pass(nr_model, x, upstream, after_forward), torch_pass(torch_model, x, upstream))
