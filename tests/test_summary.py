"""numres.summarize / ``numres summary``: per-layer shapes, parameters and multiply-accumulates.

Independent references: torchvision's published GFLOPS (which count MACs of convolutions
and linear layers) and parameter counts, and the output shapes PyTorch's forward hooks
report on the reference model of tests/torch_reference.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import numres as nr
from numres.commands import main
from numres.commands.summary import parse_shape
from numres.summary import format_summary, summarize
from torch_reference import build

# torchvision.models: (GFLOPS for 1x3x224x224, number of parameters), from its weight metadata
PUBLISHED = {
    "resnet18": (1.814, 11_689_512),
    "resnet34": (3.664, 21_797_672),
    "resnet50": (4.089, 25_557_032),
    "resnet101": (7.801, 44_549_160),
    "resnet152": (11.514, 60_192_808),
    "resnext50_32x4d": (4.230, 25_028_904),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_totals_match_torchvision_published_numbers(name):
    gmacs, params = PUBLISHED[name]
    summary = summarize(getattr(nr, name)(), (1, 3, 224, 224), shapes_only=True)
    assert round(summary.total_macs / 1e9, 3) == gmacs
    assert summary.total_params == params
    assert summary.rows[-1].name == "fc" and summary.rows[-1].output_shape == (1, 1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_real_forward_gives_the_same_table_as_shape_propagation(name):
    model = getattr(nr, name)()
    real = summarize(model, (1, 3, 224, 224))
    assert round(real.total_macs / 1e9, 3) == PUBLISHED[name][0]
    assert real == summarize(model, (1, 3, 224, 224), shapes_only=True)


def test_rows_match_torch_hooks_on_the_reference_model():
    """Every conv/BN/pool/linear output shape and parameter count agrees with PyTorch's, at an odd size."""
    reference = build("resnet50", num_classes=10).eval()
    shapes = {}
    for name, module in reference.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear, torch.nn.MaxPool2d,
                               torch.nn.AdaptiveAvgPool2d, torch.nn.Sequential)) or name.count(".") == 1:
            module.register_forward_hook(lambda m, i, o, name=name: shapes.update({name: tuple(o.shape)}))
    with torch.no_grad():
        reference(torch.zeros(2, 3, 75, 61))
    torch_modules = dict(reference.named_modules())

    summary = summarize(nr.resnet50(num_classes=10), (2, 3, 75, 61), shapes_only=True)
    assert {row.name for row in summary.rows} == set(shapes)
    for row in summary.rows:
        assert row.output_shape == shapes[row.name], row.name
        assert row.params == sum(p.numel() for p in torch_modules[row.name].parameters()), row.name
        assert row.type == type(torch_modules[row.name]).__name__, row.name
    assert summary.total_params == sum(p.numel() for p in reference.parameters())


def test_macs_per_layer_by_hand():
    """Spot checks against the formulas written out by hand for a grouped, strided conv and the classifier."""
    model = nr.resnext50_32x4d(num_classes=10)
    rows = {row.name: row for row in summarize(model, (3, 3, 64, 64), shapes_only=True).rows}
    conv = rows["layer2.0.conv2"]            # 3x3, 256 -> 256 channels, 32 groups, stride 2: 16x16 -> 8x8
    assert conv.output_shape == (3, 256, 8, 8)
    assert conv.macs == 3 * 8 * 8 * 256 * (256 // 32) * 3 * 3
    assert rows["conv1"].macs == 3 * 32 * 32 * 64 * 3 * 7 * 7
    assert rows["fc"].macs == 3 * 2048 * 10
    for name in ("bn1", "maxpool", "avgpool", "layer1.0.bn3"):
        assert rows[name].macs == 0
    block = rows["layer2.0"]                  # containers add up their children
    children = [row for row in rows.values() if row.name.startswith("layer2.0.") and row.leaf]
    assert block.macs == sum(row.macs for row in children)
    assert block.params == sum(row.params for row in children)
    assert not block.leaf and conv.leaf


def test_summary_leaves_the_model_as_it_was(rng):
    model = nr.resnet18(num_classes=4)
    model.train()
    model.layer1.eval()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for shapes_only in (False, True):
        summarize(model, (2, 3, 32, 32), shapes_only=shapes_only)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert model.training and model.layer2.training and not model.layer1.training
    assert not model.layer1[0].training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)      # still trains normally
    logits = model(x)
    model.backward(np.ones_like(logits))
    assert model.conv1.weight.grad is not None


def test_summary_of_a_bad_input_is_a_clear_error():
    model = nr.resnet18()
    with pytest.raises(ValueError, match="3 channels"):
        summarize(model, (1, 4, 64, 64), shapes_only=True)
    with pytest.raises(ValueError, match="3 channels"):
        summarize(model, (1, 4, 64, 64))
    with pytest.raises(ValueError, match="positive"):
        summarize(model, (1, 3, 0, 64))
    for text in ("1x3x224", "axb", "1x3x-2x4", ""):
        if text == "1x3x224":
            assert parse_shape(text) == (1, 3, 224)
            continue
        with pytest.raises(ValueError, match="--input"):
            parse_shape(text)


def test_cli_prints_table_and_totals(capsys):
    assert main(["summary", "resnet18", "--input", "1x3x224x224", "--shapes-only"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 11,689,512" in out
    assert "(1.814 G)" in out
    lines = out.splitlines()
    fc = next(line for line in lines if line.startswith("fc "))
    assert fc.split()[1:] == ["Linear", "1", "x", "1000", "513,000", "512,000"]
    assert any(line.strip().startswith("layer4.1.conv2") and "1 x 512 x 7 x 7" in line for line in lines)

    assert main(["summary", "resnet18", "--input", "2x3x32x32", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "2 x 10" in out and "Total params: 11,181,642" in out
    assert main(["summary", "resnet56"]) == 0                # CIFAR nets default to 1x3x32x32
    out = capsys.readouterr().out
    assert "input 1 x 3 x 32 x 32" in out and "1 x 16 x 32 x 32" in out
    params = int(re.search(r"Total params: ([\d,]+)", out)[1].replace(",", ""))
    assert round(params / 1e6, 2) == 0.85                    # the paper's Table 6
    capsys.readouterr()
    assert main(["summary", "resnet19"]) == 2
    assert "numres summary: error: unknown model 'resnet19'" in capsys.readouterr().err
    assert main(["summary", "resnet18", "--input", "big"]) == 2
    assert "--input must look like" in capsys.readouterr().err


def test_format_summary_aligns_columns():
    summary = summarize(nr.resnet18(num_classes=3), (1, 3, 32, 32), shapes_only=True)
    text = format_summary(summary, "resnet18")
    table = [line for line in text.splitlines()[1:] if line and not line.startswith(("-", "Total"))]
    assert len(table) == 1 + len(summary.rows)
    assert len({len(line) for line in table}) == 1            # right-aligned numbers: equal widths
