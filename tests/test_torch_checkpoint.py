"""numres.load_torch_checkpoint reads torch.save files without PyTorch, and refuses anything but tensors.

Every checkpoint here is written by torch.save inside the test; the expected values are
the tensors themselves (exact equality), and model logits are checked against the
PyTorch reference ResNet (tests/torch_reference.py) holding the same weights.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import numres as nr
from numres.io import CheckpointError
from numres.torch_checkpoint import TorchCheckpointError, UnsafeCheckpointError, load_torch_checkpoint
from torch_reference import build


def _expected(tensor) -> np.ndarray:
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _assert_exact(loaded, reference):
    assert set(loaded) == set(reference)
    for key, tensor in reference.items():
        expected = _expected(tensor)
        assert loaded[key].dtype == expected.dtype, key
        assert loaded[key].shape == expected.shape, key
        assert np.array_equal(loaded[key], expected, equal_nan=True), key


def _randomized_reference(name="resnet18", seed=0, **kwargs):
    """A torchvision-shaped reference model with non-trivial weights and BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build(name, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(123)
    return model.eval()


def _awkward_layout(state):
    """The same values, stored the ways real checkpoints store them: channels-last, sliced, sharing storage."""
    state = collections.OrderedDict((k, v.clone()) for k, v in state.items())
    weight = state["conv1.weight"]                                   # (64, 3, 7, 7)
    state["conv1.weight"] = weight.contiguous(memory_format=torch.channels_last)
    assert not state["conv1.weight"].is_contiguous()
    fc = state["fc.weight"]                                          # transposed storage
    state["fc.weight"] = fc.t().contiguous().t()
    assert not state["fc.weight"].is_contiguous()
    wide = torch.zeros(fc.shape[0], 3)                               # a strided slice with an offset
    wide[:, 1] = state["fc.bias"]
    state["fc.bias"] = wide[:, 1]
    both = torch.stack([state["bn1.running_mean"], state["bn1.running_var"]])   # one storage, two views
    state["bn1.running_mean"], state["bn1.running_var"] = both[0], both[1]
    assert state["bn1.running_mean"].untyped_storage().data_ptr() == state["bn1.running_var"].untyped_storage().data_ptr()
    return state


def test_resnet18_state_dict_loads_exactly_and_logits_match_torch(tmp_path):
    reference = _randomized_reference("resnet18", num_classes=7)
    state = _awkward_layout(reference.state_dict())
    path = tmp_path / "resnet18-test.pth"
    torch.save(state, path)

    loaded = load_torch_checkpoint(path)
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(state)
    _assert_exact(loaded, state)
    assert loaded["bn1.num_batches_tracked"].shape == () and loaded["bn1.num_batches_tracked"] == 123
    for array in loaded.values():           # fresh arrays, never views into the file's buffer
        assert array.flags.owndata or array.base is None or array.base.flags.owndata
        assert array.flags.c_contiguous and array.flags.writeable

    model = nr.resnet18(weights=path, dtype="float64")      # num_classes follows the file's fc.weight
    assert model.fc.out_features == 7
    reference.double()
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 36))
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    actual = nr.to_numpy(model.eval()(x))
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-10


def test_float32_logits_through_builder(tmp_path):
    reference = _randomized_reference("resnet18", seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = nr.resnet18(weights=str(path)).eval()
    assert model.fc.out_features == 1000
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():           # a float64 truth: PyTorch's own float32 differs from CPU to CPU
        expected = reference.double()(torch.from_numpy(x).double()).numpy()
    actual = nr.to_numpy(model(x))
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-4


def test_dtypes_exact(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = collections.OrderedDict([
        ("half", torch.randn(3, 5, generator=generator).half()),
        ("half_t", torch.randn(4, 6, generator=generator).half().t()),
        ("double", torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)[:, ::2, 1:]),
        ("long", torch.randint(-2**62, 2**62, (7,), generator=generator)),
        ("int", torch.randint(-2**31, 2**31 - 1, (3, 2), generator=generator, dtype=torch.int32)),
        ("uint8", torch.randint(0, 255, (5,), generator=generator, dtype=torch.uint8)),
        ("int8", torch.randint(-128, 127, (5,), generator=generator, dtype=torch.int8)),
        ("bool", torch.tensor([True, False, True])),
        ("bfloat16", torch.randn(6, generator=generator).bfloat16()),
        ("uint16", torch.tensor([0, 1, 65535], dtype=torch.uint16)),      # rebuilt by _rebuild_tensor_v3
        ("complex", torch.randn(3, generator=generator, dtype=torch.complex64)),
        ("conj", torch.randn(3, generator=generator, dtype=torch.complex128).conj()),   # a conj-bit view
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 4)),
        ("nan_inf", torch.tensor([float("nan"), float("inf"), -0.0])),
    ])
    path = tmp_path / "dtypes.pt"
    torch.save(state, path)
    _assert_exact(load_torch_checkpoint(path), state)


def test_plain_containers_and_parameters(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    obj = {"epoch": 7, "lr": 0.1, "name": "run", "flags": [True, None], "pair": (1, 2.0),
           "model": collections.OrderedDict(w=weight), "tensors": [torch.arange(4), torch.ones(2)]}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = load_torch_checkpoint(path)
    assert loaded["epoch"] == 7 and loaded["lr"] == 0.1 and loaded["name"] == "run"
    assert loaded["flags"] == [True, None] and loaded["pair"] == (1, 2.0)
    assert np.array_equal(loaded["model"]["w"], weight.detach().numpy())
    assert np.array_equal(loaded["tensors"][0], np.arange(4))


def test_shared_storage_views_are_independent_copies(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {"a": base[:6].view(2, 3), "b": base[3:].view(3, 3), "c": base.view(3, 4).t()}
    path = tmp_path / "shared.pth"
    torch.save(state, path)
    with zipfile.ZipFile(path) as archive:     # one storage record serves all three tensors
        assert sum("/data/" in name and "/.data/" not in name for name in archive.namelist()) == 1
    loaded = load_torch_checkpoint(path)
    _assert_exact(loaded, state)
    loaded["a"][0, 0] = -1
    assert loaded["b"][0, 0] == 3 and loaded["c"][0, 0] == 0


def _rewrite(path, new_path, change):
    """Copy the zip at ``path`` to ``new_path``, passing each record's bytes through ``change(name, data)``."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(new_path, "w", zipfile.ZIP_STORED) as target:
        for name in source.namelist():
            data = change(name, source.read(name))
            if data is not None:
                target.writestr(name, data)


def test_big_endian_file(tmp_path):
    state = {"f": torch.randn(2, 3).t(), "d": torch.randn(4, dtype=torch.float64), "i": torch.arange(5)}
    path = tmp_path / "little.pth"
    torch.save(state, path)
    dtypes = {"0": np.float32, "1": np.float64, "2": np.int64}

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name and "/.data/" not in name:
            return np.frombuffer(data, dtype=dtypes[key]).byteswap().tobytes()
        return data

    big = tmp_path / "big.pth"
    _rewrite(path, big, to_big_endian)
    loaded = load_torch_checkpoint(big)
    _assert_exact(loaded, state)
    assert all(array.dtype.isnative for array in loaded.values())


# --- refusing what is not a tensor state dict -----------------------------------------------------------

class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("attack", [_RunsShell, _RunsEval])
def test_malicious_pickle_is_refused_without_running(tmp_path, attack):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(collections.OrderedDict(w=attack(marker)), protocol=2)
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, payload)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system|(__builtin__|builtins)\.eval") as info:
        load_torch_checkpoint(path)
    assert "refuses" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        nr.resnet18(weights=path)
    assert not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_torch_checkpoint(path)


def test_truncated_files_give_clear_errors(tmp_path):
    path = tmp_path / "full.pth"
    torch.save(_randomized_reference("resnet18", num_classes=3).state_dict(), path)
    data = path.read_bytes()
    for cut in (10, 1000, len(data) // 2, len(data) - 100, len(data) - 1):
        short = tmp_path / f"cut{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(TorchCheckpointError, match="truncated"):
            load_torch_checkpoint(short)
        with pytest.raises(CheckpointError, match="truncated"):
            nr.resnet18(weights=short)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(TorchCheckpointError, match="empty"):
        load_torch_checkpoint(empty)


def test_storage_shorter_than_tensor_is_refused(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"w": torch.randn(4, 5)}, path)
    short = tmp_path / "short.pth"
    _rewrite(path, short, lambda name, data: data[:40] if name.endswith("/data/0") else data)
    with pytest.raises(TorchCheckpointError, match="storage holding 10"):
        load_torch_checkpoint(short)
    missing = tmp_path / "missing.pth"
    _rewrite(path, missing, lambda name, data: None if name.endswith("/data/0") else data)
    with pytest.raises(TorchCheckpointError, match="missing"):
        load_torch_checkpoint(missing)


def test_legacy_format_explains_conversion(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchCheckpointError, match=r"legacy \(pre-1.6\).*torch.save"):
        load_torch_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(TorchCheckpointError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(text)
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "x")
    with pytest.raises(TorchCheckpointError, match="data.pkl"):
        load_torch_checkpoint(other_zip)
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "absent.pth")


def test_loading_does_not_need_torch(tmp_path):
    """The loader imports nothing from torch: run it in a fresh interpreter where torch cannot be imported."""
    import subprocess
    import sys

    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(6.0).view(2, 3).t()}, path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numres\n"
            f"w = numres.load_torch_checkpoint({str(path)!r})['w']\n"
            "assert w.tolist() == [[0, 3], [1, 4], [2, 5]], w\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(nr.__file__))})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_pickle_bytes_are_never_handed_to_pickle_load(tmp_path, monkeypatch):
    """The restricted unpickler is the only reader: plain pickle.load/loads are never used."""
    def forbidden(*args, **kwargs):
        raise AssertionError("unrestricted pickle used")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    path = tmp_path / "w.pth"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    path.write_bytes(buffer.getvalue())
    assert load_torch_checkpoint(path)["w"].tolist() == [1.0, 1.0]


def test_load_model_recognises_a_torchvision_file(tmp_path):
    """nr.load_model rebuilds the architecture named by the file's keys and shapes, with its classes."""
    reference = _randomized_reference("resnet18", seed=2, num_classes=5)
    path = tmp_path / "any-name.pth"
    torch.save(reference.state_dict(), path)
    model = nr.load_model(path)
    assert isinstance(model, nr.ResNet) and model.fc.out_features == 5 and not model.training
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32))
    with torch.no_grad():
        expected = reference.double()(torch.from_numpy(x)).numpy()
    actual = nr.to_numpy(model(x.astype(np.float32)))
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-4
