"""`numres train` and `numres evaluate` end to end, on tiny runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_data import write_cifar

import numres as nr
from numres.commands import main

TINY = ["--subset", "32", "--batch-size", "16", "--eval-batch-size", "32"]


def train(out, *extra):
    return main(["train", *TINY, "--out", str(out), "--no-progress", *extra])


def final_weights(out):
    return nr.load(os.path.join(out, "checkpoint.npz"))["model"]


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "2", "--schedule", "multistep", "--milestones", "1") == 0
    text = capsys.readouterr().out
    assert "resnet20 (269,434 parameters) on digits: 32 train / 32 test images" in text
    assert re.search(r"epoch\s+1/2\s+lr 0\.1 ", text) and re.search(r"epoch\s+2/2\s+lr 0\.01 ", text)
    assert "done: test accuracy" in text
    assert {"checkpoint.npz", "metrics.csv", "metrics.json", "curves.png"} <= set(os.listdir(out))
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]

    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    report = capsys.readouterr().out
    accuracy = history[-1]["test_acc"]
    assert f"digits test: accuracy {accuracy:.4f} ({round(accuracy * 32)}/32)" in report
    rows = [line for line in report.splitlines() if re.fullmatch(r"\s*\d\s+(\s+\d+){10}", line)]
    matrix = np.array([[int(v) for v in row.split()[1:]] for row in rows])
    assert matrix.shape == (10, 10) and matrix.sum() == 32 and np.trace(matrix) == round(accuracy * 32)

    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--split", "train"]) == 0
    assert "digits train: accuracy" in capsys.readouterr().out


def test_resume_from_the_command_line_matches_an_uninterrupted_run(tmp_path, capsys):
    options = ["--schedule", "multistep", "--milestones", "2", "--seed", "5", "--weight-decay", "1e-3",
               "--label-smoothing", "0.1", "--momentum", "0.8", "--nesterov"]
    assert train(tmp_path / "straight", "--epochs", "3", *options) == 0
    assert train(tmp_path / "resumed", "--epochs", "2", *options) == 0
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--epochs", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "resuming" in text and re.search(r"epoch\s+3/3", text)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(np.array_equal(straight[key], resumed[key]) for key in straight)
    config = nr.load(tmp_path / "resumed" / "checkpoint.npz")["config"]
    assert (config["seed"], config["momentum"], config["nesterov"], config["epochs"]) == (5, 0.8, True, 3)


def test_warmup_and_cosine_options_reach_the_schedule(tmp_path):
    assert train(tmp_path, "--epochs", "3", "--warmup-epochs", "1", "--lr", "0.2") == 0
    lrs = [r["lr"] for r in json.loads((tmp_path / "metrics.json").read_text())]
    assert np.allclose(lrs, [0.02, 0.2, 0.1])      # lr/10 warm-up, then a 2-epoch cosine from 0.2


def test_progress_bar_shows_loss_accuracy_and_throughput(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    bar = capsys.readouterr().err
    assert "epoch 1/1" in bar and re.search(r"loss=[\d.]+, acc=[\d.]+, img/s=\d+", bar)


def test_bad_options_give_clear_errors(tmp_path, capsys):
    assert train(tmp_path / "a", "--model", "resnet21") == 2
    assert "unknown model 'resnet21'" in capsys.readouterr().err
    assert train(tmp_path / "a", "--threads", "many") == 2
    assert "--threads must be a whole number" in capsys.readouterr().err
    assert train(tmp_path / "b", "--epochs", "1") == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    assert "not --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar10", "--no-progress", "--out", str(tmp_path / "c")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), "--no-progress",
                 "--out", str(tmp_path / "c")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_the_step_and_layer(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "2", "--lr", "1e300") == 1
    message = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 1, step 2 (global step 2)" in message
    assert "values first went non-finite in layer 'conv1' (Conv2d)" in message


def test_cifar10_from_batch_files(tmp_path, capsys):
    write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0), count=8)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                 "--batch-size", "10", "--eval-batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert "on cifar10: 40 train / 8 test images" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    report = capsys.readouterr().out
    assert "cifar10 test: accuracy" in report and "airplane" in report and "truck" in report


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "numres", "train", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert result.returncode == 0
    for option in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--schedule",
                   "--milestones", "--warmup-epochs", "--momentum", "--weight-decay", "--nesterov",
                   "--label-smoothing", "--seed", "--backend", "--dtype", "--out", "--resume"):
        assert option in result.stdout, option


def test_evaluate_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--help"])
    assert exited.value.code == 0 and "--checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("schedule", ["step", "exponential", "onecycle", "plateau"])
def test_torch_schedules_from_the_command_line(schedule, tmp_path):
    """--schedule step|exponential|onecycle|plateau: the lrs of the run are torch.optim.lr_scheduler's
    (onecycle is stepped after every batch; its metric is the lr of the epoch's last step)."""
    import torch
    extra = {"step": ["--step-size", "2", "--gamma", "0.5"], "exponential": [], "onecycle": [],
             "plateau": ["--patience", "0", "--gamma", "0.5"]}[schedule]
    assert train(tmp_path, "--epochs", "4", "--schedule", schedule, *extra) == 0
    history = json.loads((tmp_path / "metrics.json").read_text())
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    steps = 1
    if schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    elif schedule == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)     # --gamma's default for it
    elif schedule == "onecycle":
        steps = 2                           # 32 images in batches of 16
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=4, steps_per_epoch=steps)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    expected = []
    for record in history:
        for _ in range(steps):
            used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if schedule == "onecycle":
                scheduler.step()
        expected.append(used)
        if schedule == "plateau":
            scheduler.step(record["test_loss"])
        elif schedule != "onecycle":
            scheduler.step()
    lrs = [r["lr"] for r in history]
    assert np.allclose(lrs, expected, rtol=1e-12, atol=0), (lrs, expected)
    if schedule == "plateau":
        assert len(set(lrs)) > 1 or all(b["test_loss"] < a["test_loss"] for a, b in zip(history, history[1:]))


def test_onecycle_interrupted_and_resumed_matches_a_straight_run(tmp_path):
    """A per-batch schedule stopped mid-epoch and resumed ends bit-identical to an uninterrupted run."""
    from numres.training import Trainer, TrainConfig
    options = ["--schedule", "onecycle", "--seed", "2", "--epochs", "3"]
    assert train(tmp_path / "straight", *options) == 0
    config = TrainConfig(subset=32, batch_size=16, eval_batch_size=32, schedule="onecycle", seed=2, epochs=3)
    trainer = Trainer(config, tmp_path / "resumed", progress=False)

    def stop_after_three_steps(t):
        if t.global_step == 3:
            t._stop = True
    assert trainer.fit(on_step=stop_after_three_steps) == "interrupted"
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(np.array_equal(straight[key], resumed[key]) for key in straight)
