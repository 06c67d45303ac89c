"""A run's checkpoint: what it holds, restoring a trainer from it, finding it, and the data it names.

``checkpoint.npz`` (written with ``numres.save``, no pickle) holds the model, optimizer and schedule,
the epoch/step position, the loader's and ``numres.init``'s RNG states, the metrics so far, the
classes and normalisation, and the command line that made the run.

**Exact resume.**  The loader draws each epoch's whole plan (order, crops, flips) from its generator
at the start of the epoch, so the checkpoint stores the generator state at the start of the current
epoch and the number of steps taken in it.  Resuming replays the plan and skips those steps; the
weights then evolve exactly as in an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import init
from ..io import load
from .config import TrainConfig
from .metrics import EpochTotals

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = "numres-train"


def checkpoint_file(path) -> str:
    """``path`` itself, or the checkpoint inside it when it is a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def check_checkpoint(state, path="checkpoint"):
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a numres training checkpoint (written by `numres train`)")


def run_data_path(path, state, what="data_dir"):
    """A run's data folder as it can be found from here: absolute as saved, or (older runs) relative to the
    directory the run was started in.  A missing folder is an error that says how to point at it."""
    if path is None:
        return None
    candidates = [path] if os.path.isabs(path) else [os.path.join(state.get("cwd") or os.getcwd(), path), path]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    option = "--" + what.replace("_", "-")
    raise FileNotFoundError(f"the run's {'validation' if what == 'val_dir' else 'data'} folder {candidates[0]} "
                            f"does not exist (moved or deleted?); point the run at it with {option} DIR")


def trainer_state(trainer) -> dict:
    """The checkpoint of ``trainer``: enough to evaluate the model, and to continue the run exactly."""
    mid_epoch = trainer.step_in_epoch > 0
    return {
        "format": CHECKPOINT_FORMAT, "version": 1,
        "config": dataclasses.asdict(trainer.config),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch, "global_step": trainer.global_step,
        "totals": dataclasses.asdict(trainer.totals),
        "loader_rng": trainer.epoch_rng if mid_epoch else trainer.train_loader.get_rng_state(),
        "init_rng": init.get_rng_state(),
        "classes": trainer.classes, "mean": trainer.mean, "std": trainer.std,
        "history": trainer.history,
        "command": trainer.command, "cwd": trainer.cwd,
        **({"input_shape": trainer.input_shape} if trainer.input_shape is not None else {}),
    }


def restore_trainer(trainer, state: dict) -> None:
    """Put ``trainer`` (its model and loaders already built) where the checkpoint ``state`` left off.

    A run resumed with other ``epochs`` gets its schedule recomputed for them at the saved position
    (``trainer.rebuild_schedule()``), and a note in ``trainer.resume_notes`` says what that changes."""
    check_checkpoint(state)
    config = trainer.config
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    saved = state["config"]
    if (saved["epochs"] == config.epochs and saved["warmup_epochs"] == config.warmup_epochs) \
            or config.schedule == "plateau":        # plateau's state does not depend on the epochs
        trainer.scheduler.load_state_dict(state["scheduler"])
    else:                       # a longer (or shorter) run: recompute the schedule at the saved position
        before = trainer.optimizer.param_groups[0]["lr"]
        trainer.rebuild_schedule()
        for _ in range(int(state["scheduler"]["last_epoch"])):
            trainer.scheduler.step()
        after = trainer.optimizer.param_groups[0]["lr"]
        trainer.resume_notes.append(
            f"the run had {saved['epochs']} epochs and now has {config.epochs}: the {config.schedule} "
            f"schedule is recomputed for {config.epochs} epochs, so at epoch {int(state['epoch']) + 1} "
            f"the lr is {after:.4g} where the old schedule had {before:.4g}")
    trainer.epoch, trainer.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
    trainer.global_step = int(state["global_step"])
    trainer.totals = EpochTotals(**state["totals"])
    trainer.train_loader.set_rng_state(state["loader_rng"])
    init.set_rng_state(state["init_rng"])
    trainer.history = list(state["history"])
    trainer.command, trainer.cwd = state.get("command"), state.get("cwd")
    trainer.mean, trainer.std = np.asarray(state["mean"]), np.asarray(state["std"])


def resume_config(path, *, epochs=None, backend=None, data_dir=None, val_dir=None) -> tuple:
    """``(config, state, checkpoint path)`` of the run saved at ``path`` (a checkpoint or its run folder),
    with the settings a resumed run may change; ``data_dir`` / ``val_dir`` point it at data that moved."""
    path = checkpoint_file(path)
    state = load(path)
    check_checkpoint(state, path)
    values = dict(state["config"])
    values.update({k: v for k, v in dict(epochs=epochs, backend=backend, data_dir=data_dir,
                                         val_dir=val_dir).items() if v is not None})
    if data_dir is None:
        values["data_dir"] = run_data_path(values.get("data_dir"), state)
    if val_dir is None:
        values["val_dir"] = run_data_path(values.get("val_dir"), state, "val_dir")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known}), state, path
