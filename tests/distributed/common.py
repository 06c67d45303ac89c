"""Shared by the scripts that tests/test_distributed.py launches with ``mpiexec -n 2``.

Each script writes one JSON document of measured numbers (rank 0 only) to the path given as its
first argument; the pytest side asserts on it.  Nothing here asserts.  The error measure is
tests/error_measure.py's: NaN and infinity are failures (``inf``), on any rank.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))            # tests/ (torch_reference)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root

import numpy as np  # noqa: E402,F401

from error_measure import max_error, rel_err, worst  # noqa: E402,F401  (the suite's one measure)


def gathered_worst(comm, errors: dict) -> dict:
    """``{name: worst error over the ranks}`` (an allgather); a NaN on any rank counts as ``inf``."""
    gathered = comm.allgather(errors)
    names = list(errors)
    if any(list(e) != names for e in gathered):
        raise RuntimeError("the ranks compared different tensors")
    return {name: max_error(e[name] for e in gathered) for name in names}


def write_result(path, result, rank):
    if rank == 0:
        with open(path + ".tmp", "w") as handle:
            json.dump(result, handle, indent=1)
        os.replace(path + ".tmp", path)
