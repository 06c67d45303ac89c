"""Loss, accuracy and confusion matrix: of a model on a loader, or of a saved run on a dataset split."""
from __future__ import annotations

import os

import numpy as np

from .. import backend as B
from .. import distributed as dist
from ..data import DataLoader, ImageLoader, folder_datasets, load_dataset
from ..data.sampler import RankBatches
from ..io import load
from ..nn import CrossEntropyLoss, no_grad
from .builders import build_model
from .checkpoints import check_checkpoint, checkpoint_file, run_data_path


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
    confusion = np.rint(B.to_numpy(confusion)).astype(np.int64)
    total = max(int(confusion.sum()), 1)
    return {"loss": float(B.to_numpy(loss_sum)) / total, "acc": float(np.trace(confusion)) / total,
            "confusion": confusion}


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

