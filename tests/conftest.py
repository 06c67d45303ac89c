"""Shared helpers for the numres test suite.

* :func:`rel_err` is *the* error measure of the suite: ``max|a - b| / max|b|`` per tensor,
  with ``b`` the PyTorch reference (defined in torch_reference.py, which the benchmark shares).
* ``TOL`` holds the thresholds the issue fixes: 1e-10 in float64, 1e-4 in float32.
* :func:`to_torch` / :func:`from_torch` move arrays between numres and PyTorch (CPU).
* The ``backend`` fixture runs a test on NumPy and on CuPy, skipping CuPy cleanly
  where it is not installed or no GPU is visible.
* Hypothesis runs derandomized, with no deadline, so CI is reproducible.
"""
from __future__ import annotations

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
