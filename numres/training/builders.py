"""The pieces of a run, built from its :class:`~numres.training.config.TrainConfig`: the model (with
``--weights`` loaded and ``--freeze-backbone`` applied), the data loaders, the optimizer and the schedule."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import init
from ..data import AUGMENTATION, DataLoader, ImageLoader, folder_datasets, load_dataset
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..io import load, load_weights
from ..models import resnet
from ..models.cifar import CIFAR_MODELS
from ..models.identify import check_weights_fit
from ..optim import SGD, Adam, AdamW
from ..optim.lr_scheduler import (CosineAnnealingLR, ExponentialLR, MultiStepLR, OneCycleLR, ReduceLROnPlateau, StepLR,
                                  linear_warmup)
from .checkpoints import CHECKPOINT_FORMAT, checkpoint_file
from .config import TrainConfig


def model_names() -> list:
    return list(CIFAR_MODELS) + [name for name in resnet.__all__ if name[0].islower()]


def build_model(name, num_classes, in_channels, backend="numpy", dtype="float32"):
    """``(model, channels it reads)``: a CIFAR net (any ``in_channels``) or an ImageNet ResNet (3 channels)."""
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes, in_channels=in_channels, backend=backend,
                                  dtype=dtype), in_channels
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


@dataclass
class RunParts:
    """What :func:`build_run` makes for a :class:`~numres.training.Trainer`."""

    classes: list
    mean: np.ndarray
    std: np.ndarray
    model: object
    train_loader: object
    test_loader: object
    input_shape: list | None = None     # folder runs: the (C, H, W) the model reads
    start_note: str = ""                # what --weights / --freeze-backbone did, for the user


def build_run(config: TrainConfig, resuming: bool = False) -> RunParts:
    """The data, the model (seeded by ``config.seed``) and the loaders of a run.

    Built-in datasets are normalised with their training split's statistics; a folder run reads
    ImageFolders with ImageNet's statistics.  ``resuming``: the checkpoint's weights will replace
    ``--weights``, so that file is not read."""
    if config.dataset == "folder":
        train, test = folder_datasets(config.data_dir, config.val_dir, config.val_fraction, config.seed,
                                      config.image_size, config.augment)
        if config.subset:
            train, test = (part.subset(range(min(config.subset, len(part)))) for part in (train, test))
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
        channels = 3
    else:
        train, test = (load_dataset(config.dataset, split, config.data_dir) for split in ("train", "test"))
        if config.subset:
            train, test = train.subset(config.subset), test.subset(config.subset)
        mean, std = train.channel_stats()
        channels = train.channels
    classes = list(train.classes)
    init.manual_seed(config.seed)
    model, channels = build_model(config.model, len(classes), channels, config.backend, config.dtype)
    start_note = _start_from_weights(model, config, classes, resuming)
    if config.dataset == "folder":
        common = dict(num_workers=config.workers, backend=config.backend, dtype=config.dtype)
        train_loader = ImageLoader(train, config.batch_size, shuffle=True, seed=config.seed,
                                   drop_last=len(train) >= config.batch_size, **common)
        test_loader = ImageLoader(test, config.eval_batch_size, **common)
        return RunParts(classes, mean, std, model, train_loader, test_loader,
                        [3, config.image_size, config.image_size], start_note)
    augment = AUGMENTATION[config.dataset] if config.augment else {}
    common = dict(mean=mean, std=std, channels=channels, backend=config.backend, dtype=config.dtype)
    train_loader = DataLoader(train, config.batch_size, shuffle=True, seed=config.seed, drop_last=True, **augment,
                              **common)
    return RunParts(classes, mean, std, model, train_loader, DataLoader(test, config.eval_batch_size, **common),
                    start_note=start_note)


def _start_from_weights(model, config, classes, resuming) -> str:
    """``--weights``: load them (all but an fc for other classes); ``--freeze-backbone``: train only the fc.
    Returns what was done, in words ("" when neither was asked for)."""
    note = ""
    if config.weights and not resuming:
        fresh = load_backbone(model, config.weights, config.model, classes)
        shown = os.path.relpath(config.weights)
        note = (f"starting from {config.weights if shown.startswith('..') else shown}: "
                + (f"every layer but a new fc for {len(classes)} classes" if fresh else "every layer, the fc included"))
    if config.freeze_backbone:
        if not hasattr(model, "fc"):
            raise ValueError(f"--freeze-backbone trains only the final fc layer, which {config.model} lacks")
        model.requires_grad_(False)
        model.fc.requires_grad_(True)
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        note += f"; backbone frozen, {trainable:,} parameters train"
    return note


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

