"""Whole models on the textbook tier (``nr.reference_mode()``) against the engine, and the settings object.

In float64 the two tiers compute the same math in different orders, so they agree to rounding:
1e-10 on the logits, the input gradient, every parameter gradient and the running statistics,
in training and in evaluation mode (where the engine folds BatchNorm into the convolutions).
Inside the mode no engine compute function may run: each is replaced by one that raises.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import numres as nr
import numres.functional as F
from numres.functional import activation, batchnorm, conv, fused, linear, loss, pooling, winograd
from numres import parallel

from torch_reference import randomize_batchnorms, rel_err

TOL = 1e-10


def _engine_functions():
    """(module, name) of every engine compute function a model could reach."""
    names = {
        conv: ["im2col", "col2im", "conv2d_forward", "conv2d_backward", "pad2d_forward", "pad2d_backward"],
        winograd: ["winograd_conv2d_forward", "winograd_conv2d_backward"],
        batchnorm: ["batchnorm_train_forward", "batchnorm_eval_forward", "batchnorm_backward"],
        activation: ["relu_forward", "relu_backward", "add_relu_forward", "add"],
        pooling: ["maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward",
                  "adaptive_avgpool2d_forward", "adaptive_avgpool2d_backward"],
        linear: ["linear_forward", "linear_backward"],
        loss: ["cross_entropy_forward", "cross_entropy_backward"],
        fused: ["fold_conv_bn", "folded_conv_bn_backward", "conv2d_bias_relu_forward"],
        parallel: ["map_tiles"],
        F: ["im2col", "col2im", "conv2d_forward", "conv2d_backward", "batchnorm_train_forward",
            "batchnorm_eval_forward", "batchnorm_backward", "relu_forward", "relu_backward", "add_relu_forward",
            "add", "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward",
            "adaptive_avgpool2d_forward", "adaptive_avgpool2d_backward", "linear_forward", "linear_backward",
            "cross_entropy_forward", "cross_entropy_backward", "winograd_conv2d_forward",
            "winograd_conv2d_backward"],
    }
    return [(module, name) for module, listed in names.items() for name in listed]


@pytest.fixture
def engine_forbidden(monkeypatch):
    """Every engine compute function raises if called (and the dispatch caches are emptied)."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"engine function {name} ran inside reference_mode()")
        return call

    for module, name in _engine_functions():
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    from numres.functional import dispatch
    monkeypatch.setattr(dispatch, "_NAMESPACES", {})


def _train_step(model, x, target, upstream_seed):
    """Forward, cross-entropy, backward; returns logits, dx, gradients and buffers as float64 arrays."""
    model.zero_grad()
    logits = model(x)
    criterion = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype="float64")
    criterion(logits, target)
    dlogits = criterion.backward()
    # a random upstream on top, so no direction of the gradient is special
    dlogits = dlogits + 1e-3 * np.random.default_rng(upstream_seed).standard_normal(dlogits.shape)
    dx = model.backward(dlogits)
    result = {"logits": logits, "dx": dx}
    result.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    result.update({f"buffer {name}": b for name, b in model.named_buffers()})
    return {k: np.array(v, dtype=np.float64) for k, v in result.items()}


def _compare(reference, engine):
    assert reference.keys() == engine.keys()
    errors = {key: rel_err(reference[key], engine[key]) for key in engine}
    worst = max(errors, key=lambda k: (not np.isfinite(errors[k]), errors[k]))
    assert np.isfinite(errors[worst]) and errors[worst] < TOL, f"{worst}: {errors[worst]:.2e}"
    return errors[worst]


MODELS = [("resnet18", dict(num_classes=7), (2, 3, 33, 31)),
          ("resnet50", dict(num_classes=5), (2, 3, 64, 48)),
          ("resnet20", dict(num_classes=10), (3, 3, 16, 16))]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, shape", MODELS, ids=[m[0] for m in MODELS])
def test_train_step_in_reference_mode_equals_the_engine(name, kwargs, shape, engine_forbidden, monkeypatch):
    nr.manual_seed(3)
    model = getattr(nr, name)(dtype="float64", **kwargs)
    randomize_batchnorms(model, seed=4)
    twin = copy.deepcopy(model)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    target = rng.integers(0, kwargs["num_classes"], shape[0])

    with nr.reference_mode():
        reference = _train_step(model, x, target, upstream_seed=6)
    monkeypatch.undo()                       # the engine may run again
    engine = _train_step(twin, x, target, upstream_seed=6)
    _compare(reference, engine)


@pytest.mark.parametrize("name, kwargs, shape", MODELS[:1] + MODELS[2:], ids=["resnet18", "resnet20"])
def test_eval_step_in_reference_mode_equals_the_folded_engine(name, kwargs, shape, engine_forbidden, monkeypatch):
    """Evaluation mode: the engine folds every BatchNorm into its convolution; the textbook does not."""
    nr.manual_seed(7)
    model = getattr(nr, name)(dtype="float64", **kwargs)
    randomize_batchnorms(model, seed=8)
    model.eval()
    twin = copy.deepcopy(model)
    x = np.random.default_rng(9).standard_normal(shape)
    target = np.arange(shape[0]) % kwargs["num_classes"]
    with nr.reference_mode():
        reference = _train_step(model, x, target, upstream_seed=10)
    monkeypatch.undo()
    engine = _train_step(twin, x, target, upstream_seed=10)
    assert nr.nn.fusion.is_batchnorm_folding_enabled()
    _compare(reference, engine)


def test_reference_mode_float32_follows_the_input_dtype(engine_forbidden):
    nr.manual_seed(11)
    model = nr.resnet20(num_classes=4)
    with nr.reference_mode():
        logits = model(np.random.default_rng(12).standard_normal((2, 3, 8, 8)).astype(np.float32))
        dx = model.backward(np.ones_like(logits))
    assert logits.dtype == np.float32 and dx.dtype == np.float32


def test_outside_the_mode_nothing_changes():
    assert not nr.config.reference_mode
    with nr.reference_mode():
        assert nr.config.reference_mode
        from numres.functional.dispatch import ops_for
        import numres.reference
        assert ops_for("numpy") is numres.reference
    assert not nr.config.reference_mode
    from numres.functional.dispatch import ops_for
    assert ops_for("numpy").conv2d_forward is F.conv2d_forward


def test_the_mode_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with nr.reference_mode():
            raise RuntimeError("inside")
    assert not nr.config.reference_mode


# ---- the settings object -------------------------------------------------------------------------

def test_show_prints_every_setting():
    out = io.StringIO()
    text = nr.config.show(file=out)
    assert out.getvalue() == text
    for name in ("reference_mode", "grad_enabled", "batchnorm_folding", "conv_algorithm", "num_threads", "tf32",
                 "blas", "environment"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name


def test_settings_and_the_old_spellings_stay_in_step():
    assert nr.config.conv_algorithm == F.get_conv_algorithm()
    with nr.using_config(conv_algorithm="im2col", batchnorm_folding=False, num_threads=1):
        assert F.get_conv_algorithm() == "im2col"
        assert not nr.nn.fusion.is_batchnorm_folding_enabled()
        assert nr.parallel.get_num_threads() == 1
    assert nr.config.batchnorm_folding and nr.parallel.get_num_threads() >= 1
    with nr.no_grad():
        assert nr.config.grad_enabled is False
    assert nr.config.grad_enabled is True
    with F.conv_algorithm("winograd"):
        assert nr.config.conv_algorithm == "winograd"
    nr.nn.set_batchnorm_folding(False)
    try:
        assert nr.config.batchnorm_folding is False
    finally:
        nr.config.batchnorm_folding = True


def test_unknown_or_wrong_settings_are_named():
    with pytest.raises(AttributeError, match="no setting 'refrence_mode'.*reference_mode"):
        nr.config.refrence_mode = True
    with pytest.raises(AttributeError, match="no setting 'fold'"):
        with nr.using_config(fold=False):
            pass
    with pytest.raises(TypeError, match="reference_mode must be True or False"):
        nr.config.reference_mode = "yes"
    with pytest.raises(ValueError, match="convolution algorithm"):
        nr.config.conv_algorithm = "fft"
    assert nr.config.reference_mode is False and nr.config.conv_algorithm == "auto"


@pytest.mark.parametrize("forward_in_mode", [True, False])
def test_forward_and_backward_in_different_modes_is_a_clear_error(forward_in_mode):
    conv = nr.nn.Conv2d(2, 3, 3, dtype="float64")
    x = np.random.default_rng(13).standard_normal((1, 2, 5, 5))
    with nr.reference_mode(forward_in_mode):
        y = conv(x)
    with nr.reference_mode(not forward_in_mode):
        with pytest.raises(RuntimeError, match="forward ran (inside|outside) numres.reference_mode"):
            conv.backward(np.ones_like(y))


def test_sync_batchnorm_says_it_has_no_textbook_version():
    layer = nr.nn.SyncBatchNorm(3, dtype="float64")
    with nr.reference_mode():
        with pytest.raises(NotImplementedError, match="SyncBatchNorm has no textbook version"):
            layer(np.zeros((2, 3, 2, 2)))
