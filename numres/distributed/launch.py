"""Starting a data-parallel job from inside numres (``numres train --nproc N``): find mpiexec, build its command.

``mpiexec -n N python -m numres ARGS`` starts ``N`` copies of the command; each one sees the launcher's
variables (:data:`~numres.distributed.process_group.LAUNCHER_SIZE_VARIABLES`) and joins the job.
"""
from __future__ import annotations

import os
import shutil
import sys


def find_mpiexec() -> str:
    """The ``mpiexec`` next to this Python (the mpich wheel installs it there), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("mpiexec was not found: pip install 'numres[mpi]' installs mpi4py and MPICH's mpiexec")
    return found


def mpiexec_command(nproc: int, module_args) -> list:
    """``mpiexec -n nproc <this python> -m numres <module_args>``."""
    if nproc < 1:
        raise ValueError(f"the number of processes must be at least 1, got {nproc}")
    return [find_mpiexec(), "-n", str(nproc), sys.executable, "-m", "numres", *module_args]
