"""numres.data.ImageLoader: deterministic for any worker count, in order, loud when a worker dies."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import numres.testing  # noqa: F401  (registers the "guard" backend: CuPy's host boundary on the CPU)
from numres.data import transforms as T
from numres.data.imagefolder import BadImageError, ImageFolder, make_shapes_folder
from numres.data.workers import ImageLoader, LoaderWorkerError, WorkerDiedError, sample_generator
from numres.testing import guard


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_folder(root, per_class=5, size=(40, 30), seed=1)
    return root


def train_pipeline():
    return T.train_transform(16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def epochs(loader, count=2):
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # nothing skipped, nothing warned
        return [[(np.array(x), np.array(y)) for x, y in loader] for _ in range(count)]


def test_same_batches_for_zero_one_and_two_workers_and_equal_to_the_transform(folder):
    dataset = ImageFolder(folder, transform=train_pipeline())
    results = {}
    for workers in (0, 1, 2):
        with ImageLoader(dataset, 4, shuffle=True, seed=5, num_workers=workers) as loader:
            results[workers] = epochs(loader)
    for workers in (1, 2):
        for epoch_a, epoch_b in zip(results[0], results[workers]):
            assert len(epoch_a) == len(epoch_b) == 4
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    first, second = results[0]
    assert not np.array_equal(first[0][0], second[0][0])            # a new epoch: a new order and new crops
    # Each row is the per-sample pipeline (ToArray and Normalize included) with the sample's own generator.
    order = np.random.default_rng(np.random.SeedSequence(5, spawn_key=(0, 0))).permutation(len(dataset))
    x, y = first[1]
    for row, index in enumerate(order[4:8]):
        with Image.open(dataset.samples[index][0]) as image:
            expected = dataset.transform(image, sample_generator(5, 0, int(index)))
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert np.array_equal(x[row], expected) and y[row] == dataset.targets[index]
    assert sorted(np.concatenate([y for _, y in first]).tolist()) == sorted(dataset.targets.tolist())


def test_epoch_replay_resume_and_drop_last(folder):
    dataset = ImageFolder(folder, transform=train_pipeline())
    loader = ImageLoader(dataset, 4, shuffle=True, seed=2, drop_last=True)
    assert len(loader) == 3 and len(ImageLoader(dataset, 4)) == 4
    state = loader.get_rng_state()
    full = [x for x, _ in loader]
    loader.set_rng_state(state)
    resumed = [x for x, _ in loader.batches(start=1)]
    assert len(full) == 3 and len(resumed) == 2
    assert all(np.array_equal(a, b) for a, b in zip(full[1:], resumed))
    assert loader.get_rng_state() == {"seed": 2, "epoch": 1}
    unshuffled = ImageLoader(dataset, 5)
    assert np.concatenate([y for _, y in unshuffled]).tolist() == dataset.targets.tolist()


_KILLED_WORKER_SCRIPT = """
import os, signal, sys
from numres.data import transforms as T
from numres.data.imagefolder import ImageFolder
from numres.data.workers import ImageLoader, WorkerDiedError

dataset = ImageFolder(sys.argv[1], transform=T.train_transform(16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
loader = ImageLoader(dataset, 2, shuffle=True, seed=0, num_workers=2)
batches = loader.batches()
next(batches)
victim = loader._processes[1]
os.kill(victim.pid, signal.SIGKILL)
try:
    for _ in batches:
        pass
except WorkerDiedError as error:
    print("raised:", error)
    print("victim pid:", victim.pid)
else:
    print("no error after the kill")
print("others stopped:", not loader._processes and not victim.is_alive())
print("next epoch batches:", len(list(loader)), "of", len(loader))
loader.close()
"""


def test_a_killed_worker_ends_the_run_with_a_clear_error(folder):
    """A SIGKILLed worker makes the loader raise, stop the other workers, and start fresh ones next epoch.

    Run in a child process: its timeout is the hang guard (a loader that waited forever for the dead
    worker fails here instead of blocking the suite); nothing asserts on elapsed time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        process = subprocess.run([sys.executable, "-c", _KILLED_WORKER_SCRIPT, str(folder)], capture_output=True,
                                 text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the loader hung after a worker was killed (no result within 120 s): {exc.stderr}")
    assert process.returncode == 0, process.stderr
    lines = dict(line.split(": ", 1) for line in process.stdout.splitlines())
    assert "raised" in lines, process.stdout
    assert f"worker 1 (pid {lines['victim pid']}) was killed by SIGKILL" in lines["raised"]
    assert lines["others stopped"] == "True"                       # the others were stopped too
    seen, expected = lines["next epoch batches"].split(" of ")   # the next epoch starts fresh workers
    assert seen == expected and int(seen) > 0


def test_worker_errors_name_the_file(folder, tmp_path):
    root = tmp_path / "with_bad"
    make_shapes_folder(root, per_class=3, size=(40, 30), corrupt=1)
    dataset = ImageFolder(root, transform=train_pipeline())
    bad = next(path for path, _ in dataset.samples if "broken" in path)
    for workers in (0, 2):
        with ImageLoader(dataset, 4, num_workers=workers) as loader:
            with pytest.raises(BadImageError, match=f"cannot read image {bad}"):
                list(loader)
    # skip_bad: the file is dropped from its batch, remembered, and counted at the end of the epoch.
    skipping = ImageFolder(root, transform=train_pipeline(), skip_bad=True)
    outputs = {}
    for workers in (0, 2):
        with ImageLoader(skipping, 4, num_workers=workers, seed=1) as loader:
            with pytest.warns(RuntimeWarning, match="skipped 3 unreadable image file"):
                outputs[workers] = [(np.array(x), y) for x, y in loader]
            assert len(loader.skipped) == 3 and all("broken" in path for path in loader.skipped)
    assert sum(len(y) for _, y in outputs[0]) == len(skipping) - 3
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(outputs[0], outputs[2]))
    # Any other exception comes back with the worker's traceback (the main process decodes one image itself
    # to learn the batch layout: there the transform still works).
    main = os.getpid()
    failing = ImageFolder(folder, transform=T.Compose([T.CenterCrop(8), T.ToArray()]))
    failing.transform.transforms.insert(1, lambda image: image if os.getpid() == main else 1 / 0)
    with ImageLoader(failing, 4, num_workers=1) as loader:
        with pytest.raises(LoaderWorkerError, match="worker 0 failed on batch 0: ZeroDivisionError"):
            list(loader)


def test_an_abandoned_epoch_and_close_leave_nothing_behind(folder):
    dataset = ImageFolder(folder, transform=train_pipeline())
    reference = epochs(ImageLoader(dataset, 3, seed=4, shuffle=True), 2)
    loader = ImageLoader(dataset, 3, seed=4, shuffle=True, num_workers=2, prefetch=1)
    for _ in loader:            # stop after one batch: the batches in flight are collected, slots freed
        break
    second = [(np.array(x), np.array(y)) for x, y in loader]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(reference[1], second))
    names = [slot.name for slot in loader._slots]
    processes = list(loader._processes)
    loader.close()
    assert all(not p.is_alive() for p in processes)
    assert not any(os.path.exists(f"/dev/shm/{name.lstrip('/')}") for name in names)


def test_guard_backend_gets_one_uint8_batch_and_normalises_it_there(folder, monkeypatch):
    dataset = ImageFolder(folder, transform=train_pipeline())
    host = [x for x, _ in ImageLoader(dataset, 4, seed=3)]
    uploads = []
    original = guard._host_to_device

    def counting(value, *args, **kwargs):
        uploads.append((np.asarray(value).dtype, np.shape(value), np.asarray(value).flags.c_contiguous))
        return original(value, *args, **kwargs)

    monkeypatch.setattr(guard, "_host_to_device", counting)
    loader = ImageLoader(dataset, 4, seed=3, backend="guard")
    device = []
    with guard.no_transfers():
        for x, y in loader:
            assert isinstance(x, guard.GuardedArray) and isinstance(y, guard.GuardedArray)
            device.append(x)
    assert all(np.array_equal(a.get(), b) for a, b in zip(device, host))
    pixels = [u for u in uploads if u[0] == np.uint8]
    assert [shape for _, shape, _ in pixels] == [(4, 16, 16, 3)] * 3 + [(3, 16, 16, 3)]
    assert all(contiguous for _, _, contiguous in pixels)
    floats = [u for u in uploads if u[0].kind == "f"]
    assert len(floats) == 2                           # mean and std, once for the whole run
    assert len(uploads) == len(pixels) + len(floats) + len(device)      # + the labels, one per batch


def test_bad_arguments(folder):
    dataset = ImageFolder(folder, transform=train_pipeline())
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ImageLoader(dataset, 0)
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        ImageLoader(dataset, 2, num_workers=-1)
    with pytest.raises(ValueError, match="larger than the dataset"):
        ImageLoader(dataset, 100, drop_last=True)
    mixed = ImageFolder(folder, transform=T.Compose([T.Resize(8), T.ToArray()]))      # shapes vary with the image
    (folder / "red_circle" / "wide.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (90, 30)).save(folder / "red_circle" / "wide.png")
    try:
        mixed = ImageFolder(folder, transform=mixed.transform)
        with pytest.raises(ValueError, match="must give every image one size"):
            list(ImageLoader(mixed, 32))
    finally:
        os.remove(folder / "red_circle" / "wide.png")
