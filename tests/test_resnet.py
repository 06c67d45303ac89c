"""The ResNet family against a torchvision-structured PyTorch reference (tests/torch_reference.py).

With identical weights, both models see the same 2x3x64x64 batch and the same random
dL/dlogits; we compare logits, dL/dx, every parameter gradient by name and every BN
buffer after the step, in train and eval mode.

Every comparison is against PyTorch in float64, never against PyTorch's float32 alone, whose
results differ from CPU to CPU.  float64 is held to 1e-10 everywhere.  float32 is held to 1e-4
wherever the comparison is well conditioned (eval mode; resnet18).  ResNet-50 in train mode is not: a few
pre-activations lie within float32 rounding of zero, so the ReLU masks of *any* two float32
implementations differ in a few places and some gradients (layer4's BN parameters, say)
move by 1e-3..1e-1 relative; PyTorch float32 shows the same spread against PyTorch float64.
There numres's float32 is measured against the float64 reference, to a bound set by how far one
float32 rounding of the inputs moves the float64 result (see that test).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import torch_reference as R
from conftest import TOL, TORCH_DTYPE

PARAM_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}
BIG = {"resnet101", "resnet152", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"}


def make_pair(name, dtype, train=True, seed=0, torch_dtype=None, **kwargs):
    """A numres model (seeded init, randomized BN state) and the reference holding the same values."""
    nr.manual_seed(seed)
    model = getattr(nr, name)(dtype=dtype, **kwargs)
    R.randomize_batchnorms(model, seed + 1)
    reference = R.build(name, **kwargs).to(TORCH_DTYPE[torch_dtype or dtype])
    R.load_numres_state(reference, model)
    model.train(train)
    reference.train(train)
    return model, reference


def batch(dtype, classes=1000, n=2, size=64, seed=2, channels_last=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return x, rng.standard_normal((n, classes)).astype(dtype)


def assert_all_below(errors, tol):
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < tol}
    assert not bad, f"{len(bad)} of {len(errors)} tensors exceed {tol:.0e}: {dict(list(bad.items())[:8])}"


# --- numbers against PyTorch --------------------------------------------------------------------------

def _cases():
    """resnet18 and resnet50, float64 and float32, train and eval; resnet50 float32 train has its own test."""
    for name in ("resnet18", "resnet50"):
        for dtype in ("float64", "float32"):
            for train in (True, False):
                if (name, dtype, train) == ("resnet50", "float32", True):
                    continue
                marks = [pytest.mark.slow] if name == "resnet50" else []
                yield pytest.param(name, dtype, train, marks=marks,
                                   id=f"{name}-{dtype}-{'train' if train else 'eval'}")


@pytest.mark.parametrize("name, dtype, train", list(_cases()))
def test_model_matches_torch(name, dtype, train):
    """Both dtypes are judged against PyTorch in float64: PyTorch's own float32 differs by CPU (oneDNN on an
    AMD AVX2 machine is 5.9e-3 off its float64 on ResNet-50's input gradient in eval mode)."""
    model, reference = make_pair(name, dtype, train, torch_dtype="float64")
    x, upstream = batch(dtype)
    errors = R.model_parity(model, reference, x, upstream)
    assert len([k for k in errors if k.startswith("grad ")]) == len(list(model.parameters()))
    assert_all_below(errors, TOL[dtype])


def test_resnet18_channels_last_input():
    """A channels-last view as input gives the same numbers as PyTorch on the contiguous tensor."""
    model, reference = make_pair("resnet18", "float64", True, seed=3)
    x, upstream = batch("float64", seed=4, channels_last=True)
    assert not x.flags["C_CONTIGUOUS"]
    assert_all_below(R.model_parity(model, reference, x, upstream), TOL["float64"])


# numres float32 may err at most this many times what one float32 rounding of the inputs and weights
# alone moves the float64 result (see test_resnet50_float32_train_against_the_float64_truth).
FLOAT32_OVER_SENSITIVITY = 20


def _perturbed_like_float32_rounding(torch_model, x, seed):
    """Every weight and input entry times ``1 + u * 2^-24`` (u uniform in [-1, 1]): one float32 rounding."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.mul_(1 + 2.0 ** -24 * torch.from_numpy(rng.uniform(-1, 1, p.shape)))
    return x.astype(np.float64) * (1 + 2.0 ** -24 * rng.uniform(-1, 1, x.shape))


def _summary(errors):
    grads = np.array([v for k, v in errors.items() if k.startswith("grad ")])
    buffers = np.array([v for k, v in errors.items() if k.startswith("buffer ")])
    return {"logits": errors["logits"], "input gradient": errors["input gradient"],
            "median grad": float(np.median(grads)), "worst grad": float(grads.max()),
            "worst buffer": float(buffers.max())}


@pytest.mark.slow
def test_resnet50_float32_train_against_the_float64_truth():
    """numres float32 against the float64 truth, to a bound set by the problem's own conditioning.

    Train-mode ResNet-50 gradients at this size are not a smooth function of the input: ReLU and
    max-pool decisions lie within float32 rounding of their thresholds, and train-mode BN spreads
    each flip over the batch.  Measured here, in float64 alone, rounding the inputs and weights once
    to float32 precision (relative 2^-24, ``_perturbed_like_float32_rounding``) already moves the
    median parameter gradient by 7e-3, the worst by 0.11, dx by 1e-2, the logits by 1.2e-5 and the
    BN buffers by 1.2e-5.  A float32 forward/backward rounds at every one of ~160 operations, so
    its error is a few times that: numres measured 3.3x (worst gradient) to 7.7x (buffers); PyTorch's
    own float32 on this CPU 3.2x to 6.5x.  The bound is FLOAT32_OVER_SENSITIVITY = 20 times the
    float64 sensitivity, per statistic: CPU-independent (everything but numres's float32 is float64;
    no float32 PyTorch result enters, as those differ by CPU), with a margin of 2.6x or more; the
    buffers must also be within 1e-3 outright.
    """
    x, upstream = batch("float32")
    model32, _ = make_pair("resnet50", "float32")
    _, truth = make_pair("resnet50", "float32", torch_dtype="float64")
    reference = R.torch_pass(truth, x, upstream)
    ours = _summary(R.compare_passes(R.numres_pass(model32, x, upstream), reference))
    _, perturbed = make_pair("resnet50", "float32", torch_dtype="float64")
    x_perturbed = _perturbed_like_float32_rounding(perturbed, x, seed=5)
    sensitivity = _summary(R.compare_passes(R.torch_pass(perturbed, x_perturbed, upstream), reference))
    assert all(0 < v < 1 for v in sensitivity.values()), sensitivity      # a real, finite perturbation
    for what, error in ours.items():
        bound = FLOAT32_OVER_SENSITIVITY * sensitivity[what]
        assert error <= bound, \
            f"{what}: {error:.2e} from the float64 truth > {bound:.2e} ({sensitivity[what]:.2e} x 20)"
    assert ours["worst buffer"] < 1e-3


def test_eval_mode_leaves_buffers_alone():
    model, _ = make_pair("resnet18", "float32", train=False)
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    x, upstream = batch("float32", classes=1000, n=1, size=32)
    model(x)
    model.backward(upstream)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs", [dict(replace_stride_with_dilation=[False, True, True]),
                                    dict(groups=4, width_per_group=8), dict(width_per_group=16),
                                    dict(zero_init_residual=True, num_classes=10)])
def test_resnet_variants_match_torch(kwargs):
    """Dilation instead of stride, ResNeXt grouping and wide blocks, on a one-block-per-stage model."""
    nr.manual_seed(5)
    model = nr.ResNet(nr.Bottleneck, [1, 1, 1, 1], dtype="float64", **kwargs)
    R.randomize_batchnorms(model, 6)
    reference = R.ResNet(R.Bottleneck, [1, 1, 1, 1], **kwargs).double()
    R.load_numres_state(reference, model)
    x, upstream = batch("float64", classes=model.fc.out_features, n=2, size=48, seed=7)
    assert_all_below(R.model_parity(model, reference, x, upstream), TOL["float64"])


# --- structure: names, counts, printing, init -----------------------------------------------------------

@pytest.mark.parametrize("name", [n if n not in BIG else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PARAM_COUNTS])
def test_builder_parameter_count_and_names(name):
    """Parameter count as torchvision states it; state_dict keys, order and shapes equal the reference's."""
    model = getattr(nr, name)()
    assert sum(p.size for p in model.parameters()) == PARAM_COUNTS[name]
    with torch.device("meta"):
        reference = R.build(name)
    assert sum(p.numel() for p in reference.parameters()) == PARAM_COUNTS[name]   # the oracle itself
    ours = model.state_dict()
    theirs = reference.state_dict()
    assert list(ours) == list(theirs)
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in reference.named_parameters()]
    for key, value in theirs.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
    assert ours["layer1.0.conv1.weight"].dtype == np.float32
    assert ours["layer1.0.bn1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_printout_equals_torchvision(name):
    model = getattr(nr, name)()
    with torch.device("meta"):
        reference = R.build(name)
    assert str(model) == R.classic_repr(reference)
    assert "(layer4): Sequential(" in str(model)


@pytest.mark.parametrize("name, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual(name, last_bn):
    model = getattr(nr, name)(zero_init_residual=True)
    zeroed = {k for k, p in model.named_parameters() if k.endswith(".weight") and not np.any(p.data)}
    blocks = {k.rsplit(".", 2)[0] for k, _ in model.named_parameters() if k.startswith("layer")}
    assert zeroed == {f"{b}.{last_bn}.weight" for b in blocks if b.count(".") == 1}
    assert np.all(getattr(nr, name)().layer1[0].__getattribute__(last_bn).weight.data == 1)


def test_initialisation_statistics():
    """Kaiming normal (fan_out, relu) convolutions, BN 1/0, PyTorch's default Linear; seedable."""
    nr.manual_seed(0)
    model = nr.resnet50()
    w = model.layer3[0].conv2.weight.data          # (256, 256, 3, 3): fan_out = 256 * 9
    assert abs(w.std() / np.sqrt(2.0 / (256 * 9)) - 1) < 0.02 and abs(w.mean()) < 1e-3
    bound = 1 / np.sqrt(2048)
    assert np.abs(model.fc.weight.data).max() <= bound and np.abs(model.fc.weight.data).max() > 0.99 * bound
    assert np.all(model.bn1.weight.data == 1) and np.all(model.bn1.bias.data == 0)
    nr.manual_seed(0)
    np.testing.assert_array_equal(nr.resnet50().layer3[0].conv2.weight.data, w)


def test_to_float64_round_trip():
    nr.manual_seed(0)
    model = nr.resnet18(num_classes=10)
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    model.to(dtype="float64")
    assert all(p.data.dtype == np.float64 for p in model.parameters())
    assert model.layer1[0].bn1.running_var.dtype == np.float64
    assert model.layer1[0].bn1.num_batches_tracked.dtype == np.int64
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key].astype(value.dtype), err_msg=key)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    assert model.eval()(x).dtype == np.float64
    model.to(dtype="float32")
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype, key
        np.testing.assert_array_equal(value, before[key], err_msg=key)
