"""numres.save / numres.load: pickle-free .npz round trips, atomic writes, clear errors on bad files."""
from __future__ import annotations

import os
import re
import stat
import warnings
import zipfile

import numpy as np
import pytest

import numres as nr
import numres.io as nio


def tiny_model():
    nr.manual_seed(0)
    return nr.ResNet(nr.BasicBlock, [1, 1, 1, 1], num_classes=3)


def test_state_dict_round_trip(tmp_path):
    model = tiny_model()
    model(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))   # non-trivial BN buffers
    state = model.state_dict()
    nr.save(state, tmp_path / "model.npz")
    loaded = nr.load(tmp_path / "model.npz")
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert loaded["bn1.num_batches_tracked"].shape == () and int(loaded["bn1.num_batches_tracked"]) == 1

    nr.manual_seed(123)
    fresh = nr.ResNet(nr.BasicBlock, [1, 1, 1, 1], num_classes=3)
    fresh.load_state_dict(loaded)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(fresh.eval()(x), model.eval()(x))


def test_channels_last_weights_keep_their_values(tmp_path):
    """Conv weights are permuted views; saving stores their PyTorch-order values."""
    conv = nr.nn.Conv2d(2, 3, (3, 2), dtype="float64")
    assert not conv.weight.data.flags["C_CONTIGUOUS"]
    nr.save(conv.state_dict(), tmp_path / "conv.npz")
    np.testing.assert_array_equal(nr.load(tmp_path / "conv.npz")["weight"], conv.weight.data)


def test_nested_structures_round_trip(tmp_path):
    """An optimizer-style checkpoint: int keys, lists, tuples, bools, None, strings, exact floats, 0-d arrays."""
    obj = {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "optimizer": {"state": {0: {"momentum_buffer": np.full((2, 3), 0.1)}, 3: {}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": False, "params": [0, 1, 2, 3],
                                        "weight_decay": 1e-4, "maximize": False}]},
        "epoch": 7, "best": 1 / 3, "name": "résnet", "nothing": None, "shape": (2, 3),
        "scalar": np.array(2.5), "count": np.int64(9), "flags": [True, False],
    }
    nr.save(obj, tmp_path / "ckpt.npz")
    loaded = nr.load(tmp_path / "ckpt.npz")
    assert loaded["epoch"] == 7 and loaded["best"] == 1 / 3 and loaded["name"] == "résnet"
    assert loaded["nothing"] is None and loaded["shape"] == (2, 3) and loaded["flags"] == [True, False]
    assert loaded["count"] == 9
    assert sorted(loaded["optimizer"]["state"]) == [0, 3] and loaded["optimizer"]["state"][3] == {}
    assert loaded["optimizer"]["param_groups"] == obj["optimizer"]["param_groups"]
    np.testing.assert_array_equal(loaded["optimizer"]["state"][0]["momentum_buffer"], np.full((2, 3), 0.1))
    assert loaded["model"]["w"].dtype == np.float32
    assert loaded["scalar"].shape == () and float(loaded["scalar"]) == 2.5


def test_unsupported_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match="object"):
        nr.save({"a": np.array([{"x": 1}], dtype=object)}, tmp_path / "bad.npz")
    with pytest.raises(TypeError, match="set"):
        nr.save({"a": {1, 2}}, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_crash_mid_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    nr.save({"w": np.ones(3)}, path)
    original = path.read_bytes()

    def crashing_savez(stream, **arrays):
        stream.write(b"PK\x03\x04 half a zip file")          # some bytes reach the disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(nio.np, "savez", crashing_savez)
    with pytest.raises(OSError, match="disk full"):
        nr.save({"w": np.zeros(3)}, path)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["model.npz"], "a temporary file was left behind"
    monkeypatch.undo()
    np.testing.assert_array_equal(nr.load(path)["w"], np.ones(3))


def test_crash_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    def crashing_savez(stream, **arrays):
        raise KeyboardInterrupt

    monkeypatch.setattr(nio.np, "savez", crashing_savez)
    with pytest.raises(KeyboardInterrupt):
        nr.save({"w": np.zeros(3)}, tmp_path / "new.npz")
    assert os.listdir(tmp_path) == []


def test_save_creates_parent_directories(tmp_path):
    nr.save({"w": np.zeros(2)}, tmp_path / "a" / "b" / "c.npz")
    assert (tmp_path / "a" / "b" / "c.npz").is_file()


@pytest.mark.parametrize("keep", [0.5, 0.9, 10])
def test_truncated_file_gives_a_clear_error(tmp_path, keep):
    path = tmp_path / "model.npz"
    nr.save(tiny_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(nio.CheckpointError, match="truncated"):
        nr.load(path)


def test_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("hello")
    with pytest.raises(nio.CheckpointError, match=str(path).replace("\\", "\\\\")):
        nr.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        nr.load(tmp_path / "missing.npz")


class _Payload:
    """Unpickling this would create a marker file: the proof that load ran code."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_array_is_refused(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.npz"
    np.savez(path, weights=np.ones(2), evil=np.array([_Payload()], dtype=object))
    assert zipfile.is_zipfile(path)
    with pytest.raises(nio.CheckpointError, match="not a numres file: member 'evil' is an array of Python "
                                                  "objects, stored with pickle") as raised:
        nr.load(path)
    assert "allow_pickle" not in str(raised.value)
    assert not (tmp_path / "pwned").exists()


def _write_random_bytes(path):
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _write_nothing(path):
    path.write_bytes(b"")


def _write_text(path):
    path.write_text("epoch,loss\n1,0.5\n")


def _write_npy(path):
    with open(path, "wb") as stream:
        np.save(stream, np.arange(3))


def _write_torch_checkpoint(path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2)}, path)


@pytest.mark.parametrize("write, what", [
    (_write_random_bytes, "it holds data starting with bytes"),
    (_write_nothing, r"it is empty \(0 bytes\)"),
    (_write_text, "it holds text, not a zip archive"),
    (_write_npy, r"single NumPy \.npy array"),
    (_write_torch_checkpoint, "PyTorch checkpoint"),
])
def test_a_file_that_is_not_a_numres_file_is_named_as_such(tmp_path, write, what):
    """The error says the file is not a numres file, what it seems to be, and what numres expected;
    never the misleading advice about pickle that np.load gives."""
    path = tmp_path / "weights.npz"
    write(path)
    with pytest.raises(nio.CheckpointError) as raised:
        nr.load(path)
    message = str(raised.value)
    assert f"{path} is not a numres file" in message
    assert re.search(what, message), message
    assert "expected a NumPy .npz archive (a zip of .npy arrays) written by numres.save" in message
    assert "pickle" not in message


@pytest.mark.parametrize("name", ["model.pth", "model.pt", "checkpoint", "model.NPZ.bak"])
def test_saving_under_another_suffix_warns_and_says_what_the_file_is(tmp_path, name):
    state = tiny_model().state_dict()
    with pytest.warns(UserWarning, match=r"writes a NumPy \.npz archive.*numres\.load, not torch\.load"):
        nr.save(state, tmp_path / name)
    loaded = nr.load(tmp_path / name)                          # recognised by content, not name
    assert all(np.array_equal(loaded[k], nr.to_numpy(v)) for k, v in state.items())


def test_npz_saved_as_pth_loads_as_weights(tmp_path):
    model = tiny_model()
    with pytest.warns(UserWarning):
        nr.save(model.state_dict(), tmp_path / "model.pth")
    state = nio.load_weights(tmp_path / "model.pth")           # not sent to the PyTorch reader
    assert all(np.array_equal(state[k], nr.to_numpy(v)) for k, v in model.state_dict().items())


def test_npz_suffix_does_not_warn(tmp_path):
    """A name ending in .npz (any case) is kept as given, with no warning, and the file holds the values."""
    values = np.random.default_rng(5).standard_normal((2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nr.save({"w": values}, tmp_path / "model.npz")
        nr.save({"w": values}, tmp_path / "upper.NPZ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "upper.NPZ"]   # no added suffix
    for name in ("model.npz", "upper.NPZ"):
        loaded = nr.load(tmp_path / name)
        assert list(loaded) == ["w"] and np.array_equal(loaded["w"], values), name


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mask, expected):
    """mkstemp makes 0600 files; the renamed file must have 0666 & ~umask, as open(path, "w") gives."""
    umask(mask)
    nr.save({"w": np.zeros(2)}, tmp_path / "model.npz")
    nio.atomic_write(tmp_path / "metrics.csv", lambda stream: stream.write(b"epoch\n"))
    with open(tmp_path / "plain.txt", "w"):                     # what any other program would get
        pass
    for name in ("model.npz", "metrics.csv", "plain.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "model.npz"
    nr.save({"w": np.zeros(2)}, path)
    os.chmod(path, 0o640)
    nr.save({"w": np.ones(2)}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert np.array_equal(nr.load(path)["w"], np.ones(2))


def test_plain_npz_loads_as_a_dict(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(3), b=np.eye(2, dtype=np.float32))
    loaded = nr.load(path)
    assert sorted(loaded) == ["a", "b"] and loaded["b"].dtype == np.float32
