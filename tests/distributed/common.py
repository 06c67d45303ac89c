"""Shared by the scripts that tests/test_distributed.py launches with ``mpiexec -n 2``.

Each script writes one JSON document of measured numbers (rank 0 only) to the path given as its
first argument; the pytest side asserts on it.  Nothing here asserts.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))            # tests/ (torch_reference)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root

import numpy as np  # noqa: E402


def rel_err(actual, expected) -> float:
    """``max|a - b| / max|b|``, the suite's measure (see tests/torch_reference.py)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = np.abs(b).max(initial=0.0)
    diff = np.abs(a - b).max(initial=0.0)
    return float(diff / scale) if scale else float(diff)


def write_result(path, result, rank):
    if rank == 0:
        with open(path + ".tmp", "w") as handle:
            json.dump(result, handle, indent=1)
        os.replace(path + ".tmp", path)


def worst(errors: dict) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]
