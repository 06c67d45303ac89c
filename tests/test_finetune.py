"""Fine-tuning on your own images end to end: `numres train --dataset folder --weights X --freeze-backbone`,
then `numres evaluate` and `numres predict` on the run."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import numres as nr
from numres.commands import main
from numres.data import ImageFolder, ImageLoader, make_shapes_folder
from numres.data import transforms as T
from numres.inference import load_classifier

SIZE = 32           # the crop the model sees: small, so that the test stays quick on two cores


@pytest.fixture
def one_thread():
    before = nr.parallel.get_num_threads()
    nr.parallel.set_num_threads(1)      # tiny GEMMs: threads only add hand-offs (and contention on a busy CI)
    yield
    nr.parallel.set_num_threads(before)


def write_pretrained(path, calibration_folder):
    """A "pretrained" ImageNet-shaped resnet18 (1000 classes) as a torchvision-style .pth of tensors.

    The weights are a seeded random initialisation; the BatchNorm running statistics are
    those of images like the ones it will be fine-tuned on (one forward pass in training
    mode with a cumulative average), as a real pretrained network's are for its inputs.
    """
    nr.init.manual_seed(0)
    model = nr.resnet18(num_classes=1000)
    for module in model.modules():
        if isinstance(module, nr.nn.BatchNorm2d):
            module.momentum = None
    calibration = ImageFolder(calibration_folder, transform=T.eval_transform(T_RESIZE, SIZE))
    x, _ = next(iter(ImageLoader(calibration, len(calibration))))
    model.train()
    with nr.no_grad():
        model(x)
    state = {key: torch.from_numpy(np.array(nr.backend.to_numpy(value))) for key, value in model.state_dict().items()}
    torch.save(state, path)
    return {key: value.numpy() for key, value in state.items()}


T_RESIZE = nr.data.eval_resize(SIZE)


def test_fine_tune_a_frozen_resnet18_on_a_generated_folder_then_evaluate_and_predict(tmp_path, capsys, one_thread):
    data, other = tmp_path / "shapes", tmp_path / "calibration"
    make_shapes_folder(data, per_class=20, size=(64, 48), seed=0)
    make_shapes_folder(other, per_class=8, size=(64, 48), seed=1)
    pretrained = write_pretrained(tmp_path / "pretrained.pth", other)
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "folder", "--data-dir", str(data), "--model", "resnet18",
                 "--image-size", str(SIZE), "--weights", str(tmp_path / "pretrained.pth"), "--freeze-backbone",
                 "--epochs", "5", "--batch-size", "6", "--lr", "0.01", "--val-fraction", "0.25", "--threads", "1",
                 "--out", str(out), "--no-progress"]
    assert main(arguments) == 0
    text = capsys.readouterr().out
    assert re.search(r"resnet18 \([\d,]+ parameters\) on folder: 45 train / 15 test images", text), text
    history = json.loads((out / "metrics.json").read_text())
    accuracy = history[-1]["test_acc"]
    # Chance is 1/3; 11 or more of 15 right by chance has probability below 1e-3.
    assert accuracy >= 11 / 15, history

    state = nr.load(str(out / "checkpoint.npz"))
    assert state["classes"] == ["blue_triangle", "green_square", "red_circle"]
    model = state["model"]
    assert model["fc.weight"].shape == (3, 512) and model["fc.bias"].shape == (3,)
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight", "layer4.1.bn2.weight",
                "layer1.0.bn1.running_mean", "layer4.1.bn2.running_var"):
        assert np.array_equal(model[key], pretrained[key]), f"{key} changed in a frozen backbone"

    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"folder test: accuracy {accuracy:.4f} ({round(accuracy * 15)}/15)" in report
    assert "blue_triangle" in report and "red_circle" in report

    images = [str(data / "green_square" / "0001.png"), str(data / "red_circle" / "0000.jpg")]
    assert main(["predict", *images, "--weights", str(out), "--top", "3"]) == 0
    predicted = capsys.readouterr().out
    assert f"resized (shorter side {T_RESIZE}) and centre-cropped to {SIZE}x{SIZE}" in predicted
    # predict sees an image exactly as the run's validation did
    classifier = load_classifier(str(out))
    evaluation = T.eval_transform(T_RESIZE, SIZE)
    with Image.open(images[1]) as image:
        assert np.array_equal(classifier.preprocess(images[1]), evaluation(image.convert("RGB")))
    for image in images:
        block = predicted.split(image + ":")[1].splitlines()[1:4]
        names = [re.search(r"%\s+(\S+) \(\d\)", line).group(1) for line in block]
        assert sorted(names) == ["blue_triangle", "green_square", "red_circle"]      # the run's own names


def test_validation_folder_and_clear_errors(tmp_path, capsys, one_thread):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    make_shapes_folder(train_dir, per_class=4, size=(24, 20), seed=0)
    make_shapes_folder(val_dir, per_class=2, size=(24, 20), seed=1)
    common = ["train", "--dataset", "folder", "--model", "resnet18", "--image-size", "16", "--epochs", "1",
              "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert main([*common, "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--out", str(tmp_path / "a")]) == 0
    assert "on folder: 12 train / 6 test images" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "b")]) == 2
    assert "--dataset folder needs --data-dir" in capsys.readouterr().err
    os.rename(val_dir / "red_circle", val_dir / "red_disc")
    assert main([*common, "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--out", str(tmp_path / "c")]) == 2
    assert "differ from those of" in capsys.readouterr().err
