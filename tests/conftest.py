"""Shared helpers for the numres test suite.

* :func:`rel_err` is *the* error measure of the suite: ``max|a - b| / max|b|`` per tensor,
  with ``b`` the PyTorch reference (defined in torch_reference.py, which the benchmark shares).
* ``TOL`` holds the thresholds the issue fixes: 1e-10 in float64, 1e-4 in float32.
* :func:`to_torch` / :func:`from_torch` move arrays between numres and PyTorch (CPU).
* The ``backend`` fixture runs a test on NumPy and on CuPy, skipping CuPy cleanly
  where it is not installed or no GPU is visible.
* Hypothesis runs derandomized, with no deadline, so CI is reproducible.
* ``NUMRES_REQUIRE`` (set by .ci/run to ``mpi,gxx``) turns the skip of a test that needs one of those
  tools into a failure, and checks the tools before any test runs: the ``test`` extra brings mpi4py and
  mpich, and the CI machine has g++, so such a skip there means a broken install, not a choice.  The
  GPU tests are not in that list: without a GPU they stay skipped.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import numres as nr
from torch_reference import rel_err  # noqa: F401  (the suite's one error measure)

settings.register_profile(
    "numres", deadline=None, derandomize=True, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("numres")

torch.set_num_threads(1)

TOL = {"float64": 1e-10, "float32": 1e-4}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def assert_close(actual, expected, dtype, what="tensor", tol=None):
    """Fail with the measured error when ``rel_err`` exceeds the suite's tolerance for ``dtype``."""
    limit = TOL[str(dtype)] if tol is None else tol
    error = rel_err(actual, expected)
    assert error < limit, f"{what}: relative error {error:.3e} exceeds {limit:.0e} ({dtype})"
    return error


def as_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return nr.backend.to_numpy(value)


def to_torch(array, requires_grad=False):
    """A float torch tensor with the values of ``array`` (a copy, contiguous)."""
    tensor = torch.from_numpy(np.array(as_numpy(array), order="C", copy=True))
    return tensor.requires_grad_(requires_grad)


def from_torch(tensor, backend="numpy", channels_last=False):
    """A numres array (on ``backend``) with the values of ``tensor``; optionally channels-last in memory."""
    array = tensor.detach().cpu().numpy().copy()
    if channels_last and array.ndim == 4:
        array = np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return nr.backend.convert(array, backend)


def copy_torch_params(torch_module, numres_module):
    """Copy every parameter and buffer of ``torch_module`` into ``numres_module`` by name.

    Assignment goes through ``[...] =`` so numres keeps its own layouts (Conv2d weights
    are PyTorch-shaped views over (kh, kw, in, out) storage).
    """
    state = {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}
    numres_module.load_state_dict(state)


def torch_grads(torch_module):
    return {name: p.grad for name, p in torch_module.named_parameters()}


def random_like_shape(rng, shape, dtype):
    """Standard normal values of ``shape`` in ``dtype`` (never all ones: hides BN bugs)."""
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _require_cupy():
    try:
        nr.backend.get_xp("cupy")
    except nr.backend.BackendUnavailableError as exc:
        pytest.skip(f"CuPy backend unavailable: {exc}")
    return "cupy"


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Each backend numres supports; CuPy is skipped where it (or a GPU) is absent."""
    return _require_cupy() if request.param == "cupy" else request.param


@pytest.fixture
def cupy_backend():
    """``"cupy"``, or a clean skip where CuPy or a GPU is absent."""
    return _require_cupy()


# --- tools the CI machine must have: a skip for want of them is a failure there ----------------------

def mpi_missing():
    """Why the MPI tests cannot run here (the reason their skip gives), or None when they can."""
    mpiexec = shutil.which("mpiexec") or shutil.which(str(Path(sys.executable).parent / "mpiexec"))
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        return "needs mpiexec and mpi4py (pip install 'numres[mpi]')"
    return None


def gxx_missing():
    """Why the g++-shim kernel tests cannot run here, or None when they can."""
    from numres.cuda import shim
    return None if shim.compiler() is not None else "g++ not installed"


# tool -> (its check, the text its tests' skip reasons contain)
REQUIRABLE = {"mpi": (mpi_missing, "needs mpiexec and mpi4py"), "gxx": (gxx_missing, "g++ not installed")}


def required_tools() -> list:
    names = [name.strip() for name in os.environ.get("NUMRES_REQUIRE", "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(REQUIRABLE))
    if unknown:
        raise pytest.UsageError(f"NUMRES_REQUIRE names unknown tools {unknown}; known: {sorted(REQUIRABLE)}")
    return names


def pytest_configure(config):
    missing = {name: REQUIRABLE[name][0]() for name in required_tools()}
    missing = {name: why for name, why in missing.items() if why}
    if missing:
        raise pytest.UsageError("NUMRES_REQUIRE: a broken install, these tests would be skipped: " +
                                "; ".join(f"{name}: {why}" for name, why in missing.items()))


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    for name in required_tools():
        if REQUIRABLE[name][1] in reason:
            report.outcome = "failed"
            report.longrepr = (f"skipped ({reason}), but NUMRES_REQUIRE lists {name!r}: CI requires these "
                               f"tests to run, so the skip means a broken install")
