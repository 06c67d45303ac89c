"""Run folders: never silently replaced, portable (absolute paths, any directory, moved data), reloadable."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

import numres as nr
from numres.commands import main

TINY = ["--subset", "32", "--batch-size", "16", "--eval-batch-size", "32", "--epochs", "1", "--no-progress"]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numres ") and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


def test_default_folder_then_numbered_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "run folder: runs/digits-resnet20"
    first = digest("runs/digits-resnet20/checkpoint.npz")
    for number in (2, 3):
        assert main(["train", *TINY, "--seed", str(number)]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith(f"run folder: runs/digits-resnet20-{number} (runs/digits-resnet20 holds an earlier")
    assert digest("runs/digits-resnet20/checkpoint.npz") == first
    assert sorted(os.listdir("runs")) == ["digits-resnet20", "digits-resnet20-2", "digits-resnet20-3"]


def test_an_out_holding_a_run_is_refused_and_overwrite_keeps_the_old_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    before = digest(out / "checkpoint.npz")
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out), "--seed", "1"]) == 2
    one_error_line(capsys, "already holds a run", "--resume", "--overwrite")
    assert digest(out / "checkpoint.npz") == before and not (out / "checkpoint.prev.npz").exists()

    seen = []                    # what the folder held when the new run's first step was taken

    def watch(trainer):
        seen.append(sorted(os.listdir(out)))
    from numres.commands import train as train_command
    original = train_command.Trainer.fit
    train_command.Trainer.fit = lambda self, on_step=None: original(self, on_step=watch)
    try:
        assert main(["train", *TINY, "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    finally:
        train_command.Trainer.fit = original
    assert "checkpoint.prev.npz" in seen[0] and "checkpoint.npz" not in seen[0]
    assert "its checkpoint is kept as" in capsys.readouterr().out
    assert not (out / "checkpoint.prev.npz").exists() and digest(out / "checkpoint.npz") != before


def test_a_failed_overwrite_leaves_the_previous_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    before = digest(out / "checkpoint.npz")
    assert main(["train", *TINY, "--out", str(out), "--overwrite", "--lr", "1e300"]) == 1     # diverges at once
    assert digest(out / "checkpoint.prev.npz") == before


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    one_error_line(capsys, "--resume", "--overwrite")


def test_a_run_stores_absolute_paths_and_its_command(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.chdir(tmp_path)
    nr.data.make_shapes_folder("shapes", per_class=4, size=(20, 16))
    command = ["train", "--dataset", "folder", "--data-dir", "shapes", "--model", "resnet20", "--image-size", "16",
               "--batch-size", "4", "--epochs", "1", "--out", "run", "--no-progress"]
    assert main(command) == 0
    state = nr.load("run/checkpoint.npz")
    assert state["config"]["data_dir"] == str(tmp_path / "shapes")
    assert state["command"] == "numres " + " ".join(command) and state["cwd"] == str(tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                  # evaluate and predict from another directory
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 0
    assert main(["predict", str(tmp_path / "shapes/red_circle/0000.jpg"), "--weights", str(tmp_path / "run")]) == 0

    os.rename(tmp_path / "shapes", tmp_path / "moved")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data-dir", str(tmp_path / "moved")]) == 0


def test_missing_data_is_named_with_the_option(tmp_path, monkeypatch, capsys):
    pytest.importorskip("PIL")
    monkeypatch.chdir(tmp_path)
    nr.data.make_shapes_folder("shapes", per_class=4, size=(20, 16))
    assert main(["train", "--dataset", "folder", "--data-dir", "shapes", "--model", "resnet20", "--image-size", "16",
                 "--batch-size", "4", "--epochs", "1", "--out", "run", "--no-progress"]) == 0
    os.rename("shapes", "moved")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", "run"]) == 2
    one_error_line(capsys, str(tmp_path / "shapes"), "does not exist", "--data-dir")
    assert main(["train", "--resume", "run", "--epochs", "2", "--no-progress"]) == 2
    one_error_line(capsys, "--data-dir")
    assert main(["train", "--resume", "run", "--epochs", "2", "--data-dir", "moved", "--no-progress"]) == 0


def test_load_model_of_a_run_folder_and_builders_take_weights(tmp_path):
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 0
    model = nr.load_model(tmp_path)
    assert isinstance(model, nr.models.CifarResNet) and model.conv1.in_channels == 1 and not model.training
    weights = nr.load(tmp_path / "checkpoint.npz")["model"]
    assert all(np.array_equal(nr.to_numpy(value), weights[key]) for key, value in model.state_dict().items())
    rebuilt = nr.resnet20(weights=tmp_path / "checkpoint.npz")        # classes and channels from the file
    assert rebuilt.fc.out_features == 10 and rebuilt.conv1.in_channels == 1
    with pytest.raises(ValueError, match=r"holds a resnet20 .*, not a resnet56; use numres.resnet20\(weights"):
        nr.models.cifar.resnet56(weights=tmp_path)
    nr.save(nr.resnet32(num_classes=3).state_dict(), tmp_path / "bare.npz")
    bare = nr.load_model(tmp_path / "bare.npz")
    assert bare.fc.out_features == 3 and len(bare.layer1) == 5
    with pytest.raises(FileNotFoundError):
        nr.load_model(tmp_path / "nothing")


def test_wrong_architecture_weights_on_the_command_line(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--model", "resnet32", "--weights", str(tmp_path / "a"),
                 "--out", str(tmp_path / "b")]) == 2
    line = one_error_line(capsys, "holds a resnet20", "not a resnet32", "--model resnet20")
    assert len(line) < 300
    assert main(["train", *TINY, "--freeze-backbone", "--out", str(tmp_path / "c")]) == 2
    one_error_line(capsys, "--freeze-backbone", "--weights")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_many_processes_follow_the_same_folder_rules(tmp_path):
    """Under mpiexec rank 0 picks the folder (runs/digits-resnet20, then -2) and every rank agrees."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.access(mpiexec, os.X_OK) or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpiexec and mpi4py (pip install 'numres[mpi]')")
    command = [mpiexec, "-n", "2", sys.executable, "-m", "numres", "train", *TINY, "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for expected in ("runs/digits-resnet20", "runs/digits-resnet20-2"):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert f"run folder: {expected}" in done.stdout
    assert sorted(os.listdir(tmp_path / "runs")) == ["digits-resnet20", "digits-resnet20-2"]
    done = subprocess.run(command + ["--out", "runs/digits-resnet20"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode != 0 and "already holds a run" in done.stderr and "Traceback" not in done.stderr
