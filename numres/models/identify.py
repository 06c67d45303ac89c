"""Which architecture a state dict holds, read from its keys and shapes alone.

A torchvision ResNet's state dict spells out its architecture: the number of blocks in
each stage is the number of distinct ``layerS.B`` prefixes, a ``conv3`` means Bottleneck
blocks, and the first Bottleneck's 3x3 convolution, of shape ``(width, width / groups, 3, 3)``,
gives the groups and the width per group (ResNeXt, Wide ResNet).  The paper's CIFAR nets
have three stages of 16, 32 and 64 channels and no ``layer4``.  Only the parameters and
buffers are needed, so a wrong ``--model`` is caught before any model is built.
"""
from __future__ import annotations

import re
from typing import NamedTuple


class Architecture(NamedTuple):
    name: str | None          # builder name, or None when no builder makes this shape
    description: str          # what was seen, in words, for error messages
    num_classes: int
    parameters: int           # learnable parameters (buffers not counted), as torch counts them


# (block kind, blocks per stage, groups, width per group) -> builder name
_IMAGENET = {
    ("basic", (2, 2, 2, 2), 1, 64): "resnet18",
    ("basic", (3, 4, 6, 3), 1, 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _shape(value) -> tuple:
    return tuple(getattr(value, "shape", ()))


def _count_parameters(state) -> int:
    total = 0
    for key, value in state.items():
        if not key.endswith(_BUFFER_SUFFIXES):
            size = 1
            for n in _shape(value):
                size *= int(n)
            total += size
    return total


def identify(state) -> Architecture:
    """The :class:`Architecture` of a ResNet state dict (torchvision keys)."""
    if not isinstance(state, dict) or "conv1.weight" not in state or "fc.weight" not in state:
        return Architecture(None, "not a ResNet state dict (no conv1.weight / fc.weight)", 0, _count_parameters(state)
                            if isinstance(state, dict) else 0)
    num_classes = int(_shape(state["fc.weight"])[0])
    parameters = _count_parameters(state)
    blocks = {}
    for key in state:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    stages = tuple(blocks.get(s, 0) for s in range(1, max(blocks, default=0) + 1))
    bottleneck = "layer1.0.conv3.weight" in state
    kind = "bottleneck" if bottleneck else "basic"
    if len(stages) == 3 and not bottleneck and _shape(state["conv1.weight"])[0] == 16 \
            and len(set(stages)) == 1:
        depth = 6 * stages[0] + 2
        name = f"resnet{depth}" if stages[0] in (3, 5, 7, 9, 18) else None
        described = f"a {depth}-layer CIFAR ResNet (or plain net; they share their parameters)"
        return Architecture(name, described, num_classes, parameters)
    groups, width_per_group = 1, 64
    if bottleneck and "layer1.0.conv2.weight" in state:
        width, per_group = _shape(state["layer1.0.conv2.weight"])[:2]
        groups = int(width) // int(per_group)
        width_per_group = int(width) // groups          # layer1's planes are 64: width = 64/64 * wpg * groups
    name = _IMAGENET.get((kind, stages, groups, width_per_group))
    described = (f"a ResNet with {kind} blocks {list(stages)}"
                 + (f", {groups} groups of width {width_per_group}" if groups != 1 else "")
                 + (f", width per group {width_per_group}" if groups == 1 and width_per_group != 64 else ""))
    return Architecture(name, described, num_classes, parameters)


def describe(architecture: Architecture) -> str:
    """``"a resnet18 (11,689,512 parameters)"``, or the description when no builder matches."""
    what = architecture.name or architecture.description
    return f"{'a ' if architecture.name else ''}{what} ({architecture.parameters:,} parameters)"


def check_weights_fit(state, builder_name: str, hint: str = "use --model {name}") -> None:
    """Raise a one-line ValueError when ``state`` holds another architecture than ``builder_name``."""
    found = identify(state)
    if found.name == builder_name or (found.name and builder_name == found.name.replace("resnet", "plain")):
        return
    if found.name is None and "conv1.weight" not in state:
        raise ValueError(f"the weights are {found.description}; they cannot be loaded into a {builder_name}")
    advice = f"; {hint.format(name=found.name)}" if found.name else ""
    raise ValueError(f"this file holds {describe(found)}, not a {builder_name}{advice}")
