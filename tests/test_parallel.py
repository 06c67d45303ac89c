"""The tiled, threaded CPU paths against the plain whole-array computation and PyTorch.

Tiles are forced tiny (a few rows, an uneven last tile) and the thread count is varied,
so tile boundaries and the order of partial sums are exercised on small arrays.
"""
import numpy as np
import pytest
import torch

from numres import allocator, parallel
from numres.functional import activation, batchnorm, conv, pooling

from torch_reference import rel_err


@pytest.fixture(params=[(1, 7 * 5), (2, 3 * 5), (2, None)], ids=["1 thread, 7-row tiles", "2 threads, 3-row tiles",
                                                                 "2 threads, default tiles"])
def tiling(request, monkeypatch):
    threads, tile_elements = request.param
    previous = parallel.get_num_threads()
    parallel.set_num_threads(threads)
    if tile_elements:
        monkeypatch.setattr(parallel, "TILE_ELEMENTS", tile_elements)
    yield
    parallel.set_num_threads(previous)


def test_tiles_cover_rows_once():
    parts = parallel.tiles(103, 5, tile_elements=50)
    covered = np.concatenate([np.arange(103)[part] for part in parts])
    assert np.array_equal(covered, np.arange(103))
    assert all(part.stop - part.start == 10 for part in parts[:-1]) and parts[-1].stop - parts[-1].start == 3


def test_map_tiles_keeps_order(tiling):
    results = parallel.map_tiles(lambda tile: (tile.start, tile.stop), 41, 5)
    assert [start for start, _ in results] == sorted(start for start, _ in results)
    assert results[0][0] == 0 and results[-1][1] == 41


def test_nested_map_tiles_runs_serially_instead_of_deadlocking(tiling):
    inner = parallel.map_tiles(lambda tile: sum(parallel.map_tiles(lambda t: t.stop - t.start, 20, 5)), 41, 5)
    assert all(total == 20 for total in inner)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="positive"):
        parallel.set_num_threads(0)


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_tiles_match_torch(tiling, relu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4, 3)) * 3 + 7          # a large mean tests the shifted variance
    weight, bias = rng.standard_normal(5), rng.standard_normal(5)
    running_mean, running_var = np.zeros(5), np.ones(5)
    y, cache = batchnorm.batchnorm_train_forward(x, weight, bias, running_mean, running_var, 0.1, 1e-5, relu)
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = batchnorm.batchnorm_backward(dy, cache)

    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    trm, trv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
    ty = torch.relu(ty) if relu else ty
    ty.backward(torch.tensor(dy))
    for ours, theirs in [(y, ty), (dx, tx.grad), (dweight, tw.grad), (dbias, tb.grad), (running_mean, trm),
                         (running_var, trv)]:
        assert rel_err(ours, theirs.detach().numpy()) < 1e-10


def test_elementwise_tiles_match_numpy(tiling):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 5, 4, 3))
    b = rng.standard_normal((3, 5, 4, 3))
    y = activation.add_relu_forward(a, b)
    assert np.array_equal(y, np.maximum(a + b, 0))
    assert np.array_equal(activation.relu_backward(b, y), b * (y > 0))
    assert np.array_equal(activation.add(a, b), a + b)
    assert np.array_equal(activation.relu_forward(a)[0], np.maximum(a, 0))


def test_image_split_paths_match_torch(tiling, monkeypatch):
    """im2col/col2im and pooling split the batch over threads; one image per tile here."""
    monkeypatch.setattr(parallel, "TILE_ELEMENTS", 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 7, 6))
    w = rng.standard_normal((6, 4, 3, 3))
    y, cache = conv.conv2d_forward(x, w, None, 2, 1)
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = conv.conv2d_backward(dy, cache)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, None, 2, 1)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy()) < 1e-10
    assert rel_err(dx, tx.grad.numpy()) < 1e-10 and rel_err(dw, tw.grad.numpy()) < 1e-10

    y, cache = pooling.maxpool2d_forward(x, 3, 2, 1)
    dy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy()) < 1e-12
    assert rel_err(pooling.maxpool2d_backward(dy, cache), tx.grad.numpy()) < 1e-12


def test_retain_freed_memory_reports_whether_glibc_accepted():
    accepted = allocator.retain_freed_memory()
    assert isinstance(accepted, bool)
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert accepted


def test_numres_sets_a_short_openblas_spin_timeout_by_default():
    import os
    assert os.environ.get("OPENBLAS_THREAD_TIMEOUT") is not None


@pytest.mark.parametrize("groups, stride, padding, bias", [(1, 1, 1, False), (2, 2, 1, True), (1, 1, 0, True)])
def test_conv_chunked_workspace_matches_torch(monkeypatch, groups, stride, padding, bias):
    """With a workspace of one element every image is its own chunk; dweight sums the chunks."""
    monkeypatch.setattr(conv, "WORKSPACE_ELEMENTS", 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 6, 5))
    w = rng.standard_normal((6, 4 // groups, 3, 3))
    b = rng.standard_normal(6) if bias else None
    y, cache = conv.conv2d_forward(x, w, b, stride, padding, 1, groups)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv.conv2d_backward(dy, cache)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if bias else None
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride, padding, 1, groups)
    ty.backward(torch.tensor(dy))
    assert len(conv.image_chunks(x.shape, (3, 3), (stride, stride), (padding, padding), y.shape[2:])) == 3
    assert rel_err(y, ty.detach().numpy()) < 1e-10
    assert rel_err(dx, tx.grad.numpy()) < 1e-10 and rel_err(dw, tw.grad.numpy()) < 1e-10
    if bias:
        assert rel_err(db, tb.grad.numpy()) < 1e-10
