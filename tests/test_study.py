"""numres.study: gradient_flow against PyTorch autograd and against direct computation; the study commands.

References: PyTorch's autograd on tests/torch_reference.py's resnet18 (input gradients of every
Conv2d/Linear and of every block, read with ``retain_grad``, not with hooks), NumPy norms of
gradients computed by a separate manual backward, and the paper's learning-rate rule.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numres as nr
from numres import study
from numres.commands import main
from torch_reference import BasicBlock, ResNet, build, load_numres_state, randomize_batchnorms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


def _torch_reference_flow(torch_model, x, y):
    """The same statistics from PyTorch: full backward hooks on Conv2d/Linear (their own ``grad_input``,
    i.e. a residual branch's share), ``retain_grad`` on each block's input (the whole gradient there)."""
    layer_norms, block_inputs, handles = {}, {}, []

    def on_backward(name):
        def hook(module, grad_input, grad_output):
            layer_norms[name] = float(grad_input[0].norm())
        return hook

    def keep(name):
        def pre_hook(module, args):
            args[0].retain_grad()
            block_inputs[name] = args[0]
        return pre_hook

    for name, module in torch_model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(module.register_full_backward_hook(on_backward(name)))
        elif name.startswith("layer") and name.count(".") == 1:
            handles.append(module.register_forward_pre_hook(keep(name)))
    loss = F.cross_entropy(torch_model(x), y)
    loss.backward()
    for handle in handles:
        handle.remove()
    return float(loss.detach()), layer_norms, {name: float(t.grad.norm()) for name, t in block_inputs.items()}


def test_gradient_flow_matches_torch_autograd_on_resnet18(rng):
    """float64; the gradients agree to ~1e-10 (rounding differences grow through 18 BatchNorm layers)."""
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=5, dtype="float64")
    randomize_batchnorms(model, seed=3)
    reference = build("resnet18", num_classes=5).double()
    load_numres_state(reference, model)
    x = rng.standard_normal((2, 3, 32, 32))
    y = rng.integers(0, 5, 2)
    x_t = torch.from_numpy(x).requires_grad_(True)
    loss_t, norms_t, blocks_t = _torch_reference_flow(reference, x_t, torch.from_numpy(y))

    flow = study.gradient_flow(model, x, y)

    assert flow.loss == pytest.approx(loss_t, rel=1e-10)
    convs = [n for n, m in reference.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(flow) == 21 and flow.names[0] == "conv1" and flow.names[-1] == "fc"
    assert sorted(flow.names) == sorted(convs)
    assert flow.names.index("layer2.0.conv2") < flow.names.index("layer2.0.downsample.0")   # forward order
    params_t = dict(reference.named_parameters())
    for row in flow:
        grad_t, weight_t = params_t[row.name + ".weight"].grad, params_t[row.name + ".weight"]
        assert row.input_grad_norm == pytest.approx(norms_t[row.name], rel=1e-8), row.name
        assert row.weight_grad_norm == pytest.approx(float(grad_t.norm()), rel=1e-8), row.name
        assert row.weight_norm == pytest.approx(float(weight_t.detach().norm()), rel=1e-12), row.name
        assert row.ratio == pytest.approx(float(grad_t.norm() / weight_t.detach().norm()), rel=1e-8)
    assert flow["layer1.0.conv1"].input_shape == (2, 64, 8, 8)
    assert flow["fc"].input_shape == (2, 512)
    # the full gradient at each block's input (shortcut included)
    assert list(flow.blocks) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                 "layer4.0", "layer4.1"]
    for name, value in flow.blocks.items():
        assert value == pytest.approx(blocks_t[name], rel=1e-8), name
    assert _no_hooks_left(model)


def test_gradient_flow_agrees_with_a_manual_backward_and_leaves_grads(rng):
    nr.manual_seed(5)
    model = nr.resnet20(num_classes=10, in_channels=1, dtype="float64")
    twin = copy.deepcopy(model)
    x = rng.standard_normal((4, 1, 8, 8))
    y = rng.integers(0, 10, 4)

    flow = study.gradient_flow(model, x, y)

    criterion = nr.nn.CrossEntropyLoss(dtype="float64")
    loss = criterion(twin(x), y)
    dlogits = criterion.backward()
    dx = twin.backward(dlogits)
    assert flow.loss == pytest.approx(float(loss), rel=1e-12)
    assert flow["conv1"].input_grad_norm == pytest.approx(np.linalg.norm(dx), rel=1e-10)
    assert flow["fc"].input_grad_norm == pytest.approx(np.linalg.norm(dlogits @ twin.fc.weight.data), rel=1e-10)
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    assert len(flow) == 20 and [r.kind for r in flow].count("Linear") == 1
    for row in flow:
        name = row.name + ".weight"
        assert row.weight_grad_norm == pytest.approx(np.linalg.norm(twin_params[name].grad), rel=1e-10)
        assert np.array_equal(params[name].grad, twin_params[name].grad)   # p.grad holds this batch's gradient
        assert row.weight_norm == pytest.approx(np.linalg.norm(params[name].data), rel=1e-12)
    assert len(flow.blocks) == 9
    assert _no_hooks_left(model)


def test_gradient_flow_replaces_stale_grads_and_keeps_user_hooks(rng):
    model = nr.resnet20(num_classes=10, in_channels=1)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 3)
    for p in model.parameters():
        p.grad = np.full(p.shape, 100.0, np.float32)          # stale gradients must not leak into the rows
    seen = []
    handle = model.fc.register_full_backward_hook(lambda m, gi, go: seen.append("fc"))
    first = study.gradient_flow(model, x, y)
    second = study.gradient_flow(model, x, y)
    assert seen == ["fc", "fc"]
    np.testing.assert_allclose(first.column("weight_grad_norm"), second.column("weight_grad_norm"), rtol=1e-6)
    assert first["fc"].weight_grad_norm == pytest.approx(np.linalg.norm(model.fc.weight.grad), rel=1e-6)
    assert first["fc"].weight_grad_norm < 10                  # a stale 100 per entry would give > 800
    handle.remove()
    assert _no_hooks_left(model)


class _Twice(nr.nn.Module):
    """Uses one convolution twice: gradient_flow cannot attribute a single gradient to it."""

    def __init__(self):
        super().__init__()
        self.conv = nr.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x)).mean(axis=(2, 3))


def test_gradient_flow_bad_input_is_named_and_hooks_are_removed(rng):
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        study.gradient_flow(nr.nn.Sequential(nr.nn.ReLU()), np.zeros((1, 2), np.float32), np.zeros(1, np.int64))
    twice = _Twice()
    with pytest.raises(RuntimeError, match="'conv' ran more than once"):
        study.gradient_flow(twice, rng.standard_normal((1, 2, 4, 4)).astype(np.float32), np.zeros(1, np.int64))
    assert _no_hooks_left(twice)
    model = nr.resnet20(num_classes=10, in_channels=1)
    with pytest.raises(TypeError, match="integer class indices"):
        study.gradient_flow(model, np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.float32))
    assert _no_hooks_left(model)


def test_gradient_flow_on_each_backend(backend, rng):
    """Every backend against PyTorch autograd (float64), not against another numres run: a small
    torchvision-style ResNet with random BatchNorm state; on CuPy nothing leaves the device until the end."""
    nr.manual_seed(1)
    model = nr.ResNet(nr.BasicBlock, [1, 1, 1, 1], num_classes=6, dtype="float64")
    randomize_batchnorms(model, seed=2)
    reference = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=6).double()
    load_numres_state(reference, model)
    x, y = rng.standard_normal((3, 3, 16, 16)), rng.integers(0, 6, 3)
    _, norms_t, blocks_t = _torch_reference_flow(reference, torch.from_numpy(x).requires_grad_(True),
                                                 torch.from_numpy(y))
    params_t = dict(reference.named_parameters())
    model.to(backend)
    flow = study.gradient_flow(model, nr.backend.asarray(x, backend), nr.backend.asarray(y, backend))
    assert sorted(flow.names) == sorted(norms_t)
    np.testing.assert_allclose(flow.column("input_grad_norm"), [norms_t[n] for n in flow.names], rtol=1e-10)
    np.testing.assert_allclose(flow.column("weight_grad_norm"),
                               [float(params_t[n + ".weight"].grad.norm()) for n in flow.names], rtol=1e-10)
    np.testing.assert_allclose(flow.column("weight_norm"),
                               [float(params_t[n + ".weight"].detach().norm()) for n in flow.names], rtol=1e-12)
    assert list(flow.blocks) == list(blocks_t)
    np.testing.assert_allclose(list(flow.blocks.values()), list(blocks_t.values()), rtol=1e-10)


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_gradflow_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "gf"
    assert main(["study", "gradflow", "--depth", "20", "--batch-size", "8", "--out", str(out)]) == 0
    rows = _read_csv(out / "gradflow.csv")
    assert [r["model"] for r in rows] == ["plain20"] * 20 + ["resnet20"] * 20
    assert rows[0]["name"] == "conv1" and rows[0]["input_shape"] == "8x1x8x8" and rows[19]["name"] == "fc"
    assert all(float(r["input_grad_norm"]) > 0 and float(r["weight_norm"]) > 0 for r in rows)
    blocks = _read_csv(out / "gradflow_blocks.csv")
    assert len(blocks) == 18 and blocks[0]["block"] == "layer1.0" and blocks[-1]["block"] == "layer3.2"
    summary = json.loads((out / "gradflow.json").read_text())
    assert set(summary["summaries"]) == {"plain20", "resnet20"}
    assert (out / "gradflow.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "plain20" in printed and "resnet20" in printed and "first/last" in printed


def test_gradflow_without_matplotlib_writes_csv_and_says_so(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)         # `import matplotlib` now fails
    out = tmp_path / "gf"
    assert main(["study", "gradflow", "--depth", "20", "--batch-size", "4", "--out", str(out)]) == 0
    assert (out / "gradflow.csv").exists() and not (out / "gradflow.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_degradation_command_end_to_end(tmp_path):
    out = tmp_path / "deg"
    assert main(["study", "degradation", "--depths", "20", "32", "--epochs", "2", "--subset", "16",
                 "--batch-size", "16", "--out", str(out)]) == 0
    rows = _read_csv(out / "degradation.csv")
    assert list(rows[0]) == list(study.CURVE_FIELDS)
    assert [(r["model"], r["epoch"]) for r in rows] == [(m, e) for m in ("plain20", "plain32", "resnet20", "resnet32")
                                                         for e in ("1", "2")]
    for r in rows:
        assert 0 <= float(r["train_error"]) <= 1 and 0 <= float(r["test_error"]) <= 1
        assert np.isfinite(float(r["train_loss"])) and np.isfinite(float(r["test_loss"]))
    result = json.loads((out / "degradation.json").read_text())
    assert result["budget"]["epochs"] == 2 and result["budget"]["warmup_epochs"] == 1   # clipped to epochs - 1
    assert set(result["verdict"]) == {"plain", "resnet"}
    assert [float(r["lr"]) for r in rows[:2]] == pytest.approx([0.01, 0.001])   # warm-up, then both drops
    assert (out / "degradation.png").read_bytes()[:8] == PNG_MAGIC


def test_degradation_schedule_is_the_papers_step_rule():
    """lr/10 during the warm-up, then lr, divided by 10 at 50% and at 75% of the epochs."""
    plain = study.Budget(epochs=8, lr=0.1, warmup_epochs=0)
    assert [round(plain.lr_at(e), 12) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    warm = study.Budget(epochs=8, lr=0.1, warmup_epochs=2)
    assert [round(warm.lr_at(e), 12) for e in range(8)] == [0.01] * 2 + [0.1] * 2 + [0.01] * 2 + [0.001] * 2
    with pytest.raises(ValueError, match="warmup_epochs"):
        study.Budget(epochs=2, warmup_epochs=2)


def test_study_command_rejects_bad_arguments(capsys):
    assert main(["study"]) == 2
    assert "choose an experiment" in capsys.readouterr().err
    assert main(["study", "degradation", "--epochs", "0"]) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "gradflow", "--depth", "21"])          # argparse: not one of the paper's depths
    with pytest.raises(ValueError, match="depth 21"):
        study.gradflow_experiment(depth=21)


def test_a_study_never_replaces_earlier_results_unasked(tmp_path, capsys, monkeypatch):
    """The default folder moves on to -2; an --out holding results is refused in one line unless --overwrite,
    and the refused run leaves the earlier files byte-identical."""
    monkeypatch.chdir(tmp_path)
    quick = ["study", "gradflow", "--depth", "20", "--batch-size", "4"]
    assert main(quick) == 0
    assert main(quick) == 0
    first, second = tmp_path / "runs" / "study-gradflow", tmp_path / "runs" / "study-gradflow-2"
    assert (first / "gradflow.csv").exists() and (second / "gradflow.csv").exists()
    assert "results folder: " + os.path.join("runs", "study-gradflow-2") in capsys.readouterr().out

    before = (first / "gradflow.csv").read_bytes()
    assert main(quick + ["--out", str(first), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds gradflow results" in err[0] and "--overwrite" in err[0]
    assert (first / "gradflow.csv").read_bytes() == before
    assert main(quick + ["--out", str(first), "--seed", "1", "--overwrite"]) == 0
    assert (first / "gradflow.csv").read_bytes() != before
