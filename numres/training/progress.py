"""The progress bar of an epoch (tqdm on stderr, when installed)."""
from __future__ import annotations

import sys


def progress_bar(total, done, description, enabled):
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc=description, unit="batch", leave=False, file=sys.stderr,
                dynamic_ncols=True)

