"""Every command as a new user meets it: one clear line and exit status 2 for each mistake people really make,
notes that say what an option or a missing package changes, and output that claims only what was written."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import numres as nr
from numres.commands import main
from numres.commands.evaluate import trained_for

TINY = ["--subset", "32", "--batch-size", "16", "--eval-batch-size", "32", "--no-progress"]


def fails_cleanly(capsys, argv, *words):
    """The command returns 2 and prints exactly one line, ``numres COMMAND: error: ...``, naming ``words``."""
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"numres {argv[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("argv, words", [
    (["demo", "--model", "resnet99"], ["unknown model 'resnet99'", "resnet18"]),
    (["demo", "--size", "8"], ["--size"]),
    (["train", "--lr", "nan"], ["lr", "nan"]),
    (["train", "--lr", "inf"], ["lr", "inf"]),
    (["train", "--lr", "-0.1"], ["lr"]),
    (["train", "--momentum", "nan"], ["momentum"]),
    (["train", "--model", "resnet99"], ["unknown model 'resnet99'"]),
    (["train", "--threads", "0", "--subset", "16"], ["--threads must be at least 1"]),
    (["evaluate", "--checkpoint", "no/such/run"], ["no checkpoint at"]),
    (["evaluate", "--checkpoint", "no/such/run", "--batch-size", "0"], ["--batch-size"]),
    (["predict", "missing.jpg", "--weights", "missing.pth"], ["no such image: missing.jpg"]),
    (["summary", "resnet19"], ["unknown model 'resnet19'"]),
    (["summary", "resnet18", "--input", "1x3"], []),
    (["study", "gradflow", "--batch-size", "0"], ["--batch-size"]),
])
def test_user_errors_end_in_one_line_and_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_cleanly(capsys, argv, *words)
    assert not os.path.exists(tmp_path / "runs"), "a refused run must leave nothing behind"


@pytest.mark.parametrize("argv, words", [
    (["train", "--schedule", "bogus"], ["--schedule", "'bogus'", "onecycle", "numres train --help"]),
    (["train", "--epochs", "abc"], ["--epochs", "'abc'"]),
    (["study", "gradflow", "--batch-size", "x"], ["--batch-size"]),
    (["summary"], ["MODEL"]),
])
def test_option_parser_errors_are_one_line_too(argv, words, capsys):
    """argparse's own errors (a bad choice, a non-number, a missing argument) skip the usage text."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"numres {' '.join(argv[:2 if argv[0] == 'study' else 1])}: "
                                                   f"error: "), lines
    assert all(word in lines[0] for word in words), lines[0]


def test_a_gpu_backend_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # as on a machine without CuPy
    for backend in ("cupy", "cuda"):
        fails_cleanly(capsys, ["demo", "--backend", backend], "CuPy")


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"numres {nr.__version__}"


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "summary", "study", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0 and "usage: numres " + command in text
    if command == "predict":
        assert "Pillow" in text
    import argparse
    import importlib
    parser = argparse.ArgumentParser()
    importlib.import_module(f"numres.commands.{command}").add_arguments(parser)
    actions = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    if command == "study":
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        actions = [a for sub in subparsers.choices.values() for a in sub._actions if a.option_strings]
    undocumented = [a.option_strings[0] for a in actions if not a.help and a.option_strings[0] != "-h"]
    assert not undocumented, undocumented           # every option says what it does


def test_trained_for_wording():
    assert trained_for(1, 0) == "1 epoch"
    assert trained_for(3, 0) == "3 epochs"
    assert trained_for(1, 12, 44) == "1 epoch and 12 steps (of 44) of epoch 2"
    assert trained_for(0, 1) == "0 epochs and 1 step"


def test_evaluate_a_mid_epoch_checkpoint(tmp_path, capsys):
    from numres.training import Trainer, TrainConfig
    trainer = Trainer(TrainConfig(epochs=2, subset=64, batch_size=16), tmp_path, progress=False, log=lambda t: None)

    def stop_after_six_steps(t):
        if t.global_step == 6:
            t._stop = True
    assert trainer.fit(on_step=stop_after_six_steps) == "interrupted"
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 0
    assert "resnet20 after 1 epoch and 2 steps (" in capsys.readouterr().out


def test_notes_for_unreached_milestones(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "2", "--schedule", "multistep", "--milestones", "1", "40",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: milestone 40 will not be reached: the last epoch is 2" in out


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "metrics.json").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has already finished its 1 epoch; nothing to do" in out
    assert (tmp_path / "metrics.json").read_text() == before


def test_resume_with_more_epochs_says_what_the_schedule_does(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--epochs", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: the run had 2 epochs and now has 4: the cosine schedule is recomputed for 4 epochs" in out
    lrs = [r["lr"] for r in json.loads((tmp_path / "metrics.json").read_text())]
    # cosine over 2 epochs, then over 4 epochs from epoch 3: 0.1, 0.05 | 0.1 * (1 + cos(pi * 2/4)) / 2 = 0.05, ...
    assert np.allclose(lrs, [0.1, 0.05, 0.05, 0.1 * (1 + np.cos(np.pi * 3 / 4)) / 2])


def test_missing_extras_are_named_once_and_nothing_is_claimed(tmp_path, capsys, monkeypatch):
    """Without matplotlib and tqdm the run says once what they would add, and its last line lists only real files."""
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tqdm", "matplotlib") else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["train", "--subset", "32", "--batch-size", "16", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: without")]
    assert notes == ["note: without tqdm (a progress bar) and matplotlib (curves.png); "
                     "pip install 'numres[train]' adds them"]
    done = out.strip().splitlines()[-1]
    assert done.endswith(f"checkpoint.npz, metrics.csv and metrics.json in {tmp_path}"), done
    assert "curves" not in done and not (tmp_path / "curves.png").exists()


def test_with_all_extras_the_curves_are_claimed_and_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: without" not in out
    assert out.strip().endswith(f"checkpoint.npz, metrics.csv, metrics.json and curves.png in {tmp_path}")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_seed_gives_the_same_numbers_with_or_without_threadpoolctl(tmp_path, monkeypatch):
    """The BLAS thread count is set by numres itself when threadpoolctl is missing, so the numbers agree."""
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "with")]) == 0
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "without")]) == 0
    with_extras = json.loads((tmp_path / "with" / "metrics.json").read_text())
    bare = json.loads((tmp_path / "without" / "metrics.json").read_text())
    for a, b in zip(with_extras, bare):
        assert (a["train_loss"], a["test_loss"], a["test_acc"]) == (b["train_loss"], b["test_loss"], b["test_acc"])


def test_blas_threads_fallback_sets_and_restores_openblas(monkeypatch):
    from numres import blas
    controls = blas._openblas_controls()
    if controls is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS")
    get, _ = controls
    before = get()
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    with blas.blas_threads(1):
        assert get() == 1
    assert get() == before
    with pytest.raises(ValueError, match="at least 1"):
        blas.blas_threads(0)


def test_a_run_that_fails_at_once_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main(["train", *TINY, "--epochs", "1", "--lr", "1e300", "--out", str(out)]) == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_option_trains_and_resumes_bit_exactly(optimizer, tmp_path, capsys):
    """--optimizer adam|adamw: the run uses torch.optim's update (numres.optim.Adam/AdamW, tested against torch
    in test_adam.py), its lr default is 1e-3, and a resumed run ends bit-identical to a straight one."""
    # a multistep schedule is the same whether the run is planned for 2 or 3 epochs, so the runs can agree
    options = ["--optimizer", optimizer, "--weight-decay", "0.01", "--seed", "3", "--schedule", "multistep",
               "--milestones", "2"]
    assert main(["train", *TINY, "--epochs", "3", "--out", str(tmp_path / "straight"), *options]) == 0
    out = capsys.readouterr().out
    assert f"{optimizer} lr 0.001 (multistep)" in out
    checkpoint = nr.load(tmp_path / "straight" / "checkpoint.npz")
    assert checkpoint["config"]["optimizer"] == optimizer
    assert all("exp_avg" in state for state in checkpoint["optimizer"]["state"].values())
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "resumed"), *options]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--epochs", "3", "--no-progress"]) == 0
    straight = checkpoint["model"]
    resumed = nr.load(tmp_path / "resumed" / "checkpoint.npz")["model"]
    assert all(np.array_equal(straight[key], resumed[key]) for key in straight)


def test_optimizer_option_refuses_sgd_only_settings(capsys):
    fails_cleanly(capsys, ["train", "--optimizer", "adam", "--momentum", "0.5"], "--momentum", "SGD")


def test_device_names_work_on_the_command_line(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--backend", "cpu", "--out", str(tmp_path)]) == 0
    assert "backend numpy" in capsys.readouterr().out
    assert nr.load(tmp_path / "checkpoint.npz")["config"]["backend"] == "numpy"


def test_confusion_matrix_keeps_whole_class_names():
    from numres.commands.evaluate import format_confusion
    text = format_confusion(np.array([[3, 0], [1, 12]]), ["triangle_green", "circle_blue"])
    header = text.splitlines()[1].split()
    assert header == ["triangle_green", "circle_blue"]
    assert text.splitlines()[2].split() == ["triangle_green", "3", "0"]


def test_study_writes_under_runs_by_default():
    import argparse
    from numres.commands import study
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    for experiment in ("gradflow", "degradation"):
        assert parser.parse_args([experiment]).out == os.path.join("runs", f"study-{experiment}")


def test_curves_survive_a_huge_first_epoch(tmp_path, monkeypatch):
    """A first test loss of 14 beside later ones of 0.04: the loss panel is drawn on a log scale."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    from numres.training import write_curves
    scales = []
    original = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, value, **kw: (scales.append(value),
                                                                                      original(self, value, **kw)))
    history = [dict(epoch=e, train_loss=l, test_loss=l * 1.1, train_acc=0.5, test_acc=0.5)
               for e, l in enumerate([13.8, 0.5, 0.1, 0.04], 1)]
    assert write_curves(history, tmp_path / "curves.png")
    assert scales == ["log"] and (tmp_path / "curves.png").stat().st_size > 1000
