"""Ctrl-C during training: the first finishes the step and writes a checkpoint, the second stops at once."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def catch_ctrl_c(trainer):
    """While active, a first SIGINT sets ``trainer._stop`` (the loop checkpoints and returns after
    the current step); a second raises KeyboardInterrupt.  Off the main thread (where Python cannot
    install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop:
            raise KeyboardInterrupt
        trainer._stop = True
        trainer.log("\nCtrl-C: finishing this step and writing a checkpoint (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
