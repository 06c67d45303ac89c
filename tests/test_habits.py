"""The PyTorch habits of issue 18: nn.init, nn.utils clipping, MSELoss, Module.apply, Parameter.numel,
TensorDataset, unbatched whole models and pooling's ``stride=()``; each against PyTorch (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from conftest import rel_err
from numres.nn import Parameter
from numres.nn import init as I

TI = torch.nn.init


# --- nn.init ----------------------------------------------------------------------------------------

SHAPES = [(64, 32), (32, 16, 3, 3), (8, 6, 5), (4, 3, 2, 2, 2)]


@pytest.mark.parametrize("nonlinearity, param", [("linear", None), ("conv2d", None), ("conv_transpose3d", None),
                                                 ("sigmoid", None), ("tanh", None), ("relu", None),
                                                 ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 3),
                                                 ("selu", None)])
def test_calculate_gain_matches_torch(nonlinearity, param):
    assert I.calculate_gain(nonlinearity, param) == TI.calculate_gain(nonlinearity, param)


def test_calculate_gain_errors_match_torch():
    for args in (("swish",), ("leaky_relu", "0.2"), ("leaky_relu", True)):
        with pytest.raises(ValueError):
            TI.calculate_gain(*args)
        with pytest.raises(ValueError):
            I.calculate_gain(*args)


@pytest.mark.parametrize("shape", SHAPES + [(5, 1), (1, 7, 1, 1)])
def test_fans_match_torch(shape):
    assert I._calculate_fan_in_and_fan_out(np.zeros(shape)) == TI._calculate_fan_in_and_fan_out(torch.zeros(shape))
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        I._calculate_fan_in_and_fan_out(np.zeros(5))


def torch_scale(name, kwargs, shape):
    """The std (normal) or bound (uniform) that PyTorch's documented formula gives for ``shape``."""
    fan_in, fan_out = TI._calculate_fan_in_and_fan_out(torch.zeros(shape))
    if name.startswith("kaiming"):
        fan = fan_in if kwargs["mode"] == "fan_in" else fan_out
        std = TI.calculate_gain(kwargs["nonlinearity"], kwargs["a"]) / math.sqrt(fan)
    else:
        std = kwargs["gain"] * math.sqrt(2.0 / (fan_in + fan_out))
    return std * (math.sqrt(3) if name.endswith("uniform_") else 1.0)


def _scale_cases():
    cases = []
    for shape in SHAPES:
        for mode in ("fan_in", "fan_out"):
            for nl, a in (("relu", 0), ("leaky_relu", math.sqrt(5)), ("leaky_relu", 0.1), ("tanh", 0)):
                for name in ("kaiming_normal_", "kaiming_uniform_"):
                    cases.append((shape, name, dict(a=a, mode=mode, nonlinearity=nl)))
        for gain in (1.0, 2.5):
            for name in ("xavier_normal_", "xavier_uniform_"):
                cases.append((shape, name, dict(gain=gain)))
    return cases


@pytest.mark.parametrize("shape, name, kwargs", _scale_cases())
def test_random_init_scale_matches_torch(shape, name, kwargs):
    """numres draws N(0, s^2) or U(-s, s) with PyTorch's s: the draws equal the generator's with that s
    exactly, and on a large weight their statistics agree with torch's own draws'."""
    uniform = name.endswith("uniform_")
    scale = torch_scale(name, kwargs, shape)
    p = Parameter(np.empty(shape))
    assert getattr(I, name)(p, **kwargs, generator=np.random.default_rng(3)) is p
    draw = np.random.default_rng(3)
    expected = draw.uniform(-scale, scale, shape) if uniform else draw.normal(0, scale, shape)
    assert rel_err(p.data, expected) < 1e-15
    big = (shape[0] * 50,) + shape[1:]
    scale = torch_scale(name, kwargs, big)
    theirs = getattr(TI, name)(torch.empty(big, dtype=torch.float64), **kwargs,
                               generator=torch.Generator().manual_seed(0)).numpy()
    ours = getattr(I, name)(np.empty(big), **kwargs, generator=np.random.default_rng(0))
    for values in (ours, theirs):
        std = scale / math.sqrt(3) if uniform else scale
        assert abs(values.std() / std - 1) < 0.03 and abs(values.mean()) < 0.05 * std
        if uniform:
            assert 0.99 * scale < np.abs(values).max() <= scale


RESNET18_SEED5_SHA256 = "e7e8ac061651057c457355745928e3f1be2a1e0e9dd532835f8cede277e9ed55"


def test_models_initialisation_is_kaiming_normal_fan_out_relu():
    """The ResNets' conv init (numres.init.kaiming_normal, std = sqrt(2 / fan)) is
    nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') (std = sqrt(2) / sqrt(fan), PyTorch's
    formula) to the last bit of the std; and a seeded resnet18 is bit-identical to the one numres built
    before nn.init existed (the hash of its state dict, recorded then)."""
    import hashlib
    shape = (16, 8, 3, 3)
    old = nr.init.kaiming_normal(shape, mode="fan_out", rng=np.random.default_rng(11))
    new = I.kaiming_normal_(np.empty(shape), mode="fan_out", nonlinearity="relu",
                            generator=np.random.default_rng(11))
    assert rel_err(new, old) < 1e-15
    nr.init.manual_seed(5)
    state = nr.resnet18(dtype="float32").state_dict()
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(state[k]).tobytes() for k in state)).hexdigest()
    assert digest == RESNET18_SEED5_SHA256


def test_default_generator_is_numres_seed():
    nr.init.manual_seed(3)
    first = I.normal_(np.empty(10))
    nr.init.manual_seed(3)
    assert np.array_equal(first, I.normal_(np.empty(10)))


@pytest.mark.parametrize("name, args", [("uniform_", (-0.5, 2.0)), ("normal_", (1.5, 0.25))])
def test_uniform_normal_match_torch_statistics(name, args):
    ours = I.__dict__[name](np.empty((400, 500)), *args, generator=np.random.default_rng(0))
    theirs = TI.__dict__[name](torch.empty(400, 500, dtype=torch.float64), *args,
                               generator=torch.Generator().manual_seed(0)).numpy()
    for values in (ours, theirs):
        if name == "uniform_":
            assert args[0] <= values.min() < args[0] + 1e-3 and args[1] - 1e-3 < values.max() < args[1]
            assert abs(values.mean() - sum(args) / 2) < 0.01
        else:
            assert abs(values.mean() - args[0]) < 0.002 and abs(values.std() / args[1] - 1) < 0.005
    assert abs(ours.std() - theirs.std()) / theirs.std() < 0.01


def test_trunc_normal_matches_torch_statistics():
    kwargs = dict(mean=0.3, std=1.2, a=-1.0, b=2.5)
    ours = I.trunc_normal_(np.empty(400_000), **kwargs, generator=np.random.default_rng(0))
    theirs = TI.trunc_normal_(torch.empty(400_000, dtype=torch.float64), **kwargs,
                              generator=torch.Generator().manual_seed(0)).numpy()
    # the truncated normal's mean and std, in closed form
    alpha, beta = (kwargs["a"] - 0.3) / 1.2, (kwargs["b"] - 0.3) / 1.2
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: (1 + math.erf(z / math.sqrt(2))) / 2  # noqa: E731
    mass = cdf(beta) - cdf(alpha)
    mean = 0.3 + 1.2 * (pdf(alpha) - pdf(beta)) / mass
    std = 1.2 * math.sqrt(1 + (alpha * pdf(alpha) - beta * pdf(beta)) / mass - ((pdf(alpha) - pdf(beta)) / mass) ** 2)
    for values in (ours, theirs):
        assert values.min() >= -1.0 and values.max() <= 2.5
        assert abs(values.mean() - mean) < 0.005 and abs(values.std() / std - 1) < 0.005


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (6, 4, 3, 3), (6, 2, 1, 3)])
def test_deterministic_fills_equal_torch(shape):
    for ours, theirs in ((lambda a: I.zeros_(a), TI.zeros_), (lambda a: I.ones_(a), TI.ones_),
                         (lambda a: I.constant_(a, -0.75), lambda t: TI.constant_(t, -0.75))):
        array = np.random.default_rng(0).standard_normal(shape)
        p = Parameter(array)
        assert ours(p) is p and p.data is array
        assert np.array_equal(array, theirs(torch.randn(shape, dtype=torch.float64)).numpy())
    if len(shape) == 2:
        assert np.array_equal(I.eye_(np.ones(shape)), TI.eye_(torch.ones(shape, dtype=torch.float64)).numpy())
    else:
        for groups in (1, 2, 3):
            if shape[0] % groups == 0:
                assert np.array_equal(I.dirac_(np.ones(shape), groups),
                                      TI.dirac_(torch.ones(shape, dtype=torch.float64), groups).numpy())


def test_orthogonal_matches_torch_properties():
    for shape in ((6, 10), (10, 6), (4, 2, 3, 3)):
        ours = I.orthogonal_(np.empty(shape), gain=2.0, generator=np.random.default_rng(0)).reshape(shape[0], -1)
        theirs = TI.orthogonal_(torch.empty(shape, dtype=torch.float64), gain=2.0).reshape(shape[0], -1).numpy()
        for values in (ours, theirs):
            gram = values @ values.T if shape[0] <= values.shape[1] else values.T @ values
            assert np.abs(gram - 4 * np.eye(len(gram))).max() < 1e-12


def test_init_keeps_layout_and_fills_in_place():
    """A Conv2d weight (a channels-last view) stays the same array, in its layout; a float32 array stays float32."""
    conv = nr.nn.Conv2d(3, 8, 3, dtype="float64")
    data, strides = conv.weight.data, conv.weight.data.strides
    I.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=np.random.default_rng(0))
    assert conv.weight.data is data and conv.weight.data.strides == strides
    expected = np.random.default_rng(0).normal(0, math.sqrt(2) / math.sqrt(8 * 9), (8, 3, 3, 3))
    assert np.array_equal(conv.weight.data, expected)
    single = I.xavier_uniform_(np.empty((4, 5), np.float32))
    assert single.dtype == np.float32
    with pytest.raises(TypeError, match="Parameter or a NumPy/CuPy array"):
        I.zeros_([1.0, 2.0])
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        I.normal_(np.empty(3), generator=0)
    with pytest.raises(ValueError, match="fan_in, fan_out"):
        I.kaiming_normal_(np.empty((3, 3)), mode="fan")
    with pytest.warns(UserWarning, match="zero-element"):
        I.kaiming_uniform_(np.empty((0, 3)))


def test_module_apply_and_numel_match_torch():
    torch.manual_seed(0)
    reference = R.build("resnet18")
    model = nr.resnet18(dtype="float64")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert [p.numel() for p in model.parameters()] == [p.numel() for p in reference.parameters()]
    ours, theirs = [], []
    assert model.apply(lambda m: ours.append(type(m).__name__)) is model
    reference.apply(lambda m: theirs.append(type(m).__name__))
    assert ours == theirs

    def init_weights(module):
        if isinstance(module, nr.nn.Linear):
            I.zeros_(module.weight)
            I.constant_(module.bias, 0.5)

    model.apply(init_weights)
    assert not model.fc.weight.data.any() and np.all(model.fc.bias.data == 0.5)


# --- nn.utils clipping ------------------------------------------------------------------------------

def _gradient_pairs(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (7,), (2, 3, 3, 3), (1,)]
    ours, theirs = [], []
    for shape in shapes:
        p = Parameter(rng.standard_normal(shape))
        p.grad = scale * rng.standard_normal(shape)
        t = torch.from_numpy(p.data.copy()).requires_grad_()
        t.grad = torch.from_numpy(p.grad.copy())
        ours.append(p)
        theirs.append(t)
    ours.append(Parameter(np.ones(3)))                 # no gradient: skipped by both
    theirs.append(torch.ones(3, dtype=torch.float64, requires_grad=True))
    return ours, theirs


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = _gradient_pairs(1)
    total = nr.nn.utils.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert isinstance(total, np.ndarray) and total.shape == () and total.dtype == np.float64
    assert rel_err(total, expected) < 1e-14
    for p, t in zip(ours, theirs):
        assert (p.grad is None) == (t.grad is None)
        if p.grad is not None:
            assert rel_err(p.grad, t.grad) < 1e-14


def test_clip_grad_norm_single_parameter_generator_and_nonfinite():
    ours, theirs = _gradient_pairs(2)
    total = nr.nn.utils.clip_grad_norm_(ours[0], 0.1)
    assert rel_err(total, torch.nn.utils.clip_grad_norm_(theirs[0], 0.1)) < 1e-14
    assert rel_err(ours[0].grad, theirs[0].grad) < 1e-14
    model = nr.nn.Linear(3, 2, dtype="float64")
    model.weight.grad, model.bias.grad = np.full((2, 3), 4.0), np.full(2, 3.0)
    assert float(nr.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == pytest.approx(math.sqrt(16 * 6 + 18))
    ours[1].grad[0] = np.nan
    theirs[1].grad[0] = math.nan
    for clip, params in ((nr.nn.utils.clip_grad_norm_, ours), (torch.nn.utils.clip_grad_norm_, theirs)):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip(params, 1.0, error_if_nonfinite=True)
    assert np.isnan(nr.nn.utils.clip_grad_norm_(ours, 1.0))
    assert math.isnan(torch.nn.utils.clip_grad_norm_(theirs, 1.0).item())
    assert float(nr.nn.utils.clip_grad_norm_([Parameter(np.ones(2))], 1.0)) == 0.0


def test_get_total_norm_and_clip_grads_with_norm_match_torch():
    ours, theirs = _gradient_pairs(3)
    total = nr.nn.utils.get_total_norm([p.grad for p in ours if p.grad is not None], 3.0)
    expected = torch.nn.utils.get_total_norm([t.grad for t in theirs if t.grad is not None], 3.0)
    assert rel_err(total, expected) < 1e-14
    nr.nn.utils.clip_grads_with_norm_(ours, 0.7, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.7, expected)
    assert max(rel_err(p.grad, t.grad) for p, t in zip(ours, theirs) if p.grad is not None) < 1e-14


def test_clip_grad_value_matches_torch():
    ours, theirs = _gradient_pairs(4, scale=2.0)
    grads = [p.grad for p in ours]
    assert nr.nn.utils.clip_grad_value_(ours, 1.25) is None
    torch.nn.utils.clip_grad_value_(theirs, 1.25)
    for p, t, g in zip(ours, theirs, grads):
        if p.grad is not None:
            assert p.grad is g and np.array_equal(p.grad, t.grad.numpy())


# --- MSELoss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5), (7,), ()])
def test_mse_loss_matches_torch(reduction, shape):
    rng = np.random.default_rng(len(shape))
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    expected = torch.nn.MSELoss(reduction=reduction)(xt, torch.from_numpy(y))
    crit = nr.nn.MSELoss(reduction=reduction, dtype="float64")
    loss = crit(x, y)
    assert loss.shape == tuple(expected.shape)
    assert rel_err(loss, expected) < 1e-14
    upstream = rng.standard_normal(shape) if reduction == "none" else rng.standard_normal(())
    expected.backward(torch.tensor(upstream))
    dx = crit.backward(upstream)
    assert rel_err(dx, xt.grad) < 1e-14
    if reduction != "none":
        crit(x, y)
        assert rel_err(crit.backward(), 2 * (x - y) / (x.size if reduction == "mean" else 1)) < 1e-15


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_mse_loss_legacy_arguments_and_errors():
    assert nr.nn.MSELoss(size_average=False).reduction == torch.nn.MSELoss(size_average=False).reduction
    assert nr.nn.MSELoss(reduce=False).reduction == torch.nn.MSELoss(reduce=False).reduction
    crit = nr.nn.MSELoss()
    with pytest.raises(ValueError, match="does not broadcast"):
        crit(np.zeros((3, 1), np.float32), np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="one dtype"):
        crit(np.zeros(3, np.float32), np.zeros(3, np.float64))
    with pytest.raises(FloatingPointError, match="not finite"):
        crit(np.array([np.nan], np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="reduction"):
        nr.nn.MSELoss(reduction="avg")
    crit = nr.nn.MSELoss(reduction="none")
    crit(np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match="needs their gradient"):
        crit.backward()


# --- TensorDataset ----------------------------------------------------------------------------------

def test_tensor_dataset_matches_torch():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3, 2, 2)), rng.integers(0, 4, 6)
    ours = nr.data.TensorDataset(x, y)
    theirs = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    assert len(ours) == len(theirs) == 6 and ours.tensors[0] is x
    for index in (0, 5, -1, slice(1, 4), [4, 0, 2]):
        for a, b in zip(ours[index], theirs[index]):
            assert np.array_equal(a, b.numpy())
    xb, yb = ours[np.array([3, 1])]
    assert xb.shape == (2, 3, 2, 2) and list(yb) == [y[3], y[1]]
    with pytest.raises(ValueError, match="Size mismatch"):
        nr.data.TensorDataset(x, y[:5])
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        nr.data.TensorDataset(x, [1, 2, 3, 4, 5, 6])


# --- unbatched input through whole models -----------------------------------------------------------

def _unbatched_parity(model, reference, x, upstream, exact_model):
    """numres on one (C, H, W) image against torch on the batch of one; and against numres's own batch of
    one (equal bit for bit; in training mode the output does not depend on the running statistics)."""
    model.zero_grad()
    reference.zero_grad()
    logits = model(x)
    dx = model.backward(upstream)
    grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    assert logits.shape == upstream.shape and dx.shape == x.shape
    xt = torch.from_numpy(x[None].copy()).requires_grad_()
    out = reference(xt)
    out.backward(torch.from_numpy(upstream[None].copy()))
    errors = {"logits": rel_err(logits, out[0]), "input gradient": rel_err(dx, xt.grad[0])}
    errors.update({k: rel_err(g, p.grad) for (k, g), (_, p) in zip(grads.items(), reference.named_parameters())})
    # and numres unbatched == numres batched of one, bit for bit
    model.zero_grad()
    batched = exact_model(x[None])
    assert np.array_equal(batched[0], logits)
    assert np.array_equal(exact_model.backward(upstream[None])[0], dx)
    return errors


def test_unbatched_image_through_resnet_matches_torch():
    rng = np.random.default_rng(0)
    nr.init.manual_seed(0)
    model = nr.resnet18(num_classes=5, dtype="float64")
    R.randomize_batchnorms(model)
    reference = R.build("resnet18", num_classes=5).double()
    for mode in ("train", "eval"):
        R.load_numres_state(reference, model)
        getattr(model, mode)()
        getattr(reference, mode)()
        x, upstream = rng.standard_normal((3, 40, 36)), rng.standard_normal(5)
        errors = _unbatched_parity(model, reference, x, upstream, model)
        assert max(errors.values()) < 1e-10, (mode, errors)


def test_unbatched_image_through_cifar_net_matches_torch():
    from numres.models.cifar import CifarResNet
    from test_cifar_models import TorchCifarNet
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    reference = TorchCifarNet(1, 7, 3, True).double().eval()
    model = CifarResNet(1, num_classes=7, dtype="float64").eval()
    model.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, strict=False)
    x, upstream = rng.standard_normal((3, 9, 11)), rng.standard_normal(7)
    errors = _unbatched_parity(model, reference, x, upstream, model)
    assert max(errors.values()) < 1e-10, errors


def test_unbatched_layer_gradients_still_work():
    conv = nr.nn.Conv2d(3, 4, 3, dtype="float64")
    x = np.random.default_rng(0).standard_normal((3, 6, 6))
    y = conv(x)
    assert y.shape == (4, 4, 4) and conv.backward(np.ones_like(y)).shape == (3, 6, 6)
    with pytest.raises(ValueError, match=r"unbatched 3-D \(C, H, W\)"):
        nr.resnet18()(np.zeros((32, 32), np.float32))


# --- pooling's stride=() ----------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride", [(3, ()), (2, []), ((2, 3), ()), (3, None)])
def test_pool_stride_empty_means_kernel_size(kernel, stride):
    from numres.functional import pooling as P
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8))
    xt = torch.from_numpy(x).requires_grad_()
    for ours_forward, ours_backward, theirs, module, torch_module in (
            (P.avgpool2d_forward, P.avgpool2d_backward, torch.nn.functional.avg_pool2d, nr.nn.AvgPool2d,
             torch.nn.AvgPool2d),
            (P.maxpool2d_forward, P.maxpool2d_backward, torch.nn.functional.max_pool2d, nr.nn.MaxPool2d,
             torch.nn.MaxPool2d)):
        expected = theirs(xt, kernel, stride=stride)
        y, cache = ours_forward(x, kernel, stride)
        upstream = rng.standard_normal(y.shape)
        (grad,) = torch.autograd.grad(expected, xt, torch.from_numpy(upstream))
        assert rel_err(y, expected) < 1e-15 and rel_err(ours_backward(upstream, cache), grad) < 1e-15
        layer = module(kernel, stride=stride, dtype="float64")
        assert rel_err(layer(x), expected) < 1e-15
        assert rel_err(layer.backward(upstream), grad) < 1e-15
        assert str(layer).startswith(str(torch_module(kernel, stride=stride))[:-1].split(", padding")[0])


# --- the same on every backend (CuPy where a GPU is present) ----------------------------------------

def test_habits_on_backend(backend):
    """init, clipping, MSELoss, the colour adjustments and TensorDataset work on the backend's own arrays
    and give the NumPy results; clipping returns a 0-d array there (no host read)."""
    from numres.data import transforms as T
    xp = nr.backend.get_xp(backend)
    host = np.random.default_rng(0).standard_normal((6, 4, 3, 3))
    device = xp.asarray(host)
    I.kaiming_uniform_(device, generator=np.random.default_rng(1))
    assert rel_err(device, I.kaiming_uniform_(np.empty((6, 4, 3, 3)), generator=np.random.default_rng(1))) == 0
    assert rel_err(I.eye_(xp.ones((3, 4))), np.eye(3, 4)) == 0 and rel_err(I.zeros_(device), np.zeros_like(host)) == 0

    ours, theirs = _gradient_pairs(5)
    for p in ours:
        p.data = xp.asarray(p.data)
        p.grad = None if p.grad is None else xp.asarray(p.grad)
    for norm_type in (2.0, math.inf):
        total = nr.nn.utils.clip_grad_norm_(ours, 0.3, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 0.3, norm_type)
        assert isinstance(total, xp.ndarray) and rel_err(total, expected) < 1e-14
    nr.nn.utils.clip_grad_value_(ours, 0.01)
    torch.nn.utils.clip_grad_value_(theirs, 0.01)
    assert max(rel_err(p.grad, t.grad) for p, t in zip(ours, theirs) if p.grad is not None) < 1e-14

    x, y = xp.asarray(host), xp.asarray(host[::-1].copy())
    crit = nr.nn.MSELoss(backend=backend, dtype="float64")
    loss = crit(x, y)
    xt = torch.from_numpy(host).requires_grad_()
    expected = torch.nn.functional.mse_loss(xt, torch.from_numpy(host[::-1].copy()))
    expected.backward()
    assert isinstance(loss, xp.ndarray) and rel_err(loss, expected) < 1e-14
    assert rel_err(crit.backward(), xt.grad) < 1e-14

    image = np.random.default_rng(2).random((2, 3, 5, 4))
    for name, factor in (("brightness", 1.3), ("contrast", 0.6), ("saturation", 1.7), ("hue", -0.3)):
        adjust = getattr(T, f"adjust_{name}")
        assert rel_err(adjust(xp.asarray(image), factor), adjust(image, factor)) < 1e-15
    data = nr.data.TensorDataset(x, xp.arange(6))
    assert len(data) == 6 and isinstance(data[xp.asarray([1, 2])][0], xp.ndarray)
