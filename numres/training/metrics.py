"""The numbers of a run: the running sums of an epoch, and ``metrics.csv`` / ``metrics.json``."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from ..io import atomic_write

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                 "images_per_second")


@dataclass
class EpochTotals:
    """The running sums of the current epoch (saved in checkpoints, so a resumed epoch reports whole)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


def write_metrics(history, out_dir):
    """``metrics.csv`` and ``metrics.json`` with one record per epoch (rewritten whole, atomically)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: record[key] for key in METRIC_FIELDS} for record in history)
    atomic_write(os.path.join(out_dir, "metrics.csv"), lambda stream: stream.write(text.getvalue().encode()))
    payload = json.dumps(history, indent=1).encode()
    atomic_write(os.path.join(out_dir, "metrics.json"), lambda stream: stream.write(payload))

