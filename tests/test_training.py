"""The training loop: exact resume (epoch boundary and Ctrl-C mid-epoch), checkpoints, metrics, non-finite losses."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import numres as nr
from numres.training import evaluate_checkpoint
from numres.training import (METRIC_FIELDS, NonFiniteLossError, Trainer, TrainConfig, locate_nonfinite,
                             build_model)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """As `numres train` does for 8x8 images: these GEMMs are too small to split (and the CPU is shared)."""
    with threadpool_limits(1, user_api="blas"):
        yield


def tiny(**overrides):
    """resnet20 on the first 48 digits: 3 steps of 16 per epoch."""
    values = dict(subset=48, batch_size=16, epochs=3, eval_batch_size=48, schedule="multistep", milestones=[2])
    values.update(overrides)
    return TrainConfig(**values)


def run(config, out, **kwargs):
    trainer = Trainer(config, out, progress=False, log=lambda text: None)
    status = trainer.fit(**kwargs)
    return trainer, status


def weights(trainer):
    return {k: nr.to_numpy(v).copy() for k, v in trainer.model.state_dict().items()}


def assert_same_run(a, b):
    """Bit-identical weights, BN buffers, momentum buffers and per-epoch results."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert np.array_equal(wa[key], wb[key]), key
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(
        np.array_equal(nr.to_numpy(sa[i]["momentum_buffer"]), nr.to_numpy(sb[i]["momentum_buffer"])) for i in sa)
    strip = [{k: r[k] for k in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")}
             for r in a.history]
    assert strip == [{k: r[k] for k in strip[0]} for r in b.history]
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path):
    straight, _ = run(tiny(), tmp_path / "straight")
    first, status = run(tiny(epochs=2), tmp_path / "resumed")
    assert status == "finished" and first.epoch == 2
    resumed = Trainer.resume(tmp_path / "resumed", epochs=3, progress=False, log=lambda text: None)
    assert resumed.epoch == 2 and resumed.step_in_epoch == 0
    assert resumed.fit() == "finished"
    assert_same_run(straight, resumed)
    # The weights did move: this is not two copies of an untouched model.
    nr.manual_seed(0)
    untouched = weights(Trainer(tiny(), tmp_path / "fresh", progress=False))
    assert not np.array_equal(untouched["conv1.weight"], weights(straight)["conv1.weight"])


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    config = tiny(schedule="cosine", milestones=None, label_smoothing=0.1, nesterov=True)
    straight, _ = run(config, tmp_path / "straight")

    def press_ctrl_c(trainer):
        if trainer.global_step == 4:                  # epoch 2, after its first step
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    interrupted, status = run(config, tmp_path / "run", on_step=press_ctrl_c)
    assert status == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before          # the handler is put back
    saved = nr.load(tmp_path / "run" / "checkpoint.npz")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    resumed = Trainer.resume(tmp_path / "run" / "checkpoint.npz", progress=False, log=lambda text: None)
    assert resumed.fit() == "finished" and resumed.global_step == 9
    assert_same_run(straight, resumed)


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    def press_twice(trainer):
        if trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    trainer = Trainer(tiny(), tmp_path, progress=False, log=lambda text: None)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(on_step=press_twice)
    saved = nr.load(tmp_path / "checkpoint.npz")                # the end of epoch 1, still usable
    assert saved["epoch"] == 1 and saved["step_in_epoch"] == 0


def test_checkpoint_holds_the_run_and_evaluates_to_the_logged_accuracy(tmp_path):
    trainer, _ = run(tiny(epochs=2), tmp_path)
    saved = nr.load(tmp_path / "checkpoint.npz")
    assert saved["format"] == "numres-train" and saved["epoch"] == 2
    assert saved["config"] == dataclasses.asdict(trainer.config)
    for key, value in weights(trainer).items():
        assert np.array_equal(saved["model"][key], value) and saved["model"][key].shape == value.shape
    assert saved["scheduler"]["last_epoch"] == 2
    assert saved["loader_rng"] == trainer.train_loader.get_rng_state()
    assert saved["init_rng"] == nr.init.get_rng_state()
    result = evaluate_checkpoint(tmp_path)
    assert result["acc"] == trainer.history[-1]["test_acc"]
    assert np.isclose(result["loss"], trainer.history[-1]["test_loss"], rtol=1e-12)
    assert result["confusion"].sum() == 48 and np.trace(result["confusion"]) == round(result["acc"] * 48)
    # The confusion matrix against a direct count from the model's predictions.
    model, _ = build_model("resnet20", 10, 1)
    model.load_state_dict(saved["model"])
    model.eval()
    x, y = next(iter(trainer.test_loader))
    predicted = model(x).argmax(axis=1)
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (y, predicted), 1)
    assert np.array_equal(result["confusion"], expected)


def test_metrics_files_and_curves(tmp_path):
    trainer, _ = run(tiny(epochs=2), tmp_path)
    with open(tmp_path / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == list(METRIC_FIELDS) and [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["test_acc"]) for r in rows] == [r["test_acc"] for r in trainer.history]
    assert json.loads((tmp_path / "metrics.json").read_text()) == trainer.history
    assert [r["lr"] for r in trainer.history] == [0.1, 0.1]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]    # atomic writes, no leftovers


def test_nonfinite_loss_names_the_step_and_the_layer(tmp_path):
    def poison(trainer):
        if trainer.global_step == 1:
            trainer.model.layer2[0].bn1.weight.data[0] = np.nan

    with pytest.raises(NonFiniteLossError) as caught:
        run(tiny(), tmp_path, on_step=poison)
    message = str(caught.value)
    assert "epoch 1, step 2 (global step 2)" in message
    assert "layer 'layer2.0.bn1' (BatchNorm2d)" in message
    assert "non-finite parameters: layer2.0.bn1.weight" in message


def test_locate_nonfinite_input_and_overflowing_layers():
    nr.manual_seed(0)
    model = nr.resnet20(in_channels=1)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert locate_nonfinite(model, x) == {"input": False, "layer": None, "layer_type": None, "parameters": []}
    bad = x.copy()
    bad[1, 0, 3, 3] = np.inf
    assert locate_nonfinite(model, bad)["input"] is True
    model.layer3[1].conv2.weight.data[...] = 1e38                   # float32 overflow in that convolution
    found = locate_nonfinite(model, x)
    assert (found["layer"], found["layer_type"], found["parameters"]) == ("layer3.1.conv2", "Conv2d", [])


def test_guard_backend_keeps_the_step_on_the_device_and_matches_numpy(tmp_path):
    from numres.testing import no_transfers

    class Guarded(Trainer):
        def forward_backward(self, x, y):
            with no_transfers():
                return super().forward_backward(x, y)

    config = tiny(epochs=1, subset=32)
    guarded = Guarded(dataclasses.replace(config, backend="guard"), tmp_path / "g", progress=False,
                      log=lambda text: None)
    step = guarded.optimizer.step

    def step_without_transfers():
        with no_transfers():
            step()

    guarded.optimizer.step = step_without_transfers
    # Bit-identical only when both backends compute each convolution with the same algorithm: "auto"
    # may give NumPy's large layers implicit GEMM (CBLAS), which it never picks off NumPy.
    with nr.using_config(conv_algorithm="im2col"):
        guarded.fit()
        reference, _ = run(config, tmp_path / "n")
    assert_same_run(reference, guarded)


def test_imagenet_resnet_trains_on_grey_digits(tmp_path):
    trainer, status = run(tiny(model="resnet18", epochs=1, subset=16, batch_size=8, eval_batch_size=16), tmp_path)
    assert status == "finished" and trainer.model.conv1.in_channels == 3
    assert len(trainer.history) == 1 and np.isfinite(trainer.history[0]["train_loss"])


def test_bad_configs_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20.*resnet18"):
        Trainer(tiny(model="resnet21"), tmp_path)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        tiny(epochs=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        tiny(lr=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Trainer.resume(tmp_path / "nothing")
    nr.save({"model": {}}, tmp_path / "weights.npz")
    with pytest.raises(ValueError, match="not a numres training checkpoint"):
        Trainer.resume(tmp_path / "weights.npz")
