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
from numres.commands import main
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
    for line in output.splitlines()[1:]:           # the first line says what was loaded
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
            probabilities = torch.softmax(reference.double()(x.double()), dim=1)[0]      # float64 truth
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


def _fails_cleanly(capsys, argv, pattern):
    """The command ends with exit status 2 and one line on stderr matching ``pattern``."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("numres predict: error: "), error
    assert re.search(pattern, error), error


def test_predict_errors_are_clear(tmp_path, checkpoint, monkeypatch, capsys):
    weights, _ = checkpoint
    png, _ = _write_images(tmp_path)
    _fails_cleanly(capsys, ["predict", str(tmp_path / "absent.png"), "--weights", str(weights)], "no such image")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    _fails_cleanly(capsys, ["predict", str(not_image), "--weights", str(weights)], "not an image")
    _fails_cleanly(capsys, ["predict", str(png), "--model", "resnet7", "--weights", str(weights)],
                   "unknown model 'resnet7'")
    _fails_cleanly(capsys, ["predict", str(png), "--weights", str(tmp_path / "none.pth")], "no such weights file")
    _fails_cleanly(capsys, ["predict", str(png), "--top", "0", "--weights", str(weights)], "--top")
    monkeypatch.setitem(sys.modules, "PIL", None)          # as if Pillow were not installed
    _fails_cleanly(capsys, ["predict", str(png), "--weights", str(weights)], r"needs Pillow.*numres\[image\]")


def test_weights_of_another_architecture_are_named(checkpoint, tmp_path, capsys):
    """A resnet18 file with --model resnet50 says what the file holds, in one line, not a list of keys."""
    weights, _ = checkpoint
    png, _ = _write_images(tmp_path)
    _fails_cleanly(capsys, ["predict", str(png), "--model", "resnet50", "--weights", str(weights)],
                   r"^numres predict: error: this file holds a resnet18 \(11,689,512 parameters\), not a resnet50; "
                   r"use --model resnet18$")
    with pytest.raises(ValueError, match=r"holds a resnet18 \(11,689,512 parameters\).*numres.resnet18"):
        nr.resnet50(weights=weights)


def test_predict_takes_the_architecture_from_the_file(checkpoint, tmp_path, capsys):
    weights, _ = checkpoint
    png, _ = _write_images(tmp_path)
    assert main(["predict", str(png), "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("resnet18 (11,689,512 parameters)")
    assert len(_parse(out)[str(png)]) == 5


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short `numres train` run on the digits (resnet20), its run folder."""
    from numres.training import Trainer, TrainConfig
    out = tmp_path_factory.mktemp("digits-run")
    trainer = Trainer(TrainConfig(epochs=1, subset=128, batch_size=32), out, progress=False, log=lambda text: None)
    trainer.fit()
    return out, trainer


def test_predict_on_a_training_checkpoint_needs_no_model(digits_run, tmp_path, capsys):
    """A CIFAR-style run predicts with its own classes and preprocessing, from the run folder alone."""
    from numres.inference import load_classifier
    out, trainer = digits_run
    dataset = trainer.test_loader.dataset
    paths = []
    for index in range(4):
        grey = np.round(dataset.images[index, 0] * (255.0 / dataset.max_value)).astype(np.uint8)
        path = tmp_path / f"digit{index}.png"
        Image.fromarray(grey, mode="L").save(path)
        paths.append(path)
    assert main(["predict", *map(str, paths), "--weights", str(out), "--top", "3"]) == 0
    printed = _parse(capsys.readouterr().out)
    classifier = load_classifier(out)
    x_loader, _ = trainer.test_loader.make_batch(np.arange(4))
    for index, path in enumerate(paths):
        # the file's pixels went through 8-bit rounding: within half a grey level of the loader's input
        x = classifier.preprocess(path)
        assert x.shape == x_loader[index].shape == (1, 8, 8)
        assert np.abs(x - x_loader[index]).max() <= 0.5 / 255 / trainer.std.min() + 1e-6
        rows = printed[str(path)]
        assert [row[2] for row in rows] == [str(row[3]) for row in rows]          # the run's class names: "0".."9"
    assert main(["predict", str(paths[0]), "--weights", str(out), "--model", "resnet56"]) == 2
    assert "holds a resnet20" in capsys.readouterr().err
