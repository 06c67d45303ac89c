"""``numres predict``: torchvision's preprocessing, the shipped class names, and top-5 against PyTorch.

The reference pipeline here is written out step by step with Pillow and torch ops
(torchvision's Resize(256) / CenterCrop(224) / ToTensor / Normalize), and the reference
model is tests/torch_reference.py holding the same weights as the checkpoint.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import numres as nr
from numres.cli import main
from numres.imagenet import class_names, load_image, resized_size
from torch_reference import build

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _write_images(folder):
    """A 300x260 RGB PNG and a 250x400 greyscale JPEG, smooth enough for resizing to matter."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:260, 0:300]
    rgb = np.stack([(xx * 0.8) % 256, (yy * 0.9) % 256, 128 + 60 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    png = folder / "colour.png"
    Image.fromarray(rgb).save(png)
    grey = (np.add.outer(np.arange(400), np.arange(250)) % 256).astype(np.uint8)
    jpg = folder / "grey.jpg"
    Image.fromarray(grey, mode="L").save(jpg, quality=95)
    return png, jpg


def _reference_input(path, new_size, box):
    """torchvision's evaluation transform with the sizes worked out by hand for each test image."""
    image = Image.open(path).convert("RGB").resize(new_size, Image.BILINEAR).crop(box)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return (tensor - MEAN) / STD


# 300x260 -> shorter side 256: (int(256 * 300 / 260), 256) = (295, 256); crop left round(35.5) = 36, top 16
# 250x400 -> (256, int(256 * 400 / 250)) = (256, 409); crop left 16, top round(92.5) = 92
EXPECTED_GEOMETRY = {"colour.png": ((295, 256), (36, 16, 260, 240)),
                     "grey.jpg": ((256, 409), (16, 92, 240, 316))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A torchvision-shaped resnet18 .pth with random weights; a larger classifier spreads the top-5 apart."""
    torch.manual_seed(11)
    model = build("resnet18")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_class_names_ship_with_the_package():
    names = class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[207] == "golden retriever"
    assert names[281] == "tabby" and names[999] == "toilet tissue"


def test_preprocessing_matches_torchvision_steps(tmp_path):
    for path in _write_images(tmp_path):
        new_size, box = EXPECTED_GEOMETRY[path.name]
        with Image.open(path) as image:
            assert resized_size(*image.size) == new_size
        ours = load_image(path)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, _reference_input(path, new_size, box).numpy(), rtol=0, atol=2e-6)


def _parse(output):
    """{image path: [(rank, percent, index), ...]} from the command's output."""
    results, current = {}, None
    for line in output.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = results.setdefault(line[:-1], [])
            continue
        match = re.fullmatch(r"\s+(\d+)\.\s+([\d.]+)%\s+(.+) \((\d+)\)", line)
        assert match, f"unexpected line {line!r}"
        current.append((int(match[1]), float(match[2]), match[3], int(match[4])))
    return results


def test_predict_prints_torch_top5(tmp_path, checkpoint, capsys):
    weights, reference = checkpoint
    images = _write_images(tmp_path)
    assert main(["predict", *map(str, images), "--model", "resnet18", "--weights", str(weights)]) == 0
    printed = _parse(capsys.readouterr().out)
    assert list(printed) == [str(path) for path in images]
    names = class_names()
    for path in images:
        x = _reference_input(path, *EXPECTED_GEOMETRY[path.name])[None]
        with torch.no_grad():
            probabilities = torch.softmax(reference(x).double(), dim=1)[0]
        top = torch.topk(probabilities, 5)
        rows = printed[str(path)]
        assert [row[0] for row in rows] == [1, 2, 3, 4, 5]
        assert [row[3] for row in rows] == top.indices.tolist()
        assert [row[2] for row in rows] == [names[i] for i in top.indices.tolist()]
        assert np.allclose([row[1] for row in rows], 100 * top.values.numpy(), atol=0.006)
        assert rows[4][1] > 1 and min(a[1] - b[1] for a, b in zip(rows, rows[1:])) > 0.1   # a ranking, not ties


def test_predict_with_other_class_counts_and_npz(tmp_path, capsys):
    torch.manual_seed(2)
    reference = build("resnet18", num_classes=3).eval()
    path = tmp_path / "three.npz"
    nr.save({k: v.numpy() for k, v in reference.state_dict().items()}, path)
    png, _ = _write_images(tmp_path)
    assert main(["predict", str(png), "--model", "resnet18", "--weights", str(path)]) == 0
    rows = _parse(capsys.readouterr().out)[str(png)]
    assert len(rows) == 3 and all(row[2].startswith("class ") for row in rows)
    assert abs(sum(row[1] for row in rows) - 100) < 0.02


def test_predict_errors_are_clear(tmp_path, checkpoint, monkeypatch):
    weights, _ = checkpoint
    png, _ = _write_images(tmp_path)
    with pytest.raises(SystemExit, match="no such image"):
        main(["predict", str(tmp_path / "absent.png"), "--weights", str(weights)])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(SystemExit, match="not an image"):
        main(["predict", str(not_image), "--model", "resnet18", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="unknown model 'resnet7'"):
        main(["predict", str(png), "--model", "resnet7", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="no such weights file"):
        main(["predict", str(png), "--model", "resnet18", "--weights", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match="shape mismatches"):
        main(["predict", str(png), "--model", "resnet50", "--weights", str(weights)])
    monkeypatch.setitem(sys.modules, "PIL", None)          # as if Pillow were not installed
    with pytest.raises(SystemExit, match=r"needs Pillow.*numres\[image\]"):
        main(["predict", str(png), "--model", "resnet18", "--weights", str(weights)])
