"""Every command in the README's ``bash`` blocks, run in order in one folder, as a new user would.

Training commands get tiny sizes appended (argparse keeps the last value: ``--subset 24 --epochs 3``...)
so that the whole README runs in well under a minute.  Each command must end with status 0, or with
status 2 and one line on stderr (no traceback); the commands expected to fail here are named (no
CIFAR-10, no torchvision weights).  After each command every checkpoint written before it is
byte-identical, except the run the command resumes.  Then the bad inputs of issue 18, each one line.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from numres.commands import main

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = ["--subset", "24", "--batch-size", "8", "--eval-batch-size", "32", "--epochs", "3", "--workers", "0",
        "--no-progress"]
# Commands that cannot succeed on a machine without CIFAR-10 or torchvision's weights (and those after them
# that use their run); each must fail in one line.
EXPECTED_FAILURES = {"cifar10", "resnet18-f37072fd.pth", "runs/shapes"}       # words of those commands
HAVE_MPI = (shutil.which("mpiexec") or os.access(os.path.join(os.path.dirname(sys.executable), "mpiexec"), os.X_OK)) \
    and importlib.util.find_spec("mpi4py") is not None


def readme_commands() -> list:
    """The README's shell commands, in order, as argument lists (``a && b`` gives two)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        pending = ""
        for line in block.splitlines():
            pending += line + "\n"
            if line.rstrip().endswith("\\"):     # continued on the next line
                continue
            try:
                words = shlex.split(pending.replace("\\\n", " "), comments=True)
            except ValueError:          # an open quote: the command goes on
                continue
            pending = ""
            while words:
                head = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:head])
                words = words[head + 1:]
    return commands


def checkpoints(root) -> dict:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(root).glob("runs/**/checkpoint*.npz"))}


def resumed_folder(words):
    if "--resume" not in words:
        return None
    position = words.index("--resume")
    if position + 1 < len(words) and not words[position + 1].startswith("-"):
        return os.path.normpath(words[position + 1])
    return os.path.normpath(words[words.index("--out") + 1])


def run_one(words, capsys):
    """(status, stderr lines) of one README command, tiny-sized, in the current directory; status None
    for a multi-process command where MPI is missing."""
    if words[0] in ("python", "python3"):
        done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr.strip().splitlines()
    if words[0] == "mpiexec":
        words = words[words.index("numres"):]
        prefix = ["mpiexec", "-n", "2"]
    else:
        prefix = []
    arguments = list(words[1:])
    if arguments[0] == "train":
        arguments += ["--epochs", "4", "--no-progress"] if "--resume" in arguments else \
            TINY + (["--image-size", "16"] if "folder" in arguments else [])
    if prefix or "--nproc" in arguments:
        if not HAVE_MPI:                # skipped here (pip install 'numres[mpi]' runs it)
            return None, []
        command = ([shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", "2"]
                   if prefix else []) + [sys.executable, "-m", "numres", *arguments]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return done.returncode, done.stderr.strip().splitlines()
    capsys.readouterr()
    status = main(arguments)
    return status, capsys.readouterr().err.strip().splitlines()


def test_the_readme_commands_in_order_lose_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("PIL")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))         # ~/data/... is empty here, as on a fresh machine
    commands = [words for words in readme_commands()
                if words[0] != "pip" and words[:3] != ["python3", "-m", "pytest"]]
    assert len(commands) >= 15 and commands[0] == ["numres", "train"]
    outcomes = []
    for words in commands:
        text = shlex.join(words)
        before = checkpoints(tmp_path)
        status, errors = run_one(words, capsys)
        outcomes.append((text, status))
        if status is None:
            continue
        expected_failure = bool(EXPECTED_FAILURES & set(words))
        if status != 0 or expected_failure:
            assert status == 2 and expected_failure, (text, status, errors)
            assert len(errors) == 1 and "error:" in errors[0] and "Traceback" not in errors[0], (text, errors)
        after = checkpoints(tmp_path)
        resumed = resumed_folder(words)
        for path, digest in before.items():
            if resumed is None or os.path.dirname(path) != resumed:
                assert after.get(path) == digest, f"{text} changed or removed {path}"
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert {"digits-resnet20", "digits-resnet56", "digits-resnet20-2", "shapes-pretrain", "recoloured"} <= set(runs)
    print("\n".join(f"{status}  {text[:150]}" for text, status in outcomes))


BAD_INPUTS = [
    (["train", "--image-size", "0", "--dataset", "folder", "--data-dir", "."], "--image-size"),
    (["train", "--val-fraction", "1.5", "--dataset", "folder", "--data-dir", "."], "--val-fraction"),
    (["train", "--workers", "-1"], "--workers"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--freeze-backbone"], "--weights"),
    (["train", "--model", "resnet21"], "unknown model"),
    (["train", "--weights", "nothing.pth"], "no such weights file"),
    (["evaluate", "--checkpoint", "nothing"], "no checkpoint"),
    (["evaluate", "--checkpoint", ".", "--batch-size", "0"], "--batch-size"),
    (["predict", "nothing.png", "--weights", "nothing"], "no such image"),
    (["study", "degradation", "--epochs", "0"], "--epochs"),
    (["study", "degradation", "--subset", "1"], "--subset"),
    (["train", "--backend", "tpu"], "--backend tpu"),
    (["evaluate", "--checkpoint", ".", "--backend", "tpu"], "--backend tpu"),
    (["summary", "resnet18", "--input", "1x3"], "--input 1x3"),
    (["train", "--step-size", "0", "--schedule", "step"], "--step-size"),
    (["train", "--schedule", "onecycle", "--warmup-epochs", "1"], "--warmup-epochs"),
]


@pytest.mark.parametrize("arguments, words", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_inputs_end_in_one_line(arguments, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(arguments) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"numres {arguments[0]}: error:") and words in errors[0], errors
    assert not (tmp_path / "runs").exists()


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    """``numres ... | head -1``: no BrokenPipeError traceback, the status a shell gives other tools (141)."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["summary", "resnet18"]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
