"""What defines a run: :class:`TrainConfig`, checked when it is made, and the names of its choices."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .. import backend as B

SCHEDULES = ("cosine", "multistep", "step", "exponential", "onecycle", "plateau")
PER_BATCH_SCHEDULES = ("onecycle",)         # stepped after every optimizer step; the others once per epoch
DEFAULT_GAMMA = {"exponential": 0.9}        # else 0.1 (multistep, step, plateau's factor)
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}


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

