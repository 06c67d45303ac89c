"""The embedded digits, the CIFAR-10 batch parser (good and hostile files) and the data loader."""
from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from numres.data import AUGMENTATION, DataLoader, ImageDataset, load_dataset
from numres.data import cifar, digits
from numres.data.cifar import CifarFormatError, RestrictedUnpickler, load_cifar10, parse_batch

# --- the embedded digits ------------------------------------------------------------------------------


def test_digits_split_is_the_documented_one():
    train_x, train_y = digits.load_digits("train")
    test_x, test_y = digits.load_digits("test")
    all_x, all_y = digits.load_digits("all")
    # UCI optdigits.tes / scikit-learn load_digits: 1,797 grey 8x8 images, pixel counts 0..16, 10 classes.
    assert all_x.shape == (1797, 1, 8, 8) and all_x.dtype == np.uint8
    assert all_x.min() == 0 and all_x.max() == 16
    assert sorted(np.unique(all_y)) == list(range(10))
    assert len(train_y) == 1437 and len(test_y) == 360
    assert np.bincount(test_y).tolist() == [36] * 10
    # The stored mask is the one the documented procedure draws, and the two splits partition the data.
    with np.load(digits.ARCHIVE) as archive:
        mask = archive["test"]
    assert np.array_equal(mask, digits.stratified_test_mask(all_y))
    assert np.array_equal(all_x[mask], test_x) and np.array_equal(all_x[~mask], train_x)
    assert np.array_equal(all_y[mask], test_y) and np.array_equal(all_y[~mask], train_y)


def test_digits_dataset_and_bad_split():
    dataset = load_dataset("digits", "test")
    assert dataset.max_value == 16 and dataset.classes == tuple("0123456789") and dataset.channels == 1
    with pytest.raises(ValueError, match="unknown digits split 'validation'"):
        digits.load_digits("validation")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data directory"):
        load_dataset("cifar10", "train")


def test_licence_file_ships_beside_the_data():
    text = open(os.path.join(os.path.dirname(digits.ARCHIVE), "DIGITS_LICENSE.md")).read()
    assert "CC BY 4.0" in text and "Alpaydin" in text


# --- CIFAR-10 batch files -----------------------------------------------------------------------------

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]


class Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes and names numpy's ``numpy.core.multiarray``, like the originals."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def batch_dict(rng, count=6, label="training batch"):
    return {b"batch_label": label.encode(), b"labels": rng.integers(0, 10, count).tolist(),
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(count)]}


def write_cifar(folder, rng, count=6, py2_style=False):
    """The six batch files and the meta file, in the original format; returns {name: dict}."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name in cifar.TRAIN_FILES + cifar.TEST_FILES:
        content = batch_dict(rng, count, name)
        with open(os.path.join(folder, name), "wb") as stream:
            if py2_style:
                Py2StylePickler(stream, protocol=2).dump(content)
            else:
                pickle.dump(content, stream, protocol=2)
        written[name] = content
    with open(os.path.join(folder, cifar.META_FILE), "wb") as stream:
        pickle.dump({b"label_names": [c.encode() for c in cifar.CLASSES], b"num_vis": 3072}, stream, protocol=2)
    return written


@pytest.mark.parametrize("py2_style", [False, True])
def test_cifar_reads_batches_in_the_original_layout(tmp_path, py2_style):
    written = write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(1), py2_style=py2_style)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):          # the folder or its parent
        images, labels = load_cifar10(where, "train")
        assert images.shape == (30, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
        first = written["data_batch_1"]
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
        assert np.array_equal(images[0, 0].ravel(), first[b"data"][0, :1024])
        assert np.array_equal(images[0, 2, 31], first[b"data"][0, 3072 - 32:])
        expected = np.concatenate([written[n][b"labels"] for n in cifar.TRAIN_FILES])
        assert np.array_equal(labels, expected)
    test_images, test_labels = load_cifar10(tmp_path, "test")
    assert np.array_equal(test_images.reshape(6, -1), written["test_batch"][b"data"])
    assert test_labels.tolist() == written["test_batch"][b"labels"]


def test_cifar_reads_the_unextracted_tarball(tmp_path):
    written = write_cifar(tmp_path / "src" / "cifar-10-batches-py", np.random.default_rng(2))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    images, labels = load_cifar10(tmp_path, "test")
    assert np.array_equal(images.reshape(6, -1), written["test_batch"][b"data"])
    dataset = load_dataset("cifar10", "train", tmp_path)
    assert len(dataset) == 30 and dataset.max_value == 255 and dataset.classes[0] == "airplane"


def test_cifar_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches in .*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path, np.random.default_rng(3))
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")
    load_cifar10(tmp_path, "test")        # the test split does not need it
    with pytest.raises(ValueError, match="unknown CIFAR-10 split"):
        load_cifar10(tmp_path, "valid")


def test_cifar_truncated_file_names_the_file(tmp_path):
    write_cifar(tmp_path, np.random.default_rng(4))
    path = tmp_path / "data_batch_2"
    payload = path.read_bytes()
    for cut in (len(payload) // 2, 10, 0):
        path.write_bytes(payload[:cut])
        with pytest.raises(CifarFormatError, match="data_batch_2"):
            load_cifar10(tmp_path, "train")


def _dump(obj):
    return pickle.dumps(obj, protocol=2)


@pytest.mark.parametrize("payload, message", [
    (b"\x89PNG\r\n\x1a\n not a pickle at all", "cannot be read"),
    (_dump([1, 2, 3]), "expected a dict, found list"),
    (_dump({b"labels": [1]}), "no 'data' entry"),
    (_dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 array"),
    (_dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"shape \(N, 3072\)"),
    (_dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "list of 2 integers"),
    (_dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "integers in 0..9"),
    (_dump({b"data": "a string", b"labels": []}), "uint8 array"),
])
def test_cifar_foreign_content_is_refused(payload, message):
    with pytest.raises(CifarFormatError, match=message):
        parse_batch(payload, "some_file")


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


def test_cifar_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    attacks = [
        _dump({b"data": _RunsCommand(f"touch {marker}"), b"labels": []}),
        _dump(_RunsCommand(f"touch {marker}")),
        _dump({b"data": _Evaluates()}),
        _dump({b"data": np.array([_RunsCommand(f"touch {marker}")], dtype=object)}),   # object array
    ]
    for payload in attacks:
        with pytest.raises(CifarFormatError, match="refus"):
            parse_batch(payload, "evil_batch")
    assert not marker.exists()
    # The same refusal through the file loader, naming the file.
    write_cifar(tmp_path / "data", np.random.default_rng(5))
    (tmp_path / "data" / "test_batch").write_bytes(attacks[0])
    with pytest.raises(CifarFormatError, match=r"test_batch.*refusing to load global 'posix\.system'|"
                                               r"test_batch.*refusing to load global 'nt\.system'"):
        load_cifar10(tmp_path / "data", "test")
    assert not marker.exists()


def test_restricted_unpickler_admits_only_latin1_codecs():
    crafted = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04."
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        RestrictedUnpickler(io.BytesIO(crafted), encoding="bytes").load()


# --- the loader ---------------------------------------------------------------------------------------

def small_dataset(n=10, channels=3, size=6, seed=0, max_value=255):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, max_value + 1, (n, channels, size, size), dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 10, n), tuple("abcdefghij"), max_value, "toy")


def test_loader_batches_cover_the_epoch_once_in_a_seeded_order():
    data = small_dataset(10)
    loader = DataLoader(data, 4, shuffle=True, seed=7)
    assert len(loader) == 3
    epoch1 = [(x.copy(), y.copy()) for x, y in loader]
    assert [len(y) for _, y in epoch1] == [4, 4, 2]
    seen = np.concatenate([y for _, y in epoch1])
    # Every image exactly once: match each batch row back to its source image.
    flat = data.images.reshape(10, -1).astype(np.float32)
    rows = np.concatenate([x.reshape(len(x), -1) for x, _ in epoch1]) * 255.0
    index = [int(np.flatnonzero(np.all(np.abs(flat - r) < 1e-3, axis=1))[0]) for r in rows]
    assert sorted(index) == list(range(10)) and index != list(range(10))
    assert np.array_equal(seen, data.labels[index])
    epoch2 = [y for _, y in loader]
    again = [y for _, y in DataLoader(data, 4, shuffle=True, seed=7)]
    assert all(np.array_equal(a, b) for (_, a), b in zip(epoch1, again))
    assert not all(np.array_equal(a, b) for (_, a), b in zip(epoch1, epoch2))
    dropping = DataLoader(data, 4, shuffle=True, seed=7, drop_last=True)
    assert len(dropping) == 2 and [len(y) for _, y in dropping] == [4, 4]


def test_loader_normalises_with_the_given_mean_and_std():
    data = small_dataset(8, max_value=16)
    mean, std = data.channel_stats()
    reference_mean = (data.images / 16.0).mean(axis=(0, 2, 3))
    assert np.allclose(mean, reference_mean, rtol=1e-12)
    x, y = next(iter(DataLoader(data, 8, mean=mean, std=std, dtype="float64")))
    expected = (data.images / 16.0 - mean[:, None, None]) / std[:, None, None]
    assert x.dtype == np.float64 and np.allclose(x, expected, rtol=0, atol=1e-12)
    assert np.allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-12) and np.allclose(x.std(axis=(0, 2, 3)), 1)
    x32, _ = next(iter(DataLoader(data, 8, mean=mean, std=std)))
    assert x32.dtype == np.float32 and np.allclose(x32, expected, atol=1e-5)


def test_loader_crop_and_flip_match_a_padded_reference():
    data = small_dataset(12, channels=2, size=5)
    loader = DataLoader(data, 12, shuffle=True, seed=3, crop_padding=2, flip=True, dtype="float64")
    state = loader.get_rng_state()
    order, offsets, flips = loader.plan_epoch()
    loader.set_rng_state(state)
    x, y = next(iter(loader))
    padded = np.pad(data.images[order].astype(np.float64), ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(12):
        dy, dx = offsets[i]
        crop = padded[i, :, dy:dy + 5, dx:dx + 5]
        if flips[i]:
            crop = crop[:, :, ::-1]
        assert np.allclose(x[i], crop / 255.0, atol=1e-12), f"image {i}"
    assert np.array_equal(y, data.labels[order])
    # Over many draws the offsets cover 0..2p and about half the images flip.
    big = DataLoader(small_dataset(400, size=4), 400, crop_padding=4, flip=True, seed=0)
    _, offsets, flips = big.plan_epoch()
    assert set(np.unique(offsets)) == set(range(9)) and 0.4 < flips.mean() < 0.6


def test_loader_replays_an_epoch_from_a_saved_state():
    loader = DataLoader(small_dataset(10), 3, shuffle=True, seed=11, crop_padding=1, flip=True)
    next(iter(loader))                          # move the generator on
    state = loader.get_rng_state()
    full = [x.copy() for x, _ in loader.batches()]
    loader.set_rng_state(state)
    tail = [x.copy() for x, _ in loader.batches(start=2)]
    assert len(tail) == len(full) - 2 and all(np.array_equal(a, b) for a, b in zip(full[2:], tail))


def test_loader_repeats_grey_channels_and_rejects_bad_settings():
    data = small_dataset(4, channels=1)
    x, _ = next(iter(DataLoader(data, 4, channels=3)))
    assert x.shape == (4, 3, 6, 6) and np.array_equal(x[:, 0], x[:, 2])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        DataLoader(data, 0)
    with pytest.raises(ValueError, match="larger than the dataset"):
        DataLoader(data, 5, drop_last=True)
    with pytest.raises(ValueError, match="mean and std need 1 values"):
        DataLoader(data, 2, mean=[0.5, 0.5], std=[1, 1])
    with pytest.raises(ValueError, match="cannot turn 3-channel"):
        DataLoader(small_dataset(4, channels=3), 2, channels=1)


def test_default_augmentation_per_dataset():
    assert AUGMENTATION["cifar10"] == {"crop_padding": 4, "flip": True}
    assert AUGMENTATION["digits"]["flip"] is False and AUGMENTATION["digits"]["crop_padding"] == 1
