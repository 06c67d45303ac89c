"""The training loop: epochs of steps, an evaluation after each, and what the run writes.

One step on a batch ``(x, y)`` is::

    logits = model(x); loss = criterion(logits, y)            # forward
    model.backward(criterion.backward())                       # hand-written backward, fills p.grad
    check that loss is finite                                   # else find the layer (nonfinite.py) and stop
    optimizer.step(); optimizer.zero_grad()

After every epoch the model is evaluated on the test split, and rank 0 writes, each file atomically,
``checkpoint.npz`` (checkpoints.py), ``metrics.csv`` / ``metrics.json`` (metrics.py) and ``curves.png``
(curves.py).  Ctrl-C (signals.py) lets the current step finish and writes a checkpoint of that position.

**Many processes** (``mpiexec -n N numres train``, or ``--nproc N``).  Every rank draws the same
global batch of ``batch_size`` images and trains on its contiguous block of ``batch_size / N`` rows
(:class:`~numres.data.RankBatches`) through :class:`~numres.nn.parallel.DistributedDataParallel`,
so the data order, the augmentation and the resume point are those of a one-process run.  The loss
and accuracy of each step, and the evaluation (each rank a part of every test batch), are summed over
the ranks.  Rank 0 alone prints and writes files.
"""
from __future__ import annotations

import inspect
import math
import os
import time
import warnings

import numpy as np

from .. import backend as B
from .. import distributed as dist
from ..data.sampler import local_part
from ..io import save
from ..nn import BatchNorm2d, CrossEntropyLoss
from ..nn.parallel import DistributedDataParallel
from .builders import build_optimizer, build_run, build_schedule
from .checkpoints import CHECKPOINT_NAME, restore_trainer, resume_config, trainer_state
from .config import PER_BATCH_SCHEDULES, TrainConfig
from .curves import write_curves
from .evaluation import evaluate_model
from .metrics import EpochTotals, write_metrics
from .nonfinite import NonFiniteLossError, describe_nonfinite, locate_nonfinite
from .progress import progress_bar
from .signals import catch_ctrl_c


class Trainer:
    """Owns a run: data, model, optimizer, schedule, position and history.  ``fit()`` trains it."""

    def __init__(self, config: TrainConfig, out_dir, *, progress=True, log=None, _resuming=False):
        self.config = config
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
        self.totals = EpochTotals()
        self.epoch_rng = None           # the loader's RNG state at the start of the current epoch
        self._stop = False
        self.curves_written = False     # curves.png needs matplotlib
        self.resume_notes = []          # what changed when a run was resumed with other settings
        self.command = None             # the command line that made the run (set by `numres train`)
        self.cwd = os.getcwd()          # where it was started
        self.previous_checkpoint = None     # --overwrite: the replaced run's checkpoint.prev.npz, gone at the 1st save

        parts = build_run(config, resuming=_resuming)
        self.classes, self.mean, self.std = parts.classes, parts.mean, parts.std
        self.model, self.input_shape, self.start_note = parts.model, parts.input_shape, parts.start_note
        self.train_loader, self.test_loader = parts.train_loader, parts.test_loader
        self.criterion = CrossEntropyLoss(label_smoothing=config.label_smoothing, backend=config.backend,
                                          dtype=config.dtype)
        self.optimizer = build_optimizer(self.model.parameters(), config)
        self.scheduler = build_schedule(self.optimizer, config, len(self.train_loader))
        self._skip_input_grad = "need_input_grad" in inspect.signature(self.model.backward).parameters
        # one process: the model itself; many: its DDP wrapper (checkpoints keep the model's own names)
        self.parallel_model = DistributedDataParallel(self.model) if self.world_size > 1 else self.model

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, CHECKPOINT_NAME)

    def state(self) -> dict:
        """The checkpoint: enough to evaluate the model, and to continue the run exactly."""
        return trainer_state(self)

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
        restore_trainer(self, state)

    def rebuild_schedule(self):
        """A fresh schedule for the current config (a resumed run with other epochs)."""
        self.scheduler = build_schedule(self.optimizer, self.config, len(self.train_loader))

    @classmethod
    def resume(cls, path, *, epochs=None, backend=None, data_dir=None, val_dir=None, out_dir=None, **kwargs):
        """A trainer continuing the run saved in ``path`` (a checkpoint, or the run's directory).

        ``data_dir`` / ``val_dir`` point the run at data that has moved since."""
        config, state, path = resume_config(path, epochs=epochs, backend=backend, data_dir=data_dir,
                                            val_dir=val_dir)
        trainer = cls(config, out_dir or os.path.dirname(os.path.abspath(path)), _resuming=True, **kwargs)
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
        with catch_ctrl_c(self), np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
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

    def _train_epoch(self, on_step) -> bool:
        """Run the rest of the current epoch; False if it was interrupted."""
        self.model.train()
        if self.config.freeze_backbone:     # a frozen backbone keeps its BatchNorm statistics too (eval mode)
            for module in self.model.modules():
                if isinstance(module, BatchNorm2d):      # SyncBatchNorm included
                    module.eval()
        loader = self.train_loader
        self.epoch_rng = loader.get_rng_state()
        number = self.epoch + 1
        bar = progress_bar(len(loader), self.step_in_epoch, f"epoch {number}/{self.config.epochs}", self.progress)
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
            stats = B.to_numpy(self.forward_backward(x, y))
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
        self.totals = EpochTotals()
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

