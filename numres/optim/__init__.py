"""Optimizers."""
from .adam import Adam, AdamW
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]

from . import lr_scheduler  # noqa: E402

__all__ += ["lr_scheduler"]
