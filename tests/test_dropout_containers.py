"""Dropout, Dropout2d, ModuleList and ModuleDict against PyTorch.

Dropout's masks come from numres's generator, so they cannot equal PyTorch's draws: the tests
check the mask's statistics (a binomial bound), that forward and backward are the mask applied
by hand (and by PyTorch's arithmetic on that mask), finite differences with a fixed mask, eval
mode, the p = 0 and p = 1 edge cases, seeding, and the printed text.  The containers are checked
by name, state dict and printed text against torch.nn, and through a user's own Module with its
own backward, compared with the same model in PyTorch.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import numres as nr
import error_measure
import torch_reference as R
from conftest import TORCH_DTYPE, assert_close, to_torch
from numres.testing import GuardedArray, guard_xp, no_transfers


def _binomial_bound(n, p_keep, sigmas=6.0):
    """|kept / n - p_keep| stays below this with overwhelming probability (6 standard deviations)."""
    return sigmas * np.sqrt(p_keep * (1 - p_keep) / n)


def _fd_check(module, x, seed, positions=25, eps=1e-6):
    """Central differences of L = sum(module(x) * r) with the mask held fixed (reseeding before
    each forward), against module.backward(r); worst relative error."""
    rng = np.random.default_rng(seed)
    nr.manual_seed(seed)
    y = module(x)
    upstream = rng.standard_normal(y.shape)
    analytic = module.backward(upstream)
    errors = []
    for flat in rng.choice(x.size, size=min(positions, x.size), replace=False):
        index = np.unravel_index(flat, x.shape)
        original = x[index]
        values = []
        for shifted in (original + eps, original - eps):
            x[index] = shifted
            nr.manual_seed(seed)
            values.append(float((module(x) * upstream).sum()))
        x[index] = original
        numeric = (values[0] - values[1]) / (2 * eps)
        errors.append(abs(numeric - analytic[index]) / max(abs(analytic).max(), 1e-300))
    return error_measure.max_error(errors)           # a NaN counts as inf: never dropped


# --- Dropout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_mask_statistics(p):
    """The fraction kept is 1 - p within a binomial bound, neighbours are independent, and each kept
    element is scaled by exactly 1 / (1 - p)."""
    nr.manual_seed(1)
    x = np.random.default_rng(2).standard_normal((64, 50, 70)) + 5.0        # no zeros in x
    y = nr.nn.Dropout(p, dtype="float64")(x)
    kept = y != 0
    n = kept.size
    assert abs(kept.mean() - (1 - p)) < _binomial_bound(n, 1 - p)
    both = (kept[..., 1:] & kept[..., :-1]).mean()                           # pairs of neighbours
    assert abs(both - (1 - p) ** 2) < _binomial_bound(kept[..., 1:].size, (1 - p) ** 2)
    np.testing.assert_array_equal(y[kept], x[kept] * (1.0 / (1.0 - p)))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout2d_drops_whole_channels_with_the_right_frequency(p):
    nr.manual_seed(3)
    x = np.random.default_rng(4).standard_normal((200, 60, 3, 5)) + 5.0
    y = nr.nn.Dropout2d(p, dtype="float64")(x)
    kept_maps = (y != 0).all(axis=(2, 3))
    dropped_maps = (y == 0).all(axis=(2, 3))
    assert (kept_maps | dropped_maps).all(), "a channel was partly dropped"
    assert abs(kept_maps.mean() - (1 - p)) < _binomial_bound(kept_maps.size, 1 - p)
    np.testing.assert_array_equal(y[kept_maps], x[kept_maps] * (1.0 / (1.0 - p)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls, shape", [(nr.nn.Dropout, (4, 7, 5)), (nr.nn.Dropout2d, (3, 6, 5, 4)),
                                        (nr.nn.Dropout2d, (6, 5, 4))])
def test_forward_and_backward_are_the_mask_applied_by_hand(cls, shape, dtype):
    """With the mask recovered from the output, PyTorch's arithmetic on that mask (autograd through
    ``x * mask / (1 - p)``, float64) gives the same output and input gradient."""
    p = 0.3
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) + 4.0).astype(dtype)
    upstream = rng.standard_normal(shape).astype(dtype)
    nr.manual_seed(6)
    module = cls(p)
    y = module(x)
    dx = module.backward(upstream)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == x.dtype
    mask = torch.from_numpy((y != 0).astype(np.float64))
    x_t = to_torch(x).double().requires_grad_(True)
    y_t = x_t * mask / (1 - p)
    y_t.backward(to_torch(upstream).double())
    assert_close(y, y_t, dtype, "output")
    assert_close(dx, x_t.grad, dtype, "input gradient")
    if cls is nr.nn.Dropout2d:
        channel_mask = mask.reshape(-1, *shape[-3:]).amax(dim=(2, 3))        # whole channels
        assert torch.equal(mask.reshape(-1, *shape[-3:]), channel_mask[..., None, None].expand_as(
            mask.reshape(-1, *shape[-3:])))


@pytest.mark.parametrize("cls, shape", [(nr.nn.Dropout, (3, 4, 5)), (nr.nn.Dropout2d, (2, 5, 3, 3))])
def test_backward_against_finite_differences(cls, shape):
    x = np.random.default_rng(7).standard_normal(shape)
    assert _fd_check(cls(0.4, dtype="float64"), x, seed=8) < 1e-8


def test_eval_mode_and_p_zero_are_the_identity():
    rng = np.random.default_rng(9)
    x, upstream = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    for module in (nr.nn.Dropout(0.7).eval(), nr.nn.Dropout2d(0.7).eval(), nr.nn.Dropout(0.0),
                   nr.nn.Dropout2d(0)):
        state = nr.init.get_rng_state()
        np.testing.assert_array_equal(module(x), x)
        np.testing.assert_array_equal(module.backward(upstream), upstream)
        assert nr.init.get_rng_state() == state, "the identity drew random numbers"


@pytest.mark.parametrize("cls", ["Dropout", "Dropout2d"])
def test_p_one_gives_zeros_as_torch(cls):
    rng = np.random.default_rng(10)
    x, upstream = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    ours = getattr(nr.nn, cls)(1.0, dtype="float64")
    x_t = to_torch(x, requires_grad=True)
    y_t = getattr(torch.nn, cls)(1.0)(x_t)
    y_t.backward(to_torch(upstream))
    y = ours(x)
    np.testing.assert_array_equal(y, y_t.detach().numpy())
    np.testing.assert_array_equal(np.signbit(y), np.signbit(y_t.detach().numpy()))   # x * 0 keeps signs
    np.testing.assert_array_equal(ours.backward(upstream), x_t.grad.numpy())


def test_same_seed_same_masks_and_fresh_masks_each_call():
    x = np.random.default_rng(11).standard_normal((8, 16, 4, 4)) + 3.0
    module = nr.nn.Dropout(0.5, dtype="float64")
    nr.manual_seed(12)
    first, second = module(x), module(x)
    nr.manual_seed(12)
    np.testing.assert_array_equal(module(x), first)
    np.testing.assert_array_equal(module(x), second)
    assert not np.array_equal(first != 0, second != 0)
    nr.manual_seed(13)
    assert not np.array_equal(module(x) != 0, first != 0)


def test_mask_is_kept_for_backward_and_freed_after():
    rng = np.random.default_rng(14)
    x, upstream = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    module = nr.nn.Dropout(0.5)
    y = module(x)
    dx = module.backward(upstream)
    nr.manual_seed(0)                          # drawing again must not change the saved mask
    np.testing.assert_array_equal(dx != 0, y != 0)
    with pytest.raises(RuntimeError, match="second time"):
        module.backward(upstream)
    with nr.no_grad():
        module(x)
    with pytest.raises(RuntimeError, match="before forward"):
        module.backward(upstream)


def test_inplace_unbatched_empty_and_dtype_following():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, 8, 8)) + 3.0
    original = x.copy()
    y = nr.nn.Dropout(0.5, inplace=True)(x)
    assert y is x and np.array_equal((x != 0), (y != 0)) and not np.array_equal(x, original)
    unbatched = nr.nn.Dropout2d(0.5, dtype="float64")
    z = unbatched(original)
    assert z.shape == (3, 8, 8) and unbatched.backward(rng.standard_normal((3, 8, 8))).shape == (3, 8, 8)
    assert ((z != 0).all(axis=(1, 2)) | (z == 0).all(axis=(1, 2))).all()
    assert nr.nn.Dropout(0.5)(np.zeros((0, 4))).shape == (0, 4)
    assert nr.nn.Dropout2d(0.5)(np.zeros((0, 4, 2, 2))).shape == (0, 4, 2, 2)
    assert nr.nn.Dropout(0.5, dtype="float32")(original).dtype == np.float64    # parameterless: follows input


def test_bad_arguments():
    for p in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            nr.nn.Dropout(p)
        with pytest.raises(ValueError, match="dropout probability"):
            nr.nn.Dropout2d(p)
    with pytest.raises(ValueError, match="4-D .* 3-D"):
        nr.nn.Dropout2d()(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        nr.nn.Dropout()(np.zeros((2, 3), dtype=np.int64))


def test_repr_as_torch():
    for args in [(), (0.2,), (0.25, True)]:
        assert repr(nr.nn.Dropout(*args)) == repr(torch.nn.Dropout(*args))
        assert repr(nr.nn.Dropout2d(*args)) == repr(torch.nn.Dropout2d(*args))


def test_dropout_on_the_guard_backend_draws_on_the_device_without_host_trips(monkeypatch):
    """The GPU path: the mask is drawn by a device generator (here a stand-in for cupy.random
    returning guard arrays), seeded from numres's generator, reproducible, with no host round trip."""

    class DeviceRandomState:
        def __init__(self, seed):
            self.host = np.random.RandomState(seed % 2 ** 32)

        def random_sample(self, size, dtype=np.float64):
            return GuardedArray(self.host.random_sample(size).astype(dtype))

    monkeypatch.setattr(guard_xp, "random", types.SimpleNamespace(RandomState=DeviceRandomState), raising=False)
    x = nr.backend.asarray(np.random.default_rng(16).standard_normal((4, 6, 3, 3)) + 3.0, "guard")
    upstream = nr.backend.asarray(np.random.default_rng(17).standard_normal((4, 6, 3, 3)), "guard")
    module = nr.nn.Dropout2d(0.5, backend="guard", dtype="float64")
    results = []
    for _ in range(2):
        nr.manual_seed(18)
        with no_transfers():
            y = module(x)
            dx = module.backward(upstream)
        assert isinstance(y, GuardedArray) and isinstance(dx, GuardedArray)
        results.append(nr.to_numpy(y))
    np.testing.assert_array_equal(results[0], results[1])
    mask = results[0] != 0
    np.testing.assert_array_equal(nr.to_numpy(dx), nr.to_numpy(upstream) * mask * 2.0)
    assert 0 < mask.mean() < 1


def test_dropout_on_a_backend_without_a_generator_uploads_host_draws():
    """An array module with no ``random`` (the bare guard) gets host draws uploaded (host-to-device only)."""
    x = nr.backend.asarray(np.ones((50, 40)), "guard")
    nr.manual_seed(19)
    with no_transfers():
        y = nr.nn.Dropout(0.5, backend="guard")(x)
    nr.manual_seed(19)
    np.testing.assert_array_equal(nr.to_numpy(y), nr.nn.Dropout(0.5)(np.ones((50, 40))))


# --- ModuleList and ModuleDict ----------------------------------------------------------------------

def _linears(nn, sizes):
    return [nn.Linear(a, b) for a, b in sizes]


def _names(module):
    return [name for name, _ in module.named_parameters()]


def test_module_list_api_matches_torch():
    """The same sequence of list operations on both sides gives the same names and printed text."""
    lists = {nn: nn.ModuleList(_linears(nn, [(2, 3), (3, 4)])) for nn in (nr.nn, torch.nn)}
    for nn, ml in lists.items():
        ml.append(nn.Linear(4, 5))
        ml.extend([nn.ReLU(), nn.Linear(5, 5)])
        ml += [nn.Linear(5, 5)]
        ml.insert(1, nn.Linear(9, 9))
        ml[0] = nn.Linear(2, 2)
        del ml[3]
    ours, theirs = lists[nr.nn], lists[torch.nn]
    assert _names(ours) == _names(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert repr(a) == repr(b)
    assert repr(ours[-1]) == repr(theirs[-1]) and repr(ours[2]) == repr(theirs[2])
    assert repr(ours[1:4]) == repr(theirs[1:4]) and _names(ours[1:4]) == _names(theirs[1:4])   # renumbered
    assert repr(ours[::2]) == repr(theirs[::2])
    assert repr(ours + ours[:2]) == repr(theirs + theirs[:2])
    popped = ours.pop(1), theirs.pop(1)
    assert repr(popped[0]) == repr(popped[1]) and repr(ours) == repr(theirs)
    assert repr(nr.nn.ModuleList()) == repr(torch.nn.ModuleList())
    assert getattr(ours, "0") is ours[0]
    with pytest.raises(IndexError, match="out of range"):
        ours[10]
    with pytest.raises(TypeError, match="Modules"):
        ours.append(np.zeros(3))


def test_module_dict_api_matches_torch():
    dicts = {}
    for nn in (nr.nn, torch.nn):
        md = nn.ModuleDict({"b": nn.Linear(2, 3), "a": nn.ReLU()})
        md["c"] = nn.Linear(3, 1)
        md.update([("d", nn.Linear(4, 4)), ("a", nn.Linear(1, 1))])         # "a" is replaced in place
        md.update(nn.ModuleDict({"e": nn.Linear(2, 2)}))
        del md["b"]
        md.pop("d")
        dicts[nn] = md
    ours, theirs = dicts[nr.nn], dicts[torch.nn]
    assert list(ours) == list(theirs) == list(ours.keys()) == ["a", "c", "e"]
    assert _names(ours) == _names(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert [repr(v) for v in ours.values()] == [repr(v) for v in theirs.values()]
    assert [k for k, _ in ours.items()] == ["a", "c", "e"] and "c" in ours and "b" not in ours
    assert ours.a is ours["a"] and len(ours) == 3
    for bad, error in [("x.y", KeyError), ("", KeyError), ("keys", KeyError), (3, TypeError)]:
        with pytest.raises(error):
            ours[bad] = nr.nn.ReLU()
    with pytest.raises(TypeError, match="Modules"):
        ours["z"] = "not a module"
    with pytest.raises(KeyError):
        ours["missing"]
    ours.clear()
    assert len(ours) == 0 and repr(ours) == repr(torch.nn.ModuleDict()) == "ModuleDict()"


def test_containers_have_no_forward_or_backward():
    for holder in (nr.nn.ModuleList([nr.nn.ReLU()]), nr.nn.ModuleDict({"r": nr.nn.ReLU()})):
        with pytest.raises(NotImplementedError, match="no forward"):
            holder(np.zeros((1, 2)))
        with pytest.raises(NotImplementedError, match="no backward"):
            holder.backward(np.zeros((1, 2)))


# --- a user's own Module ----------------------------------------------------------------------------

class TorchTwoHeads(torch.nn.Module):
    """The reference: a stem, two branches added together, pooling and two classifier heads."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.branches = torch.nn.ModuleDict({
            "a": torch.nn.Conv2d(6, 6, 1),
            "b": torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
                                     torch.nn.ReLU())})
        self.pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 3), torch.nn.Linear(6, 4)])

    def forward(self, x):
        h = self.stem(x)
        features = self.pool(self.branches["a"](h) + self.branches["b"](h))
        return torch.cat([head(features) for head in self.heads], dim=1)


class TwoHeads(nr.nn.Module):
    """The same model written by a numres user, with its own forward and backward."""

    def __init__(self, dtype="float32"):
        super().__init__(dtype=dtype)
        nn = nr.nn
        self.stem = nn.Conv2d(3, 6, 3, padding=1, dtype=dtype)
        self.branches = nn.ModuleDict({
            "a": nn.Conv2d(6, 6, 1, dtype=dtype),
            "b": nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False, dtype=dtype), nn.BatchNorm2d(6, dtype=dtype),
                               nn.ReLU())})
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(6, 3, dtype=dtype), nn.Linear(6, 4, dtype=dtype)])

    def forward(self, x):
        h = self.stem(x)
        features = self.pool(self.branches["a"](h) + self.branches["b"](h))
        return self.xp.concatenate([head(features) for head in self.heads], axis=1)

    def backward(self, grad_output):
        # each head gets its columns of the gradient; the features' gradient is the sum over heads
        grad_features, start = 0, 0
        for head in self.heads:
            stop = start + head.out_features
            grad_features = grad_features + head.backward(grad_output[:, start:stop])
            start = stop
        grad_sum = self.pool.backward(grad_features)
        # h feeds both branches: its gradient is the sum of theirs
        grad_h = self.branches["a"].backward(grad_sum) + self.branches["b"].backward(grad_sum)
        return self.stem.backward(grad_h)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_users_two_head_model_matches_torch(dtype):
    nr.manual_seed(20)
    ours = TwoHeads(dtype=dtype)
    R.randomize_batchnorms(ours, seed=21)
    truth = TorchTwoHeads().double()
    assert list(ours.state_dict()) == list(truth.state_dict())
    assert _names(ours) == _names(truth)
    assert repr(ours).replace("TwoHeads", "X") == R.classic_repr(truth).replace("TorchTwoHeads", "X")
    R.load_numres_state(truth, ours)
    rng = np.random.default_rng(22)
    x, upstream = rng.standard_normal((3, 3, 7, 5)), rng.standard_normal((3, 7))
    result = R.numres_pass(ours, x.astype(dtype), upstream.astype(dtype))
    reference = R.torch_pass(truth, x, upstream)
    errors = R.compare_passes(result, reference)
    limit = 1e-10 if dtype == "float64" else 1e-4
    assert max(errors.values()) < limit, errors
    assert set(result["param_grads"]) == set(reference["param_grads"])


def test_users_two_head_model_against_finite_differences():
    nr.manual_seed(23)
    model = TwoHeads(dtype="float64")
    result = nr.gradcheck(model, np.random.default_rng(24).standard_normal((2, 3, 5, 5)), max_entries=12)
    assert set(result.errors) == {"input"} | set(_names(model))
    assert result.passed(1e-6), str(result)


def test_users_two_head_model_trains_with_adam_like_torch():
    nr.manual_seed(25)
    ours = TwoHeads(dtype="float64")
    truth = TorchTwoHeads().double()
    R.load_numres_state(truth, ours)
    opt_ours = nr.optim.Adam(ours.parameters(), lr=1e-2, weight_decay=1e-3)
    opt_truth = torch.optim.Adam(truth.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    rng = np.random.default_rng(26)
    for _ in range(3):
        x, upstream = rng.standard_normal((4, 3, 6, 6)), rng.standard_normal((4, 7))
        R.numres_pass(ours, x, upstream)
        R.torch_pass(truth, x, upstream)
        opt_ours.step()
        opt_truth.step()
    for name, p in truth.named_parameters():
        assert_close(dict(ours.named_parameters())[name].data, p, "float64", name)


# --- a resnet18 with a user's dropout head ------------------------------------------------------------

class FixedMaskDropout(torch.nn.Module):
    """The torch side of the comparison: dropout with the mask numres drew (printed as Dropout)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.inplace, self.mask = p, False, None

    def forward(self, x):
        return x * self.mask / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


def test_resnet18_with_a_dropout_head_trains_saves_and_prints_like_torch(tmp_path):
    """``model.fc = Sequential(Dropout(0.2), Linear(512, 10))``: one training step equals torch's with
    the same mask; the state dict has torch's keys and reloads; the text is torch's."""
    dtype = "float64"
    nr.manual_seed(27)
    ours = nr.resnet18(num_classes=10, dtype=dtype)
    ours.fc = nr.nn.Sequential(nr.nn.Dropout(0.2), nr.nn.Linear(512, 10, dtype=dtype))
    R.randomize_batchnorms(ours, seed=28)
    truth = R.build("resnet18", num_classes=10).to(TORCH_DTYPE[dtype])
    truth.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(512, 10)).to(TORCH_DTYPE[dtype])
    assert repr(ours) == R.classic_repr(truth)
    assert list(ours.state_dict()) == list(truth.state_dict())
    R.load_numres_state(truth, ours)
    truth.fc[0] = FixedMaskDropout(0.2)

    masks = []
    ours.fc[0].register_forward_hook(lambda module, inputs, output: masks.append(output != 0))
    rng = np.random.default_rng(29)
    x, target = rng.standard_normal((4, 3, 16, 16)), rng.integers(0, 10, 4)
    crit = nr.nn.CrossEntropyLoss(dtype=dtype)
    opt_ours = nr.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_truth = torch.optim.SGD(truth.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss = crit(ours(x), target)
    ours.backward(crit.backward())
    opt_ours.step()
    mask = masks[-1]
    assert 0 < mask.mean() < 1
    truth.fc[0].mask = torch.from_numpy(mask.astype(np.float64))
    torch_loss = torch.nn.functional.cross_entropy(truth(to_torch(x)), torch.from_numpy(target))
    torch_loss.backward()
    opt_truth.step()
    assert abs(float(loss) - torch_loss.item()) <= 1e-10 * abs(torch_loss.item())
    for name, p in truth.named_parameters():
        assert_close(dict(ours.named_parameters())[name].data, p, dtype, f"{name} after a step")

    nr.save(ours.state_dict(), tmp_path / "head.npz")
    nr.manual_seed(30)
    restored = nr.resnet18(num_classes=10, dtype=dtype)
    restored.fc = nr.nn.Sequential(nr.nn.Dropout(0.2), nr.nn.Linear(512, 10, dtype=dtype))
    restored.load_state_dict(nr.load(tmp_path / "head.npz"))
    restored.eval()
    ours.eval()
    with nr.no_grad():
        np.testing.assert_array_equal(restored(x), ours(x))                  # eval: dropout is the identity
    truth.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in nr.load(tmp_path / "head.npz").items()})
