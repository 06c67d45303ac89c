"""The library behind ``numres train`` and ``numres evaluate``, room by room.

==================  =====================================================================================
``config.py``       :class:`TrainConfig`: everything that defines a run, checked when it is made
``builders.py``     the model (``--weights``, ``--freeze-backbone``), the loaders, the optimizer, the schedule
``trainer.py``      :class:`Trainer`: the loop (steps, an evaluation per epoch, what gets written)
``checkpoints.py``  ``checkpoint.npz``: what it holds, exact resume, the data folders it names
``evaluation.py``   loss, accuracy and confusion matrix of a model or of a saved run
``metrics.py``      the epoch's running sums, ``metrics.csv`` / ``metrics.json``
``curves.py``       ``curves.png``
``nonfinite.py``    a NaN or infinite loss: the first layer whose output went non-finite
``signals.py``      Ctrl-C: finish the step, write a checkpoint, stop
``progress.py``     the progress bar
==================  =====================================================================================

Everything public is importable from ``numres.training`` itself, as before the split.
"""
from .builders import (RunParts, build_model, build_optimizer, build_run, build_schedule, load_backbone,
                       model_names)
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_checkpoint, checkpoint_file, restore_trainer,
                          resume_config, run_data_path, trainer_state)
from .config import (DEFAULT_GAMMA, DEFAULT_LR, OPTIMIZERS, PER_BATCH_SCHEDULES, SCHEDULES, ConfigError,
                     TrainConfig)
from .curves import write_curves
from .evaluation import evaluate_checkpoint, evaluate_model
from .metrics import METRIC_FIELDS, EpochTotals, write_metrics
from .nonfinite import NonFiniteLossError, describe_nonfinite, locate_nonfinite
from .trainer import Trainer

__all__ = ["TrainConfig", "ConfigError", "SCHEDULES", "PER_BATCH_SCHEDULES", "DEFAULT_GAMMA", "OPTIMIZERS",
           "DEFAULT_LR", "Trainer", "RunParts", "build_run", "build_model", "model_names", "load_backbone",
           "build_optimizer", "build_schedule", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "checkpoint_file",
           "check_checkpoint", "run_data_path", "trainer_state", "restore_trainer", "resume_config",
           "evaluate_model", "evaluate_checkpoint", "METRIC_FIELDS", "EpochTotals", "write_metrics", "write_curves",
           "NonFiniteLossError", "locate_nonfinite", "describe_nonfinite"]
