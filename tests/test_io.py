"""numres.save / numres.load: pickle-free .npz round trips, atomic writes, clear errors on bad files."""
from __future__ import annotations

import os
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
    with pytest.raises(nio.CheckpointError, match="pickle"):
        nr.load(path)
    assert not (tmp_path / "pwned").exists()


def test_plain_npz_loads_as_a_dict(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(3), b=np.eye(2, dtype=np.float32))
    loaded = nr.load(path)
    assert sorted(loaded) == ["a", "b"] and loaded["b"].dtype == np.float32
