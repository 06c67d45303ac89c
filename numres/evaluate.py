"""``numres evaluate``: accuracy and confusion matrix of a training checkpoint on a dataset split.

    numres evaluate --checkpoint runs/digits-resnet20            # the run folder, or its checkpoint.npz
    numres evaluate --checkpoint run/checkpoint.npz --split train

The model, the dataset and its normalisation come from the checkpoint.  The
confusion matrix has one row per true class and one column per predicted class.
"""
from __future__ import annotations

import sys

import numpy as np

from .backend import BackendUnavailableError
from .data import DataLoader, load_dataset
from .io import load
from .training import build_model, check_checkpoint, checkpoint_file, evaluate_model


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="checkpoint.npz written by `numres train` (or its folder)")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="default: test")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: the one the run used)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], help="default: the run's backend")
    parser.add_argument("--batch-size", type=int, default=256)


def evaluate_checkpoint(path, split="test", data_dir=None, backend=None, batch_size=256) -> dict:
    """``{"loss", "acc", "confusion", "classes", "count", "path"}`` for the checkpoint at ``path``."""
    path = checkpoint_file(path)
    state = load(path)
    check_checkpoint(state, path)
    config = state["config"]
    backend = backend or config["backend"]
    dataset = load_dataset(config["dataset"], split, data_dir or config["data_dir"])
    if config.get("subset"):
        dataset = dataset.subset(config["subset"])
    classes = list(state["classes"])
    model, channels = build_model(config["model"], len(classes), dataset.channels, backend, config["dtype"])
    model.load_state_dict(state["model"])
    loader = DataLoader(dataset, batch_size, mean=state["mean"], std=state["std"], channels=channels,
                        backend=backend, dtype=config["dtype"])
    result = evaluate_model(model, loader, len(classes))
    result.update(classes=classes, count=len(dataset), path=path, epoch=int(state["epoch"]), model=config["model"],
                  dataset=config["dataset"])
    return result


def format_confusion(confusion, classes) -> str:
    """The matrix as text, with class names (or their first letters) as headers."""
    labels = [str(c) for c in classes]
    width = max(5, max(len(str(int(v))) for v in np.ravel(confusion)) + 1)
    short = [label[:width - 1] for label in labels]
    name_width = max(len(label) for label in labels)
    lines = [" " * (name_width + 2) + "predicted", " " * (name_width + 2) + "".join(f"{s:>{width}}" for s in short)]
    for label, row in zip(labels, confusion):
        lines.append(f"{label:>{name_width}}  " + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def run(args) -> int:
    try:
        result = evaluate_checkpoint(args.checkpoint, args.split, args.data_dir, args.backend, args.batch_size)
    except (ValueError, FileNotFoundError, KeyError, BackendUnavailableError) as exc:
        print(f"numres evaluate: error: {exc}", file=sys.stderr)
        return 2
    correct = int(np.trace(result["confusion"]))
    print(f"{result['model']} after {result['epoch']} epochs ({result['path']})")
    print(f"{result['dataset']} {args.split}: accuracy {result['acc']:.4f} ({correct}/{result['count']}), "
          f"loss {result['loss']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(result["confusion"], result["classes"]))
    return 0
