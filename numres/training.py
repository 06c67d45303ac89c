"""The training loop behind ``numres train``: epochs, evaluation, checkpoints, metrics, curves.

One step on a batch ``(x, y)`` is::

    logits = model(x); loss = criterion(logits, y)            # forward
    model.backward(criterion.backward())                       # hand-written backward, fills p.grad
    check that loss is finite                                   # else find the layer (see below) and stop
    optimizer.step(); optimizer.zero_grad()

After every epoch the model is evaluated on the test split, and the run writes into
its output directory, each file atomically (a crash never leaves half a file):

* ``checkpoint.npz`` - model, optimizer, schedule, epoch/step position, the loader's
  and ``numres.init``'s RNG states and the metrics so far (``numres.save``, no pickle);
* ``metrics.csv`` and ``metrics.json`` - one record per epoch;
* ``curves.png`` - loss and accuracy curves, when matplotlib is installed.

**Exact resume.**  The loader draws each epoch's whole plan (order, crops, flips) from
its generator at the start of the epoch, so the checkpoint stores the generator state
at the start of the current epoch and the number of steps taken in it.  Resuming
replays the plan and skips those steps; the weights then evolve exactly as in an
uninterrupted run.  Ctrl-C sets a flag, the current step finishes, and a checkpoint
of that position is written (a second Ctrl-C stops at once, without one).

**Many processes** (``mpiexec -n N numres train``, or ``--nproc N``).  Every rank draws the same
global batch of ``batch_size`` images and trains on its contiguous block of ``batch_size / N`` rows
(:class:`~numres.data.RankBatches`) through :class:`~numres.nn.parallel.DistributedDataParallel`,
so the data order, the augmentation and the resume point are those of a one-process run.  The loss
and accuracy of each step, and the evaluation (each rank a part of every test batch), are summed over
the ranks.  Rank 0 alone prints and writes files.

**Non-finite loss.**  The failing batch is run forward again with a forward hook on
every module; the first module (in execution order) whose output holds NaN or
infinity is named in the :class:`NonFiniteLossError`, with the step number and any
parameters that are already non-finite.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

from . import backend as B
from . import distributed as dist
from . import init
from .data import AUGMENTATION, DataLoader, ImageLoader, folder_datasets, load_dataset
from .data.sampler import RankBatches, local_part
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .io import atomic_write, load, load_weights, save
from .models.cifar import CIFAR_MODELS
from .models.identify import check_weights_fit
from .nn import BatchNorm2d, CrossEntropyLoss, no_grad
from .nn.parallel import DistributedDataParallel
from .optim import SGD, Adam, AdamW
from .optim.lr_scheduler import (CosineAnnealingLR, ExponentialLR, MultiStepLR, OneCycleLR, ReduceLROnPlateau, StepLR,
                                 linear_warmup)

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = "numres-train"
SCHEDULES = ("cosine", "multistep", "step", "exponential", "onecycle", "plateau")
PER_BATCH_SCHEDULES = ("onecycle",)         # stepped after every optimizer step; the others once per epoch
DEFAULT_GAMMA = {"exponential": 0.9}        # else 0.1 (multistep, step, plateau's factor)
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                 "images_per_second")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the first non-finite layer."""


class ConfigError(ValueError):
    """A bad :class:`TrainConfig` value; ``field`` names it (the command line turns it into ``--option``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.detail = field, message


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in its checkpoints).  Defaults: the README's digits run."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float | None = None                 # default: 0.1 for SGD, 0.001 for Adam and AdamW
    schedule: str = "cosine"
    milestones: list | None = None          # multistep: default at 50% and 75% of the epochs (the paper's)
    gamma: float | None = None              # multistep/step/plateau: 0.1; exponential: 0.9 (per epoch)
    step_size: int | None = None            # step: epochs between cuts (default: a third of the epochs)
    patience: int = 10                      # plateau: epochs without a lower test loss before a cut
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    momentum: float = 0.9                   # SGD only
    weight_decay: float = 5e-4              # L2 for SGD and Adam, decoupled for AdamW
    nesterov: bool = False                  # SGD only
    label_smoothing: float = 0.0
    seed: int = 0
    backend: str = "numpy"
    dtype: str = "float32"
    augment: bool = True
    subset: int | None = None               # use only the first N train and test images (quick checks)
    eval_batch_size: int = 256
    # --dataset folder: your own images (root/<class>/<image>), optionally fine-tuning given weights
    val_dir: str | None = None              # the validation folder; else a seeded split of data_dir
    val_fraction: float = 0.2
    image_size: int = 224                   # the crop the model sees
    workers: int = 0                        # loader processes decoding and augmenting
    weights: str | None = None              # a torchvision .pth or numres weights/checkpoint to start from
    freeze_backbone: bool = False           # train only the new fc

    def __post_init__(self):
        self.backend = B.normalize_backend(self.backend)       # "cpu" / "cuda" name the numpy / cupy backends
        for name in ("data_dir", "val_dir", "weights"):         # absolute: the run works from any directory
            if getattr(self, name) is not None:
                setattr(self, name, os.path.abspath(os.path.expanduser(os.fspath(getattr(self, name)))))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.gamma is None:
            self.gamma = DEFAULT_GAMMA.get(self.schedule, 0.1)
        if self.step_size is None:
            self.step_size = max(1, self.epochs // 3)
        if self.step_size < 1:
            raise ConfigError("step_size", f"must be at least 1, got {self.step_size}")
        if self.patience < 0:
            raise ConfigError("patience", f"must be at least 0, got {self.patience}")
        if self.schedule in ("onecycle", "plateau") and self.warmup_epochs:
            raise ConfigError("warmup_epochs", f"does not combine with the {self.schedule} schedule"
                                               + (" (it warms up itself)" if self.schedule == "onecycle" else ""))
        if self.schedule == "plateau" and self.gamma >= 1:
            raise ConfigError("gamma", f"is plateau's factor and must be below 1, got {self.gamma}")
        for name in ("epochs", "batch_size", "eval_batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "gamma", "label_smoothing", "warmup_start_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"must be a finite number >= 0, got {value}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if self.label_smoothing > 1:
            raise ConfigError("label_smoothing", f"must be in [0, 1], got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", f"must be in 0..epochs-1, got {self.warmup_epochs} "
                                               f"for {self.epochs} epochs")
        if self.subset is not None and self.subset < 1:
            raise ConfigError("subset", f"must be positive, got {self.subset}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be at least 0, got {self.workers}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.freeze_backbone and not self.weights:
            raise ConfigError("freeze_backbone", "needs weights to freeze (--weights FILE): a frozen random "
                                                 "backbone gives the new fc nothing to learn from")
        if self.milestones is not None:
            self.milestones = sorted(int(m) for m in self.milestones)
            if any(m < 1 for m in self.milestones):
                raise ConfigError("milestones", f"are epoch numbers >= 1, got {self.milestones}")
        elif self.schedule == "multistep":     # the paper's: at 50% and 75% of the run
            self.milestones = sorted({m for m in (self.epochs // 2, (3 * self.epochs) // 4) if 0 < m < self.epochs})

    def unreached_milestones(self) -> list:
        """Milestones at or past the last epoch: they change nothing unless the run is extended."""
        if self.schedule != "multistep":
            return list(self.milestones or [])
        return [m for m in self.milestones if m >= self.epochs]


# --- building the pieces ------------------------------------------------------------------------------

def model_names() -> list:
    from .models import resnet
    return list(CIFAR_MODELS) + [name for name in resnet.__all__ if name[0].islower()]


def build_model(name, num_classes, in_channels, backend="numpy", dtype="float32"):
    """``(model, channels it reads)``: a CIFAR net (any ``in_channels``) or an ImageNet ResNet (3 channels)."""
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes, in_channels=in_channels, backend=backend,
                                  dtype=dtype), in_channels
    from .models import resnet
    if name in resnet.__all__ and name[0].islower():
        return getattr(resnet, name)(num_classes=num_classes, backend=backend, dtype=dtype), 3
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")


def load_backbone(model, path, model_name=None, classes=None):
    """Load weights (a torchvision .pth, numres weights or a training checkpoint) into ``model``, except a
    classifier ``fc`` for other classes, which keeps its fresh initialisation (fine-tuning to new classes):
    an ``fc`` of another size, or that of a training checkpoint whose class names differ from ``classes``.

    Weights of another architecture, or of the same one with another input (a grey run's 1-channel stem
    into a colour model), are refused in one line that names both."""
    path = checkpoint_file(path) if os.path.isdir(path) else path        # a run folder: its checkpoint
    state = dict(load_weights(path))
    if classes is not None and _trained_classes(path) not in (None, [str(c) for c in classes]):
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        state.update((key, value.data) for key, value in model.named_parameters() if key.startswith("fc."))
    if model_name is not None:
        check_weights_fit(state, model_name, hint="use --model {name}")
    parameters = dict(model.named_parameters())
    for key in ("fc.weight", "fc.bias"):
        current = parameters.get(key)
        if key in state and current is not None and tuple(np.shape(state[key])) != tuple(current.data.shape):
            state[key] = current.data
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(np.shape(value)) != tuple(np.shape(expected[key])):
            raise ValueError(f"{path} does not fit this {model_name or type(model).__name__}: {key} has shape "
                             f"{tuple(np.shape(value))} in the file and {tuple(np.shape(expected[key]))} in the "
                             f"model" + (" (the weights were trained on images with another number of channels)"
                                         if key == "conv1.weight" else ""))
    fresh = [key for key, value in parameters.items() if key.startswith("fc.") and state.get(key) is value.data]
    model.load_state_dict(state)
    return fresh


def _trained_classes(path):
    """The class names of a numres training checkpoint, or None for any other weights file."""
    if not path.endswith(".npz"):
        return None
    state = load(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return [str(c) for c in state["classes"]]
    return None


def build_optimizer(parameters, config: TrainConfig):
    """SGD (momentum, nesterov) or Adam / AdamW (default betas and eps), with the run's lr and weight decay."""
    if config.optimizer == "sgd":
        return SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                   nesterov=config.nesterov)
    optimizer_class = Adam if config.optimizer == "adam" else AdamW
    return optimizer_class(parameters, lr=config.lr, weight_decay=config.weight_decay)


def build_schedule(optimizer, config: TrainConfig, steps_per_epoch: int = 1):
    """The configured schedule; a warm-up counts towards the epochs.

    ``onecycle`` (torch's OneCycleLR, peak ``lr``) is stepped after every batch, ``plateau`` (torch's
    ReduceLROnPlateau on the test loss) with the epoch's test loss, the others once per epoch."""
    remaining = config.epochs - config.warmup_epochs
    if config.schedule == "onecycle":
        return OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                          cycle_momentum="momentum" in optimizer.defaults and config.momentum > 0
                          or "betas" in optimizer.defaults)
    if config.schedule == "plateau":
        return ReduceLROnPlateau(optimizer, factor=config.gamma, patience=config.patience)
    if config.schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=remaining)
    elif config.schedule == "step":
        main = StepLR(optimizer, config.step_size, gamma=config.gamma)
    elif config.schedule == "exponential":
        main = ExponentialLR(optimizer, gamma=config.gamma)
    else:
        milestones = [m - config.warmup_epochs for m in config.milestones]
        main = MultiStepLR(optimizer, milestones, gamma=config.gamma)
    if config.warmup_epochs:
        return linear_warmup(optimizer, main, config.warmup_epochs, config.warmup_start_factor)
    return main


def _host(array):
    return B.to_numpy(array)


# --- finding where values went non-finite -------------------------------------------------------------

def locate_nonfinite(model, x) -> dict:
    """Run ``model`` forward on ``x`` with hooks; report the first module whose output is not finite.

    Returns ``{"input": bool, "layer": name or None, "layer_type": ..., "parameters": [names]}``.
    Children finish their forward before their parents, so the first hook to see a
    non-finite output belongs to the innermost module where the values went bad.
    """
    xp = B.xp_of(x)

    def finite(array):          # an explicit host read: this is the diagnosis, off the training path
        return bool(_host(xp.isfinite(array).all()))

    found = {"input": not finite(x), "layer": None, "layer_type": None,
             "parameters": [name for name, p in model.named_parameters() if not finite(p.data)]}

    def watch(name):
        def hook(module, inputs, output):
            if found["layer"] is None and not finite(output):
                found["layer"], found["layer_type"] = name or "(model)", type(module).__name__
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules()]
    try:
        with no_grad(), np.errstate(all="ignore"):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def describe_nonfinite(what, loss_value, where, found) -> str:
    """One sentence: what went non-finite, where in the run, and which layer (from :func:`locate_nonfinite`)."""
    text = f"{what} ({loss_value}) at {where}: "
    if found["input"]:
        text += "the input batch itself holds NaN or infinity"
    elif found["layer"]:
        text += f"values first went non-finite in layer '{found['layer']}' ({found['layer_type']})"
    else:
        text += "every layer's output is finite; the loss itself overflowed"
    if found["parameters"]:
        names = found["parameters"]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        text += f"; non-finite parameters: {shown}"
    return text + ". Try a lower --lr, a warm-up (--warmup-epochs) or float64."


# --- the trainer --------------------------------------------------------------------------------------

@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


class Trainer:
    """Owns a run: data, model, optimizer, schedule, position and history.  ``fit()`` trains it."""

    def __init__(self, config: TrainConfig, out_dir, *, progress=True, log=None, _resuming=False):
        self.config = config
        self._resuming = _resuming      # the checkpoint's weights replace --weights: that file is not read
        self.out_dir = os.fspath(out_dir)
        self.world_size, self.is_main = dist.get_world_size(), dist.is_main_process()
        if self.world_size > 1 and config.batch_size % self.world_size:
            raise ValueError(f"batch size {config.batch_size} does not split evenly over {self.world_size} processes "
                             f"(--batch-size is the global batch)")
        if self.world_size > 1 and config.backend == "cupy":
            dist.select_device()
        self.progress = progress and self.is_main
        self.log = (log or (lambda text: print(text, flush=True))) if self.is_main else (lambda text: None)
        self.history = []
        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # steps taken in the current (incomplete) epoch
        self.global_step = 0
        self.totals = _EpochTotals()
        self._epoch_rng = None
        self._stop = False
        self.curves_written = False     # curves.png needs matplotlib
        self.resume_notes = []          # what changed when a run was resumed with other settings
        self.start_note = ""            # what --weights / --freeze-backbone did, for the user
        self.command = None             # the command line that made the run (set by `numres train`)
        self.cwd = os.getcwd()          # where it was started
        self.previous_checkpoint = None     # --overwrite: the replaced run's checkpoint.prev.npz, gone at the 1st save

        if config.dataset == "folder":
            self._build_folder_run(config)
        else:
            train, test = (load_dataset(config.dataset, split, config.data_dir) for split in ("train", "test"))
            if config.subset:
                train, test = train.subset(config.subset), test.subset(config.subset)
            self.classes = list(train.classes)
            self.mean, self.std = train.channel_stats()
            init.manual_seed(config.seed)
            self.model, channels = build_model(config.model, len(self.classes), train.channels, config.backend,
                                               config.dtype)
            self._start_from_weights(config)
            augment = AUGMENTATION[config.dataset] if config.augment else {}
            common = dict(mean=self.mean, std=self.std, channels=channels, backend=config.backend,
                          dtype=config.dtype)
            self.train_loader = DataLoader(train, config.batch_size, shuffle=True, seed=config.seed,
                                           drop_last=True, **augment, **common)
            self.test_loader = DataLoader(test, config.eval_batch_size, **common)
        self.criterion = CrossEntropyLoss(label_smoothing=config.label_smoothing, backend=config.backend,
                                          dtype=config.dtype)
        self.optimizer = build_optimizer(self.model.parameters(), config)
        self.scheduler = build_schedule(self.optimizer, config, len(self.train_loader))
        self._skip_input_grad = "need_input_grad" in inspect.signature(self.model.backward).parameters
        # one process: the model itself; many: its DDP wrapper (checkpoints keep the model's own names)
        self.parallel_model = DistributedDataParallel(self.model) if self.world_size > 1 else self.model

    def _build_folder_run(self, config):
        """``--dataset folder``: ImageFolders, worker loaders, ImageNet statistics, optional weights and freezing."""
        train, test = folder_datasets(config.data_dir, config.val_dir, config.val_fraction, config.seed,
                                      config.image_size, config.augment)
        if config.subset:
            train, test = (part.subset(range(min(config.subset, len(part)))) for part in (train, test))
        self.classes = list(train.classes)
        self.mean, self.std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        self.input_shape = [3, config.image_size, config.image_size]
        init.manual_seed(config.seed)
        self.model, _ = build_model(config.model, len(self.classes), 3, config.backend, config.dtype)
        self._start_from_weights(config)
        common = dict(num_workers=config.workers, backend=config.backend, dtype=config.dtype)
        self.train_loader = ImageLoader(train, config.batch_size, shuffle=True, seed=config.seed,
                                        drop_last=len(train) >= config.batch_size, **common)
        self.test_loader = ImageLoader(test, config.eval_batch_size, **common)

    def _start_from_weights(self, config):
        """``--weights``: load them (all but an fc of another size); ``--freeze-backbone``: train only the fc."""
        if config.weights and not self._resuming:
            fresh = load_backbone(self.model, config.weights, config.model, self.classes)
            shown = os.path.relpath(config.weights)
            self.start_note = (f"starting from {config.weights if shown.startswith('..') else shown}: "
                               + (f"every layer but a new fc for {len(self.classes)} classes" if fresh else
                                  "every layer, the fc included"))
        if config.freeze_backbone:
            if not hasattr(self.model, "fc"):
                raise ValueError(f"--freeze-backbone trains only the final fc layer, which {config.model} lacks")
            self.model.requires_grad_(False)
            self.model.fc.requires_grad_(True)
            trainable = sum(p.size for p in self.model.parameters() if p.requires_grad)
            self.start_note += f"; backbone frozen, {trainable:,} parameters train"

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT_NAME)

    def state(self) -> dict:
        """The checkpoint: enough to evaluate the model, and to continue the run exactly."""
        mid_epoch = self.step_in_epoch > 0
        return {
            "format": CHECKPOINT_FORMAT, "version": 1,
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "totals": dataclasses.asdict(self.totals),
            "loader_rng": self._epoch_rng if mid_epoch else self.train_loader.get_rng_state(),
            "init_rng": init.get_rng_state(),
            "classes": self.classes, "mean": self.mean, "std": self.std,
            "history": self.history,
            "command": self.command, "cwd": self.cwd,
            **({"input_shape": self.input_shape} if hasattr(self, "input_shape") else {}),
        }

    def written_files(self) -> list:
        """The names of the files this run has written to :attr:`out_dir` so far."""
        names = [CHECKPOINT_NAME, "metrics.csv", "metrics.json"] if self.history else []
        if self.step_in_epoch and not self.history:
            names = [CHECKPOINT_NAME]
        return names + (["curves.png"] if self.curves_written else [])

    def save_checkpoint(self):
        if self.is_main:
            save(self.state(), self.checkpoint_path)
            if self.previous_checkpoint and os.path.exists(self.previous_checkpoint):
                os.remove(self.previous_checkpoint)     # the new run has a checkpoint of its own now
            self.previous_checkpoint = None

    def load_state(self, state: dict):
        """Continue from a checkpoint made by :meth:`state` (the model and loaders are already built)."""
        check_checkpoint(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state["config"]
        if (saved["epochs"] == self.config.epochs and saved["warmup_epochs"] == self.config.warmup_epochs) \
                or self.config.schedule == "plateau":       # plateau's state does not depend on the epochs
            self.scheduler.load_state_dict(state["scheduler"])
        else:                       # a longer (or shorter) run: recompute the schedule at the saved position
            before = self.optimizer.param_groups[0]["lr"]
            self.scheduler = build_schedule(self.optimizer, self.config, len(self.train_loader))
            for _ in range(int(state["scheduler"]["last_epoch"])):
                self.scheduler.step()
            after = self.optimizer.param_groups[0]["lr"]
            self.resume_notes.append(
                f"the run had {saved['epochs']} epochs and now has {self.config.epochs}: the {self.config.schedule} "
                f"schedule is recomputed for {self.config.epochs} epochs, so at epoch {int(state['epoch']) + 1} "
                f"the lr is {after:.4g} where the old schedule had {before:.4g}")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.totals = _EpochTotals(**state["totals"])
        self.train_loader.set_rng_state(state["loader_rng"])
        init.set_rng_state(state["init_rng"])
        self.history = list(state["history"])
        self.command, self.cwd = state.get("command"), state.get("cwd")
        self.mean, self.std = np.asarray(state["mean"]), np.asarray(state["std"])

    @classmethod
    def resume(cls, path, *, epochs=None, backend=None, data_dir=None, val_dir=None, out_dir=None, **kwargs):
        """A trainer continuing the run saved in ``path`` (a checkpoint, or the run's directory).

        ``data_dir`` / ``val_dir`` point the run at data that has moved since."""
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
        trainer = cls(TrainConfig(**{k: v for k, v in values.items() if k in known}),
                      out_dir or os.path.dirname(os.path.abspath(path)), _resuming=True, **kwargs)
        trainer.load_state(state)
        return trainer

    # --- running ----------------------------------------------------------------------------------

    def fit(self, on_step=None) -> str:
        """Train until ``config.epochs``; returns "finished" or "interrupted" (after writing a checkpoint).

        ``on_step(trainer)`` is called after every optimizer step (tests use it to interrupt).
        """
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        # Overflow and NaN are detected and explained by the loop itself; NumPy's warnings would only repeat them.
        with self._catch_ctrl_c(), np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(overflow|invalid value) encountered", RuntimeWarning)
            while self.epoch < self.config.epochs:
                if self._stop or not self._train_epoch(on_step):
                    self.save_checkpoint()
                    self.log(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch}: checkpoint "
                             f"written to {self.checkpoint_path}; continue with --resume")
                    return "interrupted"
                self._end_epoch()
        return "finished"

    @contextlib.contextmanager
    def _catch_ctrl_c(self):
        """First Ctrl-C: finish the step, checkpoint, stop.  Second: stop at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            self.log("\nCtrl-C: finishing this step and writing a checkpoint (press again to quit at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _train_epoch(self, on_step) -> bool:
        """Run the rest of the current epoch; False if it was interrupted."""
        self.model.train()
        if self.config.freeze_backbone:     # a frozen backbone keeps its BatchNorm statistics too (eval mode)
            for module in self.model.modules():
                if isinstance(module, BatchNorm2d):      # SyncBatchNorm included
                    module.eval()
        loader = self.train_loader
        self._epoch_rng = loader.get_rng_state()
        number = self.epoch + 1
        bar = _progress(len(loader), self.step_in_epoch, f"epoch {number}/{self.config.epochs}", self.progress)
        started = time.perf_counter() - self.totals.seconds
        try:
            for x, y in loader.batches(start=self.step_in_epoch):
                loss, correct = self._step(x, y, number)
                self.step_in_epoch += 1
                self.global_step += 1
                self.totals.loss_sum += loss * len(y)
                self.totals.correct += correct
                self.totals.seen += len(y)
                self.totals.seconds = time.perf_counter() - started
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{self.totals.loss_sum / self.totals.seen:.4f}",
                                     "acc": f"{self.totals.correct / self.totals.seen:.4f}",
                                     "img/s": f"{self.totals.seen / max(self.totals.seconds, 1e-9):.0f}"},
                                    refresh=False)
                if on_step is not None:
                    on_step(self)
                if self._stop:
                    return False
        finally:
            if bar is not None:
                bar.refresh()
                bar.close()
        return True

    def _step(self, x, y, epoch_number):
        """One SGD step; returns the batch's loss and number of correct predictions (host numbers).

        Forward, backward and the optimizer step stay on the device; the one host read per
        step (loss and correct count together) sits between backward and the update, so a
        non-finite loss is caught before it can reach the weights.
        """
        try:
            stats = _host(self.forward_backward(x, y))
        except FloatingPointError:          # the NumPy backend's loss refuses non-finite values itself
            stats = None
        loss_value, correct = (float("nan"), 0) if stats is None else (float(stats[0]), int(stats[1]))
        if stats is not None and len(stats) > 2 and stats[2] > 0:
            self._stop = True                   # Ctrl-C reached some rank: all stop after this step
        if not math.isfinite(loss_value):
            found = locate_nonfinite(self.model, x)
            where = f"epoch {epoch_number}, step {self.step_in_epoch + 1} (global step {self.global_step + 1})"
            raise NonFiniteLossError(describe_nonfinite("non-finite loss", loss_value, where, found))
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.config.schedule in PER_BATCH_SCHEDULES:
            self._step_lr = self.optimizer.param_groups[0]["lr"]      # the lr this step used, for the metrics
            self.scheduler.step()
        return loss_value, correct

    def forward_backward(self, x, y):
        """Forward and backward, all on the device; returns the device pair ``[loss, number correct]``."""
        xp = B.xp_of(x)
        if self.world_size > 1:             # this rank's block of the global batch
            part = local_part(len(y))
            x, y = x[part], y[part]
        logits = self.parallel_model(x)
        loss = self.criterion(logits, y)
        if self._skip_input_grad:          # nobody needs dL/dx: skip the stem's input gradient
            self.parallel_model.backward(self.criterion.backward(), need_input_grad=False)
        else:
            self.parallel_model.backward(self.criterion.backward())
        correct = (logits.argmax(axis=1) == y).sum()
        if self.world_size == 1:
            return xp.stack([loss.astype(xp.float64), correct.astype(xp.float64)])
        # [global mean loss, global correct, stop requested on any rank]: one small allreduce per step
        stats = xp.stack([loss.astype(xp.float64) * len(y), correct.astype(xp.float64),
                          xp.asarray(float(self._stop), dtype=xp.float64)])
        dist.all_reduce(stats)
        stats[0] /= len(y) * self.world_size
        return stats

    def evaluate(self, loader=None) -> dict:
        """``{"loss", "acc", "confusion"}`` of the model in eval mode on ``loader`` (the test split by default)."""
        if self.world_size > 1:
            self.parallel_model.sync_buffers()      # every rank evaluates rank 0's model (BN running statistics)
        return evaluate_model(self.model, loader or self.test_loader, len(self.classes), self.criterion,
                              shard=self.world_size > 1)

    def _diagnose_evaluation(self, loss_value):
        """The test loss went non-finite (in eval mode, with the running statistics): find where, and stop."""
        x, _ = next(iter(self.test_loader))
        self.model.eval()
        try:
            found = locate_nonfinite(self.model, x)
        finally:
            self.model.train()
        where = (f"the evaluation after epoch {self.epoch + 1} (global step {self.global_step}; eval mode, "
                 f"with BatchNorm's running statistics)")
        raise NonFiniteLossError(describe_nonfinite("non-finite test loss", loss_value, where, found))

    def _end_epoch(self):
        # the lr the epoch used (per-batch schedules: that of its last step)
        lr = getattr(self, "_step_lr", None) if self.config.schedule in PER_BATCH_SCHEDULES else None
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        result = self.evaluate()
        if not math.isfinite(result["loss"]):
            self._diagnose_evaluation(result["loss"])
        totals = self.totals
        record = {"epoch": self.epoch + 1, "lr": lr, "train_loss": totals.loss_sum / max(totals.seen, 1),
                  "train_acc": totals.correct / max(totals.seen, 1), "test_loss": result["loss"],
                  "test_acc": result["acc"], "epoch_seconds": totals.seconds,
                  "images_per_second": totals.seen / max(totals.seconds, 1e-9)}
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.totals = _EpochTotals()
        if self.config.schedule == "plateau":
            self.scheduler.step(result["loss"])
        elif self.config.schedule not in PER_BATCH_SCHEDULES:
            self.scheduler.step()
        self.save_checkpoint()
        if self.is_main:
            write_metrics(self.history, self.out_dir)
            if write_curves(self.history, os.path.join(self.out_dir, "curves.png")):
                self.curves_written = True
        self.log(f"epoch {record['epoch']:>3}/{self.config.epochs}  lr {lr:.4g}  "
                 f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}  "
                 f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.4f}  "
                 f"{record['epoch_seconds']:.1f}s {record['images_per_second']:.0f} img/s")


def evaluate_model(model, loader, num_classes, criterion=None, shard=False) -> dict:
    """Mean loss, accuracy and confusion matrix (rows: true class, columns: predicted) in eval mode.

    ``shard=True`` in a job of many processes: each rank evaluates its block of every batch and the
    sums are added over the ranks, so every example counts exactly once."""
    criterion = criterion or CrossEntropyLoss(backend=model.backend, dtype=model.dtype)
    was_training = model.training
    model.eval()
    xp = model.xp
    confusion = xp.zeros((num_classes, num_classes), dtype=xp.float64)
    one_hot = xp.eye(num_classes, dtype=xp.float64)
    loss_sum = xp.zeros((), dtype=xp.float64)
    try:
        with no_grad():
            for x, y in (RankBatches(loader) if shard else loader):
                logits = model(x)
                with np.errstate(all="ignore"):
                    try:
                        loss = criterion(logits, y)
                    except FloatingPointError:
                        loss = xp.asarray(np.nan)
                loss_sum += loss.astype(xp.float64) * len(y)
                # counts[t, p] += #(true t, predicted p): one-hot(true)^T @ one-hot(pred), shape fixed on the device
                confusion += one_hot[y].T @ one_hot[logits.argmax(axis=1)]
    finally:
        model.train(was_training)
    if shard:
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    confusion = np.rint(_host(confusion)).astype(np.int64)
    total = max(int(confusion.sum()), 1)
    return {"loss": float(_host(loss_sum)) / total, "acc": float(np.trace(confusion)) / total,
            "confusion": confusion}


# --- files --------------------------------------------------------------------------------------------

def evaluate_checkpoint(path, split="test", data_dir=None, backend=None, batch_size=256, val_dir=None) -> dict:
    """``{"loss", "acc", "confusion", "classes", "count", "path"}`` for the checkpoint at ``path``.

    ``data_dir`` / ``val_dir`` replace the run's data folders (data that moved since the run)."""
    path = checkpoint_file(path)
    state = load(path)
    check_checkpoint(state, path)
    config = state["config"]
    backend = backend or config["backend"]
    classes = list(state["classes"])
    data_dir = os.path.abspath(data_dir) if data_dir else run_data_path(config["data_dir"], state)
    val_dir = os.path.abspath(val_dir) if val_dir else run_data_path(config.get("val_dir"), state, "val_dir")
    if config["dataset"] == "folder":      # the run's split, with the evaluation transform on both parts
        train, test = folder_datasets(data_dir, val_dir,
                                      config.get("val_fraction", 0.2), config["seed"], config["image_size"],
                                      augment=False)
        dataset = test if split == "test" else train
        if config.get("subset"):
            dataset = dataset.subset(range(min(config["subset"], len(dataset))))
        model, _ = build_model(config["model"], len(classes), 3, backend, config["dtype"])
        loader = ImageLoader(dataset, batch_size, num_workers=config.get("workers", 0), backend=backend,
                             dtype=config["dtype"])
    else:
        dataset = load_dataset(config["dataset"], split, data_dir)
        if config.get("subset"):
            dataset = dataset.subset(config["subset"])
        model, channels = build_model(config["model"], len(classes), dataset.channels, backend, config["dtype"])
        loader = DataLoader(dataset, batch_size, mean=state["mean"], std=state["std"], channels=channels,
                            backend=backend, dtype=config["dtype"])
    model.load_state_dict(state["model"])
    result = evaluate_model(model, loader, len(classes))
    result.update(classes=classes, count=len(dataset), path=path, epoch=int(state["epoch"]),
                  step_in_epoch=int(state["step_in_epoch"]), model=config["model"], dataset=config["dataset"])
    return result


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


def write_metrics(history, out_dir):
    """``metrics.csv`` and ``metrics.json`` with one record per epoch (rewritten whole, atomically)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: record[key] for key in METRIC_FIELDS} for record in history)
    atomic_write(os.path.join(out_dir, "metrics.csv"), lambda stream: stream.write(text.getvalue().encode()))
    payload = json.dumps(history, indent=1).encode()
    atomic_write(os.path.join(out_dir, "metrics.json"), lambda stream: stream.write(payload))


def write_curves(history, path) -> bool:
    """Loss and accuracy per epoch as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in ((left, "loss", "cross-entropy loss"), (right, "acc", "accuracy")):
        axis.plot(epochs, [r[f"train_{key}"] for r in history], marker=".", label="train")
        axis.plot(epochs, [r[f"test_{key}"] for r in history], marker=".", label="test")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    losses = [r[key] for r in history for key in ("train_loss", "test_loss")]
    if all(math.isfinite(v) and v > 0 for v in losses):
        left.set_yscale("log")      # a first epoch's loss of 10+ would otherwise flatten the rest
        left.set_title("cross-entropy loss (log scale)")
    figure.tight_layout()
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
    plt.close(figure)
    return True


def _progress(total, done, description, enabled):
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc=description, unit="batch", leave=False, file=sys.stderr,
                dynamic_ncols=True)
