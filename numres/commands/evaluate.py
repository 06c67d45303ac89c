"""``numres evaluate``: accuracy and confusion matrix of a training checkpoint on a dataset split.

    numres evaluate --checkpoint runs/digits-resnet20            # the run folder, or its checkpoint.npz
    numres evaluate --checkpoint run/checkpoint.npz --split train

The model, the dataset and its normalisation come from the checkpoint.  The
confusion matrix has one row per true class and one column per predicted class.
"""
from __future__ import annotations

import numpy as np

from ..training import evaluate_checkpoint
from . import UsageError


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="checkpoint.npz written by `numres train` (or its folder)")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="default: test")
    parser.add_argument("--data-dir", help="the run's data folder, if it has moved: CIFAR-10's folder, or the image "
                                           "folder of a --dataset folder run (default: the folder the run used)")
    parser.add_argument("--val-dir", help="a folder run's validation folder, if it has moved (default: the run's)")
    parser.add_argument("--backend", help="numpy (cpu) or cupy (cuda); default: the run's backend")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256); "
                                                                     "only memory and speed depend on it")


def format_confusion(confusion, classes) -> str:
    """The matrix as text, with the class names, whole, as row and column headers."""
    labels = [str(c) for c in classes]
    width = max(5, max(len(str(int(v))) for v in np.ravel(confusion)) + 1, max(len(label) for label in labels) + 2)
    name_width = max(len(label) for label in labels)
    lines = [" " * (name_width + 2) + "predicted", " " * (name_width + 2) + "".join(f"{s:>{width}}" for s in labels)]
    for label, row in zip(labels, confusion):
        lines.append(f"{label:>{name_width}}  " + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def trained_for(epochs: int, steps: int, steps_per_epoch: int | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"2 epochs and 12 steps"``: how long a checkpoint was trained."""
    text = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    if steps:
        text += f" and {steps} step{'' if steps == 1 else 's'}"
        if steps_per_epoch:
            text += f" (of {steps_per_epoch}) of epoch {epochs + 1}"
    return text


def run(args) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    result = evaluate_checkpoint(args.checkpoint, args.split, args.data_dir, args.backend, args.batch_size,
                                 val_dir=args.val_dir)
    correct = int(np.trace(result["confusion"]))
    print(f"{result['model']} after {trained_for(result['epoch'], result['step_in_epoch'])} ({result['path']})")
    print(f"{result['dataset']} {args.split}: accuracy {result['acc']:.4f} ({correct}/{result['count']}), "
          f"loss {result['loss']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(result["confusion"], result["classes"]))
    return 0
