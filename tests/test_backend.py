"""Backends: to_numpy, conversions that keep memory layout, and the CuPy path (skipped without a GPU).

Tests taking the ``backend`` fixture run once on NumPy and once on CuPy; on a machine
without CuPy or a GPU the CuPy run is skipped with the reason.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from conftest import TOL, assert_close, to_torch
from numres import backend as B


def weight_storage_is_channels_last(conv):
    """The (O, I, kh, kw) weight is a view over contiguous (kh, kw, I, O) storage."""
    return conv.weight.data.transpose(2, 3, 1, 0).flags["C_CONTIGUOUS"]


def test_to_numpy_on_numpy_arrays_is_free():
    a = np.arange(6.0).reshape(2, 3)
    assert nr.to_numpy(a) is a
    assert nr.backend.to_numpy is nr.to_numpy
    np.testing.assert_array_equal(nr.to_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))


def test_backend_helpers():
    assert B.get_xp("numpy") is np and B.is_available("numpy") and not B.is_available("no-such-backend")
    assert B.backend_of(np.zeros(2)) == "numpy" and B.xp_of(np.zeros(2)) is np
    assert B.normalize_dtype(np.float32) == np.float32 and B.normalize_dtype("float64") == np.float64
    with pytest.raises(TypeError, match="expected an array"):
        B.backend_of([1, 2])


def test_convert_keeps_channels_last_layout():
    x = np.ascontiguousarray(np.random.default_rng(0).standard_normal((2, 4, 3, 5)).transpose(0, 2, 3, 1))
    x = x.transpose(0, 3, 1, 2)                                  # NCHW shape, NHWC memory
    y = B.convert(x, "numpy", np.float32)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.transpose(0, 2, 3, 1).flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_to_keeps_conv_weights_channels_last(dtype):
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=4, dtype="float32" if dtype == "float64" else "float64")
    convs = [m for m in model.modules() if isinstance(m, nr.nn.Conv2d)]
    assert all(weight_storage_is_channels_last(c) for c in convs)
    model.to(dtype=dtype)
    assert all(weight_storage_is_channels_last(c) and c.weight.data.dtype == dtype for c in convs)
    model.to("numpy")
    model.load_state_dict({k: np.array(v, order="C") for k, v in model.state_dict().items()})
    assert all(weight_storage_is_channels_last(c) for c in convs)


def test_outputs_are_channels_last():
    """Activations numres produces are NCHW-shaped views over NHWC memory (PyTorch's channels_last)."""
    conv = nr.nn.Conv2d(3, 4, 3, padding=1)
    y = conv(np.zeros((2, 3, 5, 5), np.float32))
    assert y.shape == (2, 4, 5, 5) and y.transpose(0, 2, 3, 1).flags["C_CONTIGUOUS"]


# --- both backends -----------------------------------------------------------------------------------

def test_layers_match_torch_on_each_backend(backend):
    """Conv2d, BatchNorm2d (fused ReLU), MaxPool2d and the loss on ``backend`` against PyTorch (CPU)."""
    rng = np.random.default_rng(1)
    where = dict(backend=backend, dtype="float64")
    x = rng.standard_normal((2, 3, 9, 7))
    layers = [(nr.nn.Conv2d(3, 4, 3, stride=2, padding=1, **where), torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)),
              (nr.nn.BatchNorm2d(3, **where), torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU())),
              (nr.nn.MaxPool2d(3, 2, 1, ceil_mode=True, **where), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))]
    for ours, theirs in layers:
        theirs = theirs.double()
        if isinstance(ours, nr.nn.Conv2d):
            ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        kwargs = {"relu": True} if isinstance(ours, nr.nn.BatchNorm2d) else {}
        x_t = to_torch(x, requires_grad=True)
        y_t = theirs(x_t)
        dy = rng.standard_normal(tuple(y_t.shape))
        y_t.backward(to_torch(dy))
        y = ours(B.asarray(x, backend), **kwargs)
        dx = ours.backward(B.asarray(dy, backend))
        assert B.backend_of(y) == backend and B.backend_of(dx) == backend
        assert_close(y, y_t, "float64", f"{type(ours).__name__} output")
        assert_close(dx, x_t.grad, "float64", f"{type(ours).__name__} dx")
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1)
    logits = rng.standard_normal((4, 6))
    target = np.array([0, 5, 2, 2])
    logits_t = to_torch(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(target), label_smoothing=0.1).backward()
    crit(B.asarray(logits, backend), B.asarray(target, backend))
    assert_close(crit.backward(), logits_t.grad, "float64", "dlogits")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resnet18_on_each_backend_matches_torch(backend, dtype):
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=10, dtype=dtype)
    R.randomize_batchnorms(model, 1)
    reference = R.build("resnet18", num_classes=10).to(torch.float64)      # the float64 truth for both dtypes
    R.load_numres_state(reference, model)
    model.to(backend)
    assert all(B.backend_of(p.data) == backend for p in model.parameters())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 64, 64)).astype(dtype)
    upstream = rng.standard_normal((2, 10)).astype(dtype)
    errors = R.model_parity(model, reference, x, upstream)
    bad = {k: v for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, bad


def test_model_to_backend_round_trip(backend):
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=5)
    state = {k: np.array(v) for k, v in model.state_dict().items()}
    model.to(backend).to("numpy").to(backend)
    assert model.backend == backend and all(m.backend == backend for m in model.modules())
    for key, value in model.state_dict().items():
        assert B.backend_of(value) == backend
        np.testing.assert_array_equal(nr.to_numpy(value), state[key], err_msg=key)
    assert all(weight_storage_is_channels_last(m) for m in model.modules() if isinstance(m, nr.nn.Conv2d))


def test_sgd_step_stays_on_backend(backend):
    nr.manual_seed(0)
    model = nr.nn.Sequential(nr.nn.Conv2d(3, 4, 3, backend=backend), nr.nn.BatchNorm2d(4, backend=backend),
                             nr.nn.AdaptiveAvgPool2d(1, backend=backend), nr.nn.Flatten(backend=backend),
                             nr.nn.Linear(4, 3, backend=backend))
    opt = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    crit = nr.nn.CrossEntropyLoss()
    xp = B.get_xp(backend)
    x = xp.asarray(np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32))
    before = [nr.to_numpy(p.data).copy() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        crit(model(x), xp.asarray(np.array([0, 2])))
        model.backward(crit.backward())
        opt.step()
    for p, old in zip(model.parameters(), before):
        assert B.backend_of(p.data) == backend and p.data.dtype == np.float32
        assert not np.array_equal(nr.to_numpy(p.data), old)
    for state in opt.state_dict()["state"].values():
        assert B.backend_of(state["momentum_buffer"]) == backend


def test_to_numpy_copies_off_the_device(backend):
    xp = B.get_xp(backend)
    a = xp.arange(4, dtype=xp.float32)
    host = nr.to_numpy(a)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, np.arange(4, dtype=np.float32))


@pytest.mark.gpu
def test_arrays_of_the_other_backend_are_refused(cupy_backend):
    """A NumPy array into a CuPy layer and a CuPy array into a NumPy layer: TypeErrors naming the backend."""
    xp = B.get_xp(cupy_backend)
    with pytest.raises(TypeError, match=f"backend '{cupy_backend}'"):
        nr.nn.Conv2d(3, 2, 1, backend=cupy_backend)(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(TypeError, match="backend 'numpy'"):
        nr.nn.Conv2d(3, 2, 1)(xp.zeros((1, 3, 2, 2), dtype=xp.float32))


# --- PyTorch's device names ---------------------------------------------------------------------------

def _gpu_present():
    return B.is_available("cupy")


def test_device_names_are_aliases_of_the_backends():
    assert B.normalize_backend("cpu") == "numpy" and B.normalize_backend("numpy") == "numpy"
    assert B.normalize_backend("cuda") == "cupy" and B.normalize_backend("cupy") == "cupy"
    assert B.normalize_backend(torch.device("cpu")) == "numpy"
    assert B.get_xp("cpu") is np
    assert B.convert(np.zeros((2, 3)), "cpu", "float32").dtype == np.float32
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*'cpu' and 'cuda' are aliases"):
        B.normalize_backend("gpu")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        B.normalize_backend("cuda:x")
    with pytest.raises(TypeError, match="named by a string"):
        B.normalize_backend(0)


def test_cuda_index_must_be_cupys_current_device(monkeypatch):
    """``cuda:N`` maps to backend 'cupy' only for the GPU CuPy computes on (here a stand-in CuPy on device 0)."""
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(id=0)))
    monkeypatch.setitem(B._LOADERS, "cupy", lambda: fake_cupy)
    monkeypatch.setattr(B, "_MODULES", {k: v for k, v in B._MODULES.items() if k != "cupy"})   # restored after
    assert B.normalize_backend("cuda:0") == "cupy"
    assert B.normalize_backend(torch.device("cuda:0")) == "cupy"
    with pytest.raises(ValueError, match=r"current GPU, which is cuda:0; select GPU 1 first with "
                                         r"cupy.cuda.Device\(1\).use\(\)"):
        B.normalize_backend("cuda:1")


@pytest.mark.skipif(_gpu_present(), reason="checks the message given where there is no GPU")
def test_cuda_without_a_gpu_says_what_is_missing():
    model = nr.nn.Linear(3, 2)
    for move in (lambda: model.cuda(), lambda: model.to("cuda"), lambda: model.to("cuda:0"),
                 lambda: model.cuda(0), lambda: nr.resnet18(backend="cuda"),
                 lambda: nr.nn.Conv2d(3, 2, 1, backend="cuda")):
        with pytest.raises(B.BackendUnavailableError, match="backend 'cupy'"):
            move()
    assert model.backend == "numpy" and isinstance(model.weight.data, np.ndarray)       # nothing half-moved


def test_constructors_take_device_names():
    nr.manual_seed(0)
    models = [nr.resnet18(num_classes=3, backend="cpu"), nr.models.cifar.resnet20(backend="cpu"),
              nr.nn.Conv2d(3, 4, 3, backend="cpu"), nr.nn.BatchNorm2d(4, backend="cpu"),
              nr.nn.Linear(3, 2, backend="cpu"), nr.nn.Sequential(nr.nn.ReLU(backend="cpu"))]
    for model in models:
        assert all(m.backend == "numpy" for m in model.modules()), type(model).__name__
        assert all(isinstance(p.data, np.ndarray) for p in model.parameters())
    if _gpu_present():
        model = nr.resnet18(num_classes=3, backend="cuda")
        assert all(m.backend == "cupy" for m in model.modules())


def test_to_takes_a_device_or_a_dtype_positionally_as_torch_does():
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=3)
    values = {k: np.array(v, dtype=np.float64) for k, v in model.state_dict().items()}

    def check(dtype):
        assert model.backend == "numpy" and all(m.backend == "numpy" and m.dtype == dtype for m in model.modules())
        for key, value in model.state_dict().items():
            assert value.dtype == (np.int64 if key.endswith("num_batches_tracked") else dtype), key
            np.testing.assert_array_equal(value.astype(np.float64), values[key].astype(dtype), err_msg=key)

    assert model.to("float64") is model
    check(np.float64)
    model.to(np.float32)
    check(np.float32)
    model.to("cpu", "float64")
    check(np.float64)
    model.to(torch.float32)
    check(np.float32)
    model.to(device="cpu", dtype=np.dtype("float64"))
    check(np.float64)
    model.float().cpu()
    check(np.float32)
    model.double()
    check(np.float64)
    assert all(weight_storage_is_channels_last(c) for c in model.modules() if isinstance(c, nr.nn.Conv2d))


def test_to_refuses_what_it_cannot_read():
    model = nr.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown backend 'gpu', and not a dtype either"):
        model.to("gpu")
    with pytest.raises(ValueError, match="'float' is ambiguous"):
        model.to("float")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        model.to("int8")
    with pytest.raises(TypeError, match="two backends"):
        model.to("cpu", "numpy")
    with pytest.raises(TypeError, match="two dtypes"):
        model.to("float32", dtype="float64")
    with pytest.raises(TypeError, match="both backend= and device="):
        model.to(backend="numpy", device="cpu")
    with pytest.raises(ValueError, match="'float' is ambiguous"):
        nr.nn.Linear(3, 2, dtype="float")
    assert model.dtype == np.float32 and model.weight.data.dtype == np.float32
