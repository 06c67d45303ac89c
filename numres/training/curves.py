"""``curves.png``: loss (log scale) and accuracy per epoch, when matplotlib is installed."""
from __future__ import annotations

import math

from ..io import atomic_write


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

