"""Bad input gets a clear exception that names the problem, never a raw NumPy error or a silent broadcast."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import numres as nr
from numres import backend as B

RAW_NUMPY = ("could not be broadcast", "cannot reshape", "gufunc signature", "operands")


def raises_clearly(exc_type, *words):
    """Context manager: ``exc_type`` is raised, its message contains every word, and none of NumPy's own phrasing."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for word in words:
                assert word.lower() in message.lower(), f"message does not mention {word!r}: {message}"
            for phrase in RAW_NUMPY:
                assert phrase not in message, f"raw NumPy error: {message}"
            return handled
    return _Check()


@pytest.fixture(scope="module")
def model():
    nr.manual_seed(0)
    return nr.resnet18(num_classes=10)


def image(*shape, dtype="float32"):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


# --- rank, channels, dtype, backend of the input ------------------------------------------------------

@pytest.mark.parametrize("layer", [nr.nn.Conv2d(3, 4, 3), nr.nn.BatchNorm2d(3), nr.nn.MaxPool2d(2),
                                   nr.nn.AvgPool2d(2), nr.nn.AdaptiveAvgPool2d(1)], ids=lambda m: type(m).__name__)
def test_wrong_rank_for_a_layer(layer):
    with raises_clearly(ValueError, "4-D", "(1, 1, 3, 8, 8)"):
        layer(image(1, 1, 3, 8, 8))
    with raises_clearly(ValueError, "4-D", "(8, 8)"):
        layer(image(8, 8))
    if not layer.accepts_unbatched:          # PyTorch's BatchNorm2d refuses (C, H, W) too
        with raises_clearly(ValueError, "4-D", "(3, 8, 8)"):
            layer(image(3, 8, 8))


@pytest.mark.parametrize("dtype", ["uint8", "int64"])
def test_integer_input_suggests_the_float_dtype(dtype):
    """An image batch of integers is told to become floats, not to convert the model to an integer dtype."""
    for layer in (nr.nn.Conv2d(3, 4, 3), nr.nn.ReLU()):
        with raises_clearly(TypeError, "floating-point", dtype, ".astype('float32')") as info:
            layer(image(1, 3, 8, 8, dtype=dtype))
        assert ".to(dtype" not in str(info.value)


def test_wrong_rank_for_a_model(model):
    """(C, H, W) is one unbatched image, as in PyTorch (tests/test_habits.py); 2-D and 5-D are refused."""
    with raises_clearly(ValueError, "(32, 32)"):
        model(image(32, 32))
    with raises_clearly(ValueError, "4-D"):
        model(image(1, 1, 3, 32, 32))


def test_wrong_channel_count(model):
    with raises_clearly(ValueError, "3 channels", "got 1"):
        model(image(2, 1, 32, 32))
    with raises_clearly(ValueError, "channels"):
        nr.nn.BatchNorm2d(4)(image(2, 5, 3, 3))
    with raises_clearly(ValueError, "in_features=5"):
        nr.nn.Linear(5, 3)(image(2, 4))


def test_float64_input_into_float32_model(model):
    with raises_clearly(TypeError, "float32", "float64"):
        model(image(2, 3, 32, 32, dtype="float64"))
    with raises_clearly(TypeError, "int64"):
        nr.nn.Conv2d(3, 2, 1)(np.zeros((1, 3, 2, 2), dtype=np.int64))


@pytest.mark.parametrize("array", [torch.zeros(2, 3, 32, 32), np.zeros((2, 3, 32, 32), np.float32).tolist()],
                         ids=["torch.Tensor", "list"])
def test_non_numpy_array_into_numpy_model(model, array):
    with raises_clearly(TypeError, "numpy", type(array).__name__):
        model(array)


# --- backward before forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [nr.nn.Conv2d(3, 4, 3), nr.nn.BatchNorm2d(3), nr.nn.ReLU(), nr.nn.MaxPool2d(2),
                                   nr.nn.Linear(3, 2), nr.nn.Flatten(), nr.nn.CrossEntropyLoss()],
                         ids=lambda m: type(m).__name__)
def test_backward_before_forward_for_a_layer(layer):
    with raises_clearly(RuntimeError, "before forward", type(layer).__name__):
        layer.backward(image(2, 3, 4, 4))


def test_backward_before_forward_for_a_model():
    nr.manual_seed(0)
    with raises_clearly(RuntimeError, "before forward"):
        nr.resnet18(num_classes=10).backward(image(2, 10))


def test_backward_after_no_grad_forward(model):
    model.eval()
    with nr.no_grad():
        model(image(1, 3, 32, 32))
    model.train()
    with raises_clearly(RuntimeError, "no_grad"):
        model.backward(image(1, 10))


# --- the upstream gradient must fit the output -------------------------------------------------------------

@pytest.mark.parametrize("layer, x_shape, bad_dy", [
    (nr.nn.ReLU(), (1, 1, 4, 4), (1, 1, 1, 4)),             # would broadcast silently
    (nr.nn.Conv2d(3, 4, 3), (2, 3, 5, 5), (2, 4, 2, 2)),
    (nr.nn.BatchNorm2d(4), (2, 4, 3, 3), (2, 4, 3, 1)),
    (nr.nn.MaxPool2d(2), (1, 1, 4, 4), (1, 1, 3, 3)),
    (nr.nn.AvgPool2d(2), (1, 1, 4, 4), (1, 1, 3, 3)),
    (nr.nn.Linear(4, 3), (2, 4), (2, 1)),
], ids=["ReLU", "Conv2d", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "Linear"])
def test_backward_with_wrong_gradient_shape(layer, x_shape, bad_dy):
    y = layer(image(*x_shape))
    with raises_clearly(ValueError, str(tuple(bad_dy)), str(tuple(y.shape))):
        layer.backward(image(*bad_dy))


def test_model_backward_with_wrong_gradient_shape(model):
    model.train()
    model(image(2, 3, 32, 32))
    with raises_clearly(ValueError, "(2, 1)", "(2, 10)"):
        model.backward(image(2, 1))


def test_model_backward_with_wrong_gradient_dtype(model):
    """As PyTorch ("Mismatch in dtype"), a float64 gradient into a float32 model is refused, not promoted."""
    model.train()
    model(image(2, 3, 32, 32))
    with raises_clearly(TypeError, "float64", "float32"):
        model.backward(image(2, 10, dtype="float64"))


# --- loss ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", [5, 7, -1])
def test_target_label_out_of_range(label):
    with raises_clearly(IndexError, "out of range", str(label), "5 classes"):
        nr.nn.CrossEntropyLoss()(image(3, 5), np.array([0, label, 2]))


def test_non_integer_target():
    with raises_clearly(TypeError, "integer", "float64"):
        nr.nn.CrossEntropyLoss()(image(3, 5), np.array([0.0, 1.0, 2.0]))
    with raises_clearly(ValueError, "target shape", "(3,)"):
        nr.nn.CrossEntropyLoss()(image(3, 5), np.array([[0, 1, 2]]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_loss(reduction, bad):
    logits = image(3, 5)
    logits[1, 2] = bad
    with np.errstate(invalid="ignore"), raises_clearly(FloatingPointError, "not finite"):
        nr.nn.CrossEntropyLoss(reduction=reduction)(logits, np.array([0, 1, 2]))


def test_batchnorm_needs_two_values_per_channel():
    with raises_clearly(ValueError, "more than 1 value per channel"):
        nr.nn.BatchNorm2d(2)(image(1, 2, 1, 1))


# --- state dicts ---------------------------------------------------------------------------------------

def test_load_state_dict_lists_every_problem_at_once():
    net = nr.nn.Sequential(nr.nn.Conv2d(3, 4, 3), nr.nn.BatchNorm2d(4))
    state = {k: np.array(v) for k, v in net.state_dict().items()}
    before = {k: v.copy() for k, v in state.items()}
    del state["0.weight"]
    state["2.weight"] = np.zeros(3)
    state["1.bias"] = np.zeros(5)
    with pytest.raises(KeyError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    for part in ("missing", "0.weight", "unexpected", "2.weight", "shape", "1.bias", "(5,)", "(4,)"):
        assert part in message, f"{part!r} not in {message}"
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} changed by a failed load")


def test_load_state_dict_non_strict_still_checks_shapes():
    net = nr.nn.BatchNorm2d(4)
    state = {k: np.array(v) for k, v in net.state_dict().items()}
    del state["bias"]
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []
    state["running_var"] = np.ones((4, 1))
    with pytest.raises(KeyError, match="running_var"):
        net.load_state_dict(state, strict=False)


# --- backends and dtypes ---------------------------------------------------------------------------------

def test_unknown_backend():
    with raises_clearly(ValueError, "unknown backend", "'jax'"):
        nr.resnet18(backend="jax")
    with raises_clearly(ValueError, "unknown backend"):
        nr.nn.ReLU().to("tpu")


def test_unsupported_dtype():
    with raises_clearly(ValueError, "float16"):
        nr.nn.Conv2d(1, 1, 1, dtype="float16")


def test_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)     # makes `import cupy` fail, as on a machine without it
    monkeypatch.setattr(B, "_MODULES", {})
    with raises_clearly(B.BackendUnavailableError, "cupy", "not installed"):
        nr.resnet18(backend="cupy")
    with raises_clearly(B.BackendUnavailableError, "not installed"):
        nr.nn.ReLU().to("cupy")
    assert not B.is_available("cupy")


def test_cupy_installed_without_a_gpu(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(B, "_MODULES", {})
    with raises_clearly(B.BackendUnavailableError, "installed", "GPU"):
        nr.nn.Linear(2, 2, backend="cupy")
