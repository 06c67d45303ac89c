"""Optimizers."""
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Optimizer", "SGD"]

from . import lr_scheduler  # noqa: E402

__all__ += ["lr_scheduler"]
