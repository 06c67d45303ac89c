"""Exceptions shared by several modules, kept here so that imports run one way.

:mod:`numres.io` (numres's ``.npz`` files) and :mod:`numres.torch_checkpoint` (PyTorch's ``.pth``
files) both report an unreadable file with :class:`CheckpointError`; ``io`` also calls the ``.pth``
reader, so the class lives in neither of them.
"""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A file is missing, truncated, or not in the expected format."""
