"""The guard backend: a CPU array module that, like CuPy, refuses hidden trips to the host.

Two parts:

* the guard itself - what it refuses (implicit NumPy conversion, ``float()``/``bool()``/``item()``,
  data-dependent shapes, mixing host arrays in), what it allows, and that it computes exactly
  what NumPy computes;
* numres under the guard - whole ResNets (BasicBlock and Bottleneck) and every other layer run
  forward, loss, backward and SGD steps with ``backend="guard"`` inside ``no_transfers()``, and
  agree with the NumPy backend.  A host round-trip anywhere on that path fails these tests.
"""
from __future__ import annotations

import numpy as np
import pytest

import numres as nr
from numres.testing import GuardedArray, HostRoundTripError, allow_sync, guard_xp as gx, no_transfers
from error_measure import rel_err

# --- the guard's boundary ------------------------------------------------------------------------


@pytest.fixture
def g(rng):
    return gx.asarray(rng.standard_normal((3, 4)))


@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda a: np.ascontiguousarray(a)])
def test_implicit_numpy_conversion_is_refused(g, convert):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        convert(g)


@pytest.mark.parametrize("call, what", [
    (float, "float"), (int, "int"), (bool, "bool"), (complex, "complex"),
    (lambda a: a.item(), "item"), (lambda a: a.tolist(), "tolist"), (lambda a: f"{a:.3f}", "formatting"),
    (lambda a: [0, 1][a], "index"), (lambda a: 1 if a else 0, "bool"),
])
def test_scalar_conversions_are_host_round_trips(g, call, what):
    with pytest.raises(HostRoundTripError, match=f"host round-trip on the GPU path.*{what}"):
        call(g.sum())


@pytest.mark.parametrize("call", [np.sum, np.exp, lambda a: np.concatenate([a, a]), lambda a: np.add(a, 1.0),
                                  lambda a: np.ones((3, 4)) + a, lambda a: a + np.ones((3, 4)),
                                  lambda a: a * np.ones(4), lambda a: gx.maximum(a, np.zeros(4))])
def test_numpy_functions_and_host_operands_are_refused(g, call):
    with pytest.raises(TypeError):
        call(g)


def test_assigning_a_host_array_into_a_device_array_is_refused(g):
    with pytest.raises(ValueError, match="host numpy.ndarray cannot be assigned"):
        g[...] = np.zeros((3, 4))
    g[0, 0] = np.float64(2.5)                    # NumPy scalars are fine, as in CuPy
    g[1] = gx.asarray(np.ones(4))
    np.testing.assert_array_equal(g.get()[1], np.ones(4))


def test_data_dependent_shapes_need_allow_sync(g):
    mask = g > 0
    with pytest.raises(HostRoundTripError, match="data-dependent shape"):
        g[mask]
    with pytest.raises(HostRoundTripError, match="data-dependent shape"):
        g[mask] = 0.0
    with pytest.raises(HostRoundTripError, match="data-dependent shape"):
        gx.nonzero(g)
    with pytest.raises(HostRoundTripError, match="data-dependent shape"):
        gx.where(mask)
    with allow_sync():
        expected = g.get()[mask.get()]
        np.testing.assert_array_equal(g[mask].get(), expected)


def test_no_transfers_refuses_even_get(g):
    with no_transfers():
        with pytest.raises(HostRoundTripError, match="get"):
            g.get()
        with pytest.raises(HostRoundTripError):
            nr.backend.to_numpy(g)
    assert isinstance(g.get(), np.ndarray)


def test_results_stay_on_the_device_and_match_numpy(rng):
    host = rng.standard_normal((4, 5))
    other = rng.standard_normal((4, 5))
    a, b = gx.asarray(host), gx.asarray(other)
    # Reductions and scalar indexing give 0-d device arrays, as in CuPy, never NumPy scalars.
    for result in (a.sum(), a.mean(), a.var(axis=None), a.max(), a[1, 2], gx.sum(a), gx.allclose(a, b)):
        assert isinstance(result, GuardedArray) and result.ndim == 0
    checks = [
        (a + b, host + other), (a - 2.0, host - 2.0), (3 * a, 3 * host), (a / b, host / other),
        (-a, -host), (abs(a), np.abs(host)), (a ** 2, host ** 2), (a @ b.T, host @ other.T),
        (a > b, host > other), (a.T.copy(order="K"), host.T), (a.sum(axis=0), host.sum(axis=0)),
        (a.var(axis=1), host.var(axis=1)), (a.argmax(axis=1), host.argmax(axis=1)),
        (gx.maximum(a, 0), np.maximum(host, 0)), (gx.exp(a), np.exp(host)), (gx.where(a > 0, a, b),
                                                                            np.where(host > 0, host, other)),
        (a.reshape(5, 4), host.reshape(5, 4)), (a[1:3, ::2], host[1:3, ::2]),
        (a[gx.arange(4), gx.asarray([0, 1, 2, 3])], host[np.arange(4), [0, 1, 2, 3]]),
    ]
    for got, expected in checks:
        assert isinstance(got, GuardedArray)
        np.testing.assert_array_equal(got.get(), expected)


def test_views_share_memory_and_inplace_ops_write_through(rng):
    host = rng.standard_normal((2, 3, 4, 5))
    a = gx.asarray(host)
    view = a.transpose(0, 2, 3, 1)
    view += 1.0
    np.testing.assert_array_equal(a.get(), host + 1.0)
    a[0, 1] = 0.0
    assert a.get()[0, 1].max() == 0.0 and view.get()[0, :, :, 1].max() == 0.0
    out = gx.empty((5, 3, 2)).transpose(1, 0, 2)        # a non-contiguous output
    gx.matmul(a[0].transpose(0, 2, 1), a[1, :, :, :2], out=out)
    np.testing.assert_array_equal(out.get(), np.matmul(a.get()[0].transpose(0, 2, 1), a.get()[1, :, :, :2]))
    windows = gx.lib.stride_tricks.as_strided(a, shape=(2, 2), strides=(a.strides[0], a.strides[3]))
    np.testing.assert_array_equal(windows.get(), np.lib.stride_tricks.as_strided(
        a.get(), shape=(2, 2), strides=(a.strides[0], a.strides[3])))


def test_host_data_is_copied_onto_the_device(rng):
    host = rng.standard_normal(5)
    device = gx.asarray(host)
    host[:] = 0.0
    assert device.get().min() != 0.0            # the device copy does not alias host memory
    back = device.get()
    back[:] = 7.0
    assert device.get().max() != 7.0            # nor does .get() alias device memory


def test_guard_is_a_registered_numres_backend(rng):
    assert nr.backend.get_xp("guard") is gx
    a = gx.zeros(3)
    assert nr.backend.backend_of(a) == "guard" and nr.backend.xp_of(a) is gx
    np.testing.assert_array_equal(nr.backend.to_numpy(a), np.zeros(3))
    channels_last = np.ascontiguousarray(rng.standard_normal((2, 4, 4, 3))).transpose(0, 3, 1, 2)
    moved = nr.backend.convert(channels_last, "guard")
    assert moved.transpose(0, 2, 3, 1).flags.c_contiguous       # layout kept


def test_a_planted_round_trip_is_caught():
    class Leaky(nr.nn.Module):
        def forward(self, x):
            return x * float(x.mean())          # the classic GPU-path bug

    class HostMath(nr.nn.Module):
        def forward(self, x):
            return np.tanh(x)                   # a NumPy call on a device array

    x = gx.ones((2, 3))
    with pytest.raises(HostRoundTripError, match="float"):
        Leaky(backend="guard")(x)
    with pytest.raises(TypeError):
        HostMath(backend="guard")(x)


def test_layers_reject_host_input_on_the_guard_backend(rng):
    conv = nr.nn.Conv2d(3, 4, 3, backend="guard")
    with pytest.raises(TypeError, match="backend .guard. and expects a numres.testing.guard.ndarray"):
        conv(rng.standard_normal((1, 3, 5, 5)).astype(np.float32))


# --- numres under the guard -------------------------------------------------------------------------

def _channels_last(array):
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _train_steps(model, backend, x, target, steps, label_smoothing=0.1):
    """``steps`` SGD steps on one batch; returns (losses, logits of the last step) as NumPy arrays."""
    crit = nr.nn.CrossEntropyLoss(label_smoothing=label_smoothing, backend=backend, dtype=model.dtype)
    opt = nr.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x = nr.backend.convert(x, backend)
    target = nr.backend.asarray(target, backend)
    losses, logits = [], None
    for _ in range(steps):
        guard = no_transfers() if backend == "guard" else _nothing()
        with guard:                                     # forward, loss, backward and step: no host trips
            opt.zero_grad()
            logits = model(x)
            loss = crit(logits, target)
            model.backward(crit.backward())
            opt.step()
        losses.append(nr.to_numpy(loss))
    return np.array(losses), nr.to_numpy(logits)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_states_match(guarded, reference, rtol):
    guarded_state = {k: nr.to_numpy(v) for k, v in guarded.state_dict().items()}
    for name, value in reference.state_dict().items():
        np.testing.assert_allclose(guarded_state[name], nr.to_numpy(value), rtol=rtol, atol=0, err_msg=name)
    for (name, p), (_, q) in zip(guarded.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(nr.to_numpy(p.grad), nr.to_numpy(q.grad), rtol=rtol, atol=1e-300, err_msg=name)


def _bottleneck_resnet(**kwargs):
    """ResNet-50's Bottleneck blocks at lower depth (layer1 has a projection and an identity block):
    the same code paths as resnet50 at a fraction of its 25M parameters."""
    return nr.ResNet(nr.Bottleneck, [2, 1, 1, 1], **kwargs)


# A float32 run may err at most this many times what one float32 rounding of the input and the
# weights alone moves the float64 result (see test_whole_resnet_trains_under_the_guard_in_float32).
FLOAT32_OVER_SENSITIVITY = 20


@pytest.mark.parametrize("builder", [nr.resnet18, _bottleneck_resnet])
def test_whole_resnet_trains_under_the_guard_like_numpy(builder, rng):
    """Forward + cross-entropy + backward + SGD(momentum, weight decay), two steps, NumPy vs guard, float64.

    The guard runs NumPy's own arithmetic, so the two agree to rounding (the CPU path splits some
    reductions into tiles that the single-tile device path does not)."""
    x = _channels_last(rng.standard_normal((2, 3, 24, 24)))     # 24 -> 12 -> 6 -> 3 -> 2 -> 1
    target = np.array([3, 8])
    nr.manual_seed(7)
    reference = builder(num_classes=10, dtype="float64")
    nr.manual_seed(7)
    guarded = builder(num_classes=10, dtype="float64").to("guard")
    ref_losses, ref_logits = _train_steps(reference, "numpy", x, target, steps=2)
    losses, logits = _train_steps(guarded, "guard", x, target, steps=2)
    rtol = 1e-11
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    np.testing.assert_allclose(logits, ref_logits, rtol=rtol, atol=rtol * np.abs(ref_logits).max())
    _assert_states_match(guarded, reference, rtol=rtol)
    assert all(isinstance(p.data, GuardedArray) for p in guarded.parameters())
    with no_transfers(), nr.no_grad():                   # evaluation mode too
        guarded.eval()
        eval_logits = guarded(nr.backend.convert(x, "guard"))
    reference.eval()
    with nr.no_grad():
        np.testing.assert_allclose(nr.to_numpy(eval_logits), reference(x), rtol=rtol,
                                   atol=rtol * np.abs(ref_logits).max())


def _guard_training_run(dtype, backend, x, target, perturb_seed=None):
    """One training step of the Bottleneck net, then an evaluation forward; every result on the host.

    ``perturb_seed``: first multiply every weight and input entry by ``1 + u * 2^-24`` (u uniform in
    [-1, 1]), i.e. round them once more at float32 precision."""
    nr.manual_seed(7)
    model = _bottleneck_resnet(num_classes=10, dtype="float64")
    if perturb_seed is not None:
        noise = np.random.default_rng(perturb_seed)
        for p in model.parameters():
            p.data[...] *= 1 + 2.0 ** -24 * noise.uniform(-1, 1, p.shape)
        x = x * (1 + 2.0 ** -24 * noise.uniform(-1, 1, x.shape))
    model.to(backend=backend, dtype=dtype)
    losses, logits = _train_steps(model, backend, x.astype(dtype), target, steps=1)
    if backend == "guard":
        assert all(isinstance(p.data, GuardedArray) for p in model.parameters())
    model.eval()
    with (no_transfers() if backend == "guard" else _nothing()), nr.no_grad():
        eval_logits = model(nr.backend.convert(x.astype(dtype), backend))
    result = {"losses": losses, "logits": logits, "eval logits": nr.to_numpy(eval_logits)}
    result.update({f"state {k}": nr.to_numpy(v) for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked")})
    result.update({f"grad {k}": nr.to_numpy(p.grad) for k, p in model.named_parameters()})
    return result


def _error_summary(result, truth):
    assert list(result) == list(truth)
    errors = {k: rel_err(result[k], expected) for k, expected in truth.items()}
    tensors = np.array([e for k, e in errors.items() if k.startswith(("state ", "grad "))])
    return {"losses": errors["losses"], "logits": errors["logits"], "eval logits": errors["eval logits"],
            "median tensor": float(np.median(tensors)), "worst tensor": float(tensors.max())}


def test_whole_resnet_trains_under_the_guard_in_float32(rng):
    """The guard in float32, judged against the float64 truth (the NumPy backend in float64).

    One SGD step and an evaluation forward of a Bottleneck net, batch 4 at 24x24, so that every
    BatchNorm normalises at least 4 values per channel (2 values make the input gradient zero in
    exact arithmetic: pure rounding noise, and two steps amplify every float32 rounding to O(0.1)).
    The bound is set by the problem's own conditioning: in float64 alone, rounding the input and the
    weights once more at float32 precision (relative 2^-24) moves the loss by 1.2e-7, the logits by
    2.2e-6, the evaluation logits by 6.2e-6, the median state/gradient tensor by 1.3e-6 and the worst
    by 2.8e-5 (measured).  A float32 run rounds at every operation, so it errs a few times more:
    measured 1.6x (evaluation logits) to 7.4x (loss), for the guard and the NumPy backend alike.
    Each statistic must stay within FLOAT32_OVER_SENSITIVITY = 20 times its float64 sensitivity
    (a margin of 2.7x or more).  No float32 result but the one under test enters, so the bound holds
    on any CPU; the NumPy backend's own float32 run is held to it too, so a bound too tight for
    float32 itself shows up as that, not as a guard bug."""
    x = _channels_last(rng.standard_normal((4, 3, 24, 24)))
    target = np.array([3, 8, 0, 5])
    truth = _guard_training_run("float64", "numpy", x, target)
    sensitivity = _error_summary(_guard_training_run("float64", "numpy", x, target, perturb_seed=3), truth)
    assert all(0 < v < np.inf for v in sensitivity.values()), sensitivity
    for backend in ("numpy", "guard"):
        errors = _error_summary(_guard_training_run("float32", backend, x, target), truth)
        for what, error in errors.items():
            bound = FLOAT32_OVER_SENSITIVITY * sensitivity[what]
            assert error <= bound, f"{backend} float32 {what}: {error:.2e} from the float64 truth > {bound:.2e}"


def _every_other_layer(backend):
    """Layers and options the ResNets do not exercise: grouped/dilated/biased conv, average pools,
    BN without affine or with a cumulative-average momentum, Flatten/Identity."""
    where = dict(backend=backend, dtype="float64")
    return nr.nn.Sequential(
        nr.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True, **where),
        nr.nn.BatchNorm2d(6, momentum=None, **where),
        nr.nn.ReLU(**where),
        nr.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False, **where),
        nr.nn.BatchNorm2d(6, affine=False, **where),
        nr.nn.MaxPool2d(2, stride=1, padding=1, dilation=2, ceil_mode=True, **where),
        nr.nn.AdaptiveAvgPool2d((2, 3), **where),
        nr.nn.Identity(**where),
        nr.nn.Flatten(**where),
        nr.nn.Linear(36, 5, **where),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_other_layer_runs_under_the_guard(reduction, rng):
    x = rng.standard_normal((3, 4, 11, 9))
    target = np.array([0, 4, 2])
    dloss = rng.standard_normal(3) if reduction == "none" else 1.7
    results = {}
    for backend in ("numpy", "guard"):
        nr.manual_seed(3)
        model = _every_other_layer("numpy").to(backend)
        crit = nr.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2, backend=backend, dtype="float64")
        opt = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, dampening=0.1, weight_decay=1e-3,
                           nesterov=False)
        for _ in range(2):
            guard = no_transfers() if backend == "guard" else _nothing()
            with guard:
                opt.zero_grad()
                loss = crit(model(nr.backend.asarray(x, backend)), nr.backend.asarray(target, backend))
                dx = model.backward(crit.backward(nr.backend.asarray(dloss, backend) if reduction == "none"
                                                  else dloss))
                opt.step()
        results[backend] = (nr.to_numpy(loss), nr.to_numpy(dx), model)
    np.testing.assert_allclose(results["guard"][0], results["numpy"][0], rtol=1e-12)
    np.testing.assert_allclose(results["guard"][1], results["numpy"][1], rtol=1e-11, atol=1e-14)
    _assert_states_match(results["guard"][2], results["numpy"][2], rtol=1e-11)


def test_kernel_wrappers_hand_guard_arrays_to_the_generic_ops(rng):
    """With numres's CUDA kernel wrappers registered on the guard backend (as they are on "cupy"), a
    training step still runs, with no host trip, and gives bit-for-bit the generic ops' result: the
    wrappers see an array no kernel runtime takes and call the generic op with the call's arguments."""
    import numres.cuda as cuda
    from numres.functional.dispatch import ops_for

    x = _channels_last(rng.standard_normal((2, 3, 24, 24)))
    target = np.array([1, 6])
    results = []
    for registered in (False, True):
        nr.manual_seed(5)
        model = _bottleneck_resnet(num_classes=10, dtype="float64").to("guard")
        try:
            if registered:
                cuda.register_kernels("guard")
                assert ops_for("guard").conv2d_forward is cuda.conv.conv2d_forward
            results.append((*_train_steps(model, "guard", x, target, steps=1), model))
        finally:
            cuda.unregister_kernels("guard")
    assert ops_for("guard").conv2d_forward is nr.functional.conv2d_forward
    (losses_plain, logits_plain, plain), (losses_kernels, logits_kernels, wrapped) = results
    np.testing.assert_array_equal(losses_kernels, losses_plain)
    np.testing.assert_array_equal(logits_kernels, logits_plain)
    for (name, p), (_, q) in zip(wrapped.named_parameters(), plain.named_parameters()):
        np.testing.assert_array_equal(nr.to_numpy(p.grad), nr.to_numpy(q.grad), err_msg=name)
