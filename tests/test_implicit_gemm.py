"""Implicit-GEMM convolution (numres.functional.implicit_gemm) against PyTorch, and its place in
set_conv_algorithm; also numres.blas's import-order fix for OpenBLAS's spinning threads."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

import numres as nr
from conftest import TOL, assert_close, rel_err
from numres import blas
from numres.functional import conv as im2col_conv
from numres.functional import conv_algorithms as algorithms
from numres.functional import implicit_gemm as IG
from numres.functional.implicit_gemm import implicit_conv2d_backward, implicit_conv2d_forward

pytestmark = [pytest.mark.skipif(not IG.implicit_available(), reason="NumPy's BLAS exports no CBLAS GEMM here"),
              pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")]


def channels_last(array):
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def stored_weight(weight):
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).transpose(3, 2, 0, 1)


def torch_conv(x, weight, bias, padding, dilation, groups, dy):
    """(y, dx, dweight, dbias) from PyTorch in float64."""
    tx = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tw = torch.tensor(np.asarray(weight, np.float64), requires_grad=True)
    tb = None if bias is None else torch.tensor(np.asarray(bias, np.float64), requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tw, tb, 1, padding, dilation, groups)
    y.backward(torch.tensor(np.asarray(dy, np.float64)))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), None if tb is None else tb.grad.numpy()


CASES = [   # n, c, o, h, w, kernel, padding, dilation, groups
    (2, 3, 5, 9, 7, 3, 1, 1, 1),          # odd sizes
    (1, 4, 6, 11, 8, 3, 1, 1, 1),         # batch 1
    (3, 2, 4, 1, 1, 3, 1, 1, 1),          # 1x1 spatial, padded
    (2, 5, 3, 1, 1, 1, 0, 1, 1),          # 1x1 spatial, 1x1 kernel
    (2, 6, 4, 7, 9, 1, 0, 1, 2),          # 1x1 kernel, groups
    (2, 4, 6, 8, 7, 2, 0, 1, 1),          # even kernel
    (2, 3, 4, 10, 9, 5, 2, 1, 1),
    (1, 3, 2, 13, 12, 7, 3, 1, 1),        # the stem's kernel, stride 1
    (2, 6, 9, 9, 10, 3, 2, 2, 3),         # dilation and groups
    (2, 4, 4, 12, 11, (3, 5), (0, 2), (2, 1), 4),   # depthwise, rectangular, dilation per axis
    (2, 3, 4, 6, 5, 3, "same", 1, 1),
    (2, 3, 4, 6, 5, (2, 4), "same", (1, 2), 1),     # "same" with an odd total: asymmetric padding
    (1, 2, 3, 5, 4, 3, "valid", 1, 1),
    (2, 4, 3, 5, 9, 3, 0, 2, 1),          # dilated with a single output row (the taps' first span)
    (2, 4, 3, 5, 5, 3, 0, (2, 1), 1),     # ... and with a single output pixel per row's first span
    (2, 4, 6, 5, 12, 3, 0, 2, 2),
]


@pytest.mark.parametrize("variant", IG.VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, c, o, h, w, kernel, padding, dilation, groups", CASES)
def test_matches_torch_float64(n, c, o, h, w, kernel, padding, dilation, groups, bias, variant, rng):
    kh, kw = im2col_conv.pair(kernel)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((o, c // groups, kh, kw))
    b = rng.standard_normal(o) if bias else None
    y, cache = implicit_conv2d_forward(channels_last(x), stored_weight(weight), b, 1, padding, dilation, groups,
                                       variant=variant)
    dy = rng.standard_normal(y.shape)
    grads = implicit_conv2d_backward(dy, cache)
    truth = torch_conv(x, weight, b, padding, dilation, groups, dy)
    for name, ours, ref in zip(("y", "dx", "dweight", "dbias"), (y,) + grads, truth):
        if ref is None:
            assert ours is None
            continue
        assert ours.shape == ref.shape and ours.dtype == np.float64
        assert_close(ours, ref, "float64", f"{variant} {name}")
    # channels-last results, weight gradient stored like the weight
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous and grads[0].transpose(0, 2, 3, 1).flags.c_contiguous
    assert grads[1].transpose(2, 3, 1, 0).flags.c_contiguous


STRIDED = [   # n, c, o, h, w, kernel, padding, dilation, groups, stride
    (2, 3, 4, 7, 5, 3, 1, 1, 1, 2),            # odd sizes
    (1, 4, 6, 9, 11, 3, (1, 2), (2, 1), 2, 2),
    (3, 6, 6, 8, 9, (5, 3), (2, 0), 1, 3, (2, 1)),
    (2, 8, 4, 1, 1, 1, 0, 1, 1, 2),            # 1x1 spatial
    (2, 8, 4, 2, 2, 3, 1, 1, 2, 2),
    (2, 4, 5, 11, 13, 1, 0, 1, 1, 2),          # the downsampling 1x1
    (1, 3, 4, 16, 15, 7, 3, 1, 1, 2),          # the stem
    (2, 4, 5, 12, 11, 3, 1, 1, 1, 3),
    (2, 4, 5, 6, 6, (2, 4), 0, 1, 1, 2),
]


@pytest.mark.parametrize("n, c, o, h, w, kernel, padding, dilation, groups, stride", STRIDED)
def test_strided_matches_torch_float64(n, c, o, h, w, kernel, padding, dilation, groups, stride, rng):
    """Stride > 1 by the phase split: y, dx, dweight, dbias against PyTorch to 1e-10."""
    kh, kw = im2col_conv.pair(kernel)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((o, c // groups, kh, kw))
    b = rng.standard_normal(o)
    y, cache = implicit_conv2d_forward(channels_last(x), stored_weight(weight), b, stride, padding, dilation, groups)
    dy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(weight, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride, padding, dilation, groups)
    ty.backward(torch.tensor(dy))
    for name, ours, ref in zip(("y", "dx", "dweight", "dbias"), (y,) + implicit_conv2d_backward(dy, cache),
                               (ty, tx.grad, tw.grad, tb.grad)):
        assert_close(ours, ref.detach().numpy(), "float64", f"stride {stride} {name}")
    with pytest.raises(ValueError, match="rows"):
        implicit_conv2d_forward(x, weight, b, 2, padding, dilation, groups, variant="rows")


@pytest.mark.parametrize("variant", IG.VARIANTS)
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_row_splits_blocks_and_chunks(variant, workers, rng, monkeypatch):
    """Tiny row blocks, several GEMM workers and small workspace chunks (the width variant's images)
    change nothing but the order of the sums."""
    monkeypatch.setattr(IG, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(IG, "WORKSPACE_ELEMENTS", 300)
    if blas.single_threaded_blas_available():
        monkeypatch.setattr(IG, "gemm_workers", lambda: workers)
    x = rng.standard_normal((3, 4, 7, 6))
    weight = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    y, cache = implicit_conv2d_forward(x, weight, b, 1, 1, 1, 2, variant=variant)
    dy = rng.standard_normal(y.shape)
    for ours, ref in zip((y,) + implicit_conv2d_backward(dy, cache), torch_conv(x, weight, b, 1, 1, 2, dy)):
        assert_close(ours, ref, "float64", variant)


@pytest.mark.skipif(not blas.single_threaded_blas_available(), reason="numres cannot set this BLAS's threads")
def test_blas_thread_count_restored_after_concurrent_sections(rng, monkeypatch):
    """Two user threads running split convolutions at once leave OpenBLAS's thread count as it was."""
    import threading
    monkeypatch.setattr(IG, "gemm_workers", lambda: 2)
    x, weight = rng.standard_normal((2, 8, 12, 12)), rng.standard_normal((8, 8, 3, 3))
    errors = []

    def work():
        try:
            for _ in range(20):
                y, cache = implicit_conv2d_forward(x, weight, None, 1, 1)
                implicit_conv2d_backward(y, cache)
        except Exception as error:           # noqa: BLE001  (reported below)
            errors.append(error)

    with blas.blas_threads(2):
        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and blas.current_blas_threads() == 2


def test_skipped_gradients_are_none(rng):
    x, weight, b = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, cache = implicit_conv2d_forward(x, weight, b, 1, 1)
    dy = rng.standard_normal(y.shape)
    full = implicit_conv2d_backward(dy, cache)
    dx, dw, db = implicit_conv2d_backward(dy, cache, need_input_grad=False)
    assert dx is None and rel_err(dw, full[1]) == 0 and rel_err(db, full[2]) == 0
    dx, dw, db = implicit_conv2d_backward(dy, cache, need_weight_grad=False)
    assert dw is None and db is None and rel_err(dx, full[0]) == 0
    assert implicit_conv2d_backward(dy, cache, need_weight_grad=False, need_bias_grad=True)[2] is not None


def test_relu_in_the_output_pass(rng):
    x, weight, b = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, _ = implicit_conv2d_forward(x, weight, b, 1, 1)
    y_relu, _ = implicit_conv2d_forward(x, weight, b, 1, 1, relu=True)
    assert rel_err(y_relu, np.maximum(y, 0)) == 0


def test_bad_input_is_named(rng):
    x, weight = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    with pytest.raises(ValueError, match="zero-padded"):
        implicit_conv2d_forward(x, weight, None, 1, -2)
    with pytest.raises(ValueError, match="variant"):
        implicit_conv2d_forward(x, weight, None, 1, 1, variant="diagonal")


# --- float32 against the float64 truth ---------------------------------------------------------------


@pytest.mark.parametrize("variant", IG.VARIANTS)
def test_float32_against_float64_truth(variant, rng):
    """Realistic scale (Kaiming weights, 64 channels): as accurate as im2col's float32, near 1e-6."""
    n, c, h = 2, 64, 14
    x = rng.standard_normal((n, c, h, h))
    weight = rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))
    dy = rng.standard_normal((n, c, h, h))
    truth = torch_conv(x, weight, None, 1, 1, 1, dy)[:3]
    x32, w32, dy32 = channels_last(x.astype(np.float32)), stored_weight(weight.astype(np.float32)), \
        channels_last(dy.astype(np.float32))
    y, cache = implicit_conv2d_forward(x32, w32, None, 1, 1, variant=variant)
    ours = (y,) + implicit_conv2d_backward(dy32, cache)[:2]
    y_ref, cache_ref = im2col_conv.conv2d_forward(x32, w32, None, 1, 1)
    im2col = (y_ref,) + im2col_conv.conv2d_backward(dy32, cache_ref)[:2]
    for name, mine, theirs, ref in zip(("y", "dx", "dweight"), ours, im2col, truth):
        assert mine.dtype == np.float32
        error = assert_close(mine, ref, "float32", name, tol=1e-5)
        assert error <= 3 * rel_err(theirs, ref) + 1e-7, (name, error, rel_err(theirs, ref))


# --- no patch matrix ---------------------------------------------------------------------------------


def test_no_patch_matrix_on_the_implicit_path(rng, restore_algorithm, monkeypatch):
    """im2col/col2im are never called, and the peak of new memory stays far below one patch matrix
    (9x the input for a 3x3 kernel): the padded input, the padded-grid output and its gradient."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a patch matrix was built on the implicit path")

    monkeypatch.setattr(im2col_conv, "im2col", forbidden)
    monkeypatch.setattr(im2col_conv, "col2im", forbidden)
    nr.functional.set_conv_algorithm("implicit")
    x = channels_last(rng.standard_normal((2, 32, 24, 24)).astype(np.float32))
    weight = stored_weight(rng.standard_normal((32, 32, 3, 3)).astype(np.float32))
    dy = channels_last(rng.standard_normal((2, 32, 24, 24)).astype(np.float32))
    tracemalloc.start()
    try:
        y, cache = algorithms.conv2d_forward(x, weight, None, 1, 1)
        _, forward_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()             # y, kept by the caller
        dx, dw, _ = algorithms.conv2d_backward(dy, cache)
        backward_peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert algorithms.algorithm_of(cache) == "implicit"
    patch_matrix = 9 * x.nbytes
    assert forward_peak < 0.4 * patch_matrix, (forward_peak, patch_matrix)      # padded x + grid y + y
    assert backward_peak < 0.5 * patch_matrix, (backward_peak, patch_matrix)    # padded dy, padded dx, dx


# --- the algorithm setting -----------------------------------------------------------------------------


@pytest.fixture
def restore_algorithm():
    yield
    nr.functional.set_conv_algorithm("auto", winograd_tile=2, benchmark=False)


@pytest.mark.parametrize("padding", [0, 1, "same", (1, 2)])
def test_dispatch_agrees_with_im2col_and_torch(padding, rng, restore_algorithm):
    x = channels_last(rng.standard_normal((2, 4, 9, 8)))
    weight = stored_weight(rng.standard_normal((6, 2, 3, 3)))
    b = rng.standard_normal(6)
    results = {}
    for algorithm in ("im2col", "implicit"):
        nr.functional.set_conv_algorithm(algorithm)
        y, cache = algorithms.conv2d_forward(x, weight, b, 1, padding, (1, 2), 2)
        assert algorithms.algorithm_of(cache) == algorithm
        dy = np.random.default_rng(5).standard_normal(y.shape)
        results[algorithm] = (y,) + algorithms.conv2d_backward(dy, cache)
    for ours, ref in zip(results["implicit"], torch_conv(x, weight, b, padding, (1, 2), 2, dy)):
        assert_close(ours, ref, "float64", f"padding={padding!r}")
    for ours, ref in zip(results["implicit"], results["im2col"]):
        assert rel_err(ours, ref) < 1e-12


def test_what_takes_im2col_under_implicit(rng, restore_algorithm):
    """Padding modes other than zeros, non-NumPy arrays and empty batches stay on im2col (stride 2 does not)."""
    nr.functional.set_conv_algorithm("implicit")
    choose = nr.functional.choose_conv_algorithm
    assert choose((2, 4, 8, 8), (4, 4, 3, 3), 1, 1) == "implicit"
    assert choose((2, 4, 8, 8), (4, 4, 3, 3), 2, 1) == "implicit"
    assert choose((2, 4, 8, 8), (4, 4, 3, 3), 1, 1, padding_mode="reflect") == "im2col"
    assert choose((2, 4, 8, 8), (4, 4, 3, 3), 1, 1, xp=object()) == "im2col"    # not an array module
    assert choose((0, 4, 8, 8), (4, 4, 3, 3), 1, 1) == "im2col"
    x, weight = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    y, cache = algorithms.conv2d_forward(x, weight, None, 1, 1, padding_mode="circular")
    assert algorithms.algorithm_of(cache) == "im2col"


def test_auto_rule(restore_algorithm):
    """The measured rule (conv_algorithms' notes): with several BLAS threads, implicit GEMM for 3x3 layers at 56,
    28 and 14 (and small-channel layers up to 30% more rows), im2col at 7, for 1x1 and stride 2."""
    from numres.blas import blas_threads, current_blas_threads
    if current_blas_threads() is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose thread count numres can read")
    choose = nr.functional.choose_conv_algorithm
    nr.functional.set_conv_algorithm("auto")
    with blas_threads(2):
        assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1) == "implicit"
        assert choose((8, 128, 28, 28), (128, 128, 3, 3), 1, 1) == "implicit"
        assert choose((8, 256, 14, 14), (256, 256, 3, 3), 1, 1) == "implicit"    # 15% more rows
        assert choose((8, 512, 7, 7), (512, 512, 3, 3), 1, 1) == "im2col"        # 31% more rows
        assert choose((32, 32, 16, 16), (32, 32, 3, 3), 1, 1) == "implicit"      # few channels: 27% is fine
        assert choose((128, 16, 32, 32), (16, 16, 3, 3), 1, 1) == "implicit"
        assert choose((8, 3, 224, 224), (64, 3, 3, 3), 1, 1) == "im2col"         # K = 3
        assert choose((8, 128, 56, 56), (128, 4, 3, 3), 1, 1, groups=32) == "im2col"   # ResNeXt's 4 per group
        assert choose((8, 64, 56, 56), (64, 64, 1, 1), 1, 0) == "im2col"
        assert choose((8, 64, 56, 56), (64, 64, 3, 3), 2, 1) == "im2col"       # strided: measured no better
    with blas_threads(1):                                                         # Winograd's rule comes first
        assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1) == "winograd"


def test_benchmark_mode_times_every_candidate_and_records_the_choice(rng, restore_algorithm, monkeypatch):
    real = algorithms.measure_conv_algorithms
    seen = []

    def faked(*args, **kwargs):
        seconds = real(*args, **kwargs)
        seen.append(dict(seconds))
        return {name: 1.0 if name == "implicit" else 2.0 for name in seconds}

    monkeypatch.setattr(algorithms, "measure_conv_algorithms", faked)
    nr.functional.set_conv_algorithm("auto", benchmark=True)
    x, weight = rng.standard_normal((2, 3, 7, 7)), rng.standard_normal((4, 3, 3, 3))
    for _ in range(2):
        _, cache = algorithms.conv2d_forward(x, weight, None, 1, 1)
        assert algorithms.algorithm_of(cache) == "implicit"
    assert len(seen) == 1 and set(seen[0]) == {"im2col", "winograd", "implicit"}
    assert all(value > 0 for value in seen[0].values())
    (record,) = algorithms.measured_choices()
    assert record["choice"] == "implicit" and record["input"] == [2, 3, 7, 7] and set(record["seconds"]) == \
        {"im2col", "winograd", "implicit"}
    _, cache = algorithms.conv2d_forward(x, weight, None, 2, 1)     # stride 2: im2col and implicit timed
    assert algorithms.algorithm_of(cache) == "implicit" and len(seen) == 2 and set(seen[1]) == {"im2col", "implicit"}
    _, cache = algorithms.conv2d_forward(x, weight, None, 1, 1, padding_mode="reflect")   # one candidate: not timed
    assert algorithms.algorithm_of(cache) == "im2col" and len(seen) == 2


def test_fallback_without_cblas_says_so_once(rng, restore_algorithm, monkeypatch):
    """A BLAS with no CBLAS GEMM numres can find: one RuntimeWarning, then im2col, silently."""
    monkeypatch.setattr(blas, "CBLAS_GEMM_SYMBOLS", (("no_such_sgemm", "no_such_dgemm", False),))
    blas.cblas_gemm.cache_clear()
    monkeypatch.setattr(algorithms, "_warned", set())
    try:
        assert not IG.implicit_available()
        nr.functional.set_conv_algorithm("implicit")
        x, weight = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
        with pytest.warns(RuntimeWarning, match="cblas_sgemm"):
            y, cache = algorithms.conv2d_forward(x, weight, None, 1, 1)
        assert algorithms.algorithm_of(cache) == "im2col"
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, cache = algorithms.conv2d_forward(x, weight, None, 1, 1)
            nr.functional.set_conv_algorithm("auto")
            _, cache = algorithms.conv2d_forward(x, weight, None, 1, 1)
        with pytest.raises(RuntimeError, match="cblas"):
            implicit_conv2d_forward(x, weight, None, 1, 1)
    finally:
        monkeypatch.undo()
        blas.cblas_gemm.cache_clear()
    assert IG.implicit_available()


# --- any array module: the generic slab version (CuPy's cuBLAS path), on NumPy and the guard backend -------


@pytest.mark.parametrize("n, c, o, h, w, kernel, padding, dilation, groups, stride", [
    (2, 3, 4, 7, 5, 3, 1, 1, 1, 1), (1, 4, 6, 9, 11, 3, (1, 2), (2, 1), 2, 1), (2, 6, 6, 5, 6, (5, 3), "same", 1, 3, 1),
    (2, 4, 6, 12, 11, 3, 1, 1, 2, 2), (2, 4, 5, 10, 10, 7, 3, 1, 1, 2), (3, 2, 4, 1, 1, 3, 1, 1, 1, 1)])
def test_generic_version_equals_cblas_path_and_runs_under_the_guard(n, c, o, h, w, kernel, padding, dilation,
                                                                       groups, stride, rng):
    """The xp version (what CuPy runs, through cuBLAS's gemm with beta = 1) equals the CBLAS path on NumPy, and
    runs on the guard backend with no host round-trip."""
    from numres.testing import guard_xp, no_transfers
    kh, kw = im2col_conv.pair(kernel)
    x, b = rng.standard_normal((n, c, h, w)), rng.standard_normal(o)
    weight = rng.standard_normal((o, c // groups, kh, kw))
    y, cache = implicit_conv2d_forward(x, weight, b, stride, padding, dilation, groups)
    dy = rng.standard_normal(y.shape)
    reference = (y,) + implicit_conv2d_backward(dy, cache)
    y_xp, cache_xp = IG.implicit_conv2d_forward_xp(x, weight, b, stride, padding, dilation, groups)
    for ours, ref in zip((y_xp,) + IG.implicit_conv2d_backward_xp(dy, cache_xp), reference):
        assert rel_err(ours, ref) < 1e-12
    with no_transfers():
        arrays = [guard_xp.asarray(a) for a in (x, weight, b, dy)]
        y_g, cache_g = implicit_conv2d_forward(*arrays[:3], stride, padding, dilation, groups, relu=True)
        guarded = (y_g,) + implicit_conv2d_backward(arrays[3], cache_g)
    assert rel_err(nr.backend.to_numpy(guarded[0]), np.maximum(y, 0)) < 1e-12
    for ours, ref in zip(guarded[1:], reference[1:]):
        assert rel_err(nr.backend.to_numpy(ours), ref) < 1e-12


def test_gpu_path_only_by_name(restore_algorithm):
    """Off NumPy, "auto" never takes implicit GEMM (not measured on a GPU); set_conv_algorithm("implicit") does."""
    from numres.testing import guard_xp
    choose = nr.functional.choose_conv_algorithm
    nr.functional.set_conv_algorithm("auto")
    assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, xp=guard_xp) != "implicit"
    nr.functional.set_conv_algorithm("implicit")
    assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, xp=guard_xp) == "implicit"


def test_resnet18_trains_under_the_guard_with_implicit_gemm(rng, restore_algorithm, monkeypatch):
    """ResNet-18 with every convolution on the generic slab path (what CuPy runs, through cuBLAS), two SGD
    steps on the guard backend inside no_transfers(): no host round-trip, and the same losses, logits,
    parameters and gradients as the same path on NumPy (the guard computes what NumPy computes)."""
    from test_guard import _assert_states_match, _channels_last, _train_steps
    from numres.testing import GuardedArray
    calls = []
    forward_xp = IG.implicit_conv2d_forward_xp
    monkeypatch.setattr(algorithms, "implicit_conv2d_forward",
                        lambda *a, **k: calls.append(1) or forward_xp(*a, **k))   # NumPy too takes the xp version
    monkeypatch.setattr(algorithms, "implicit_conv2d_backward", IG.implicit_conv2d_backward_xp)
    nr.functional.set_conv_algorithm("implicit")
    x = _channels_last(rng.standard_normal((2, 3, 24, 24)))
    target = np.array([3, 8])
    nr.manual_seed(7)
    reference = nr.resnet18(num_classes=10, dtype="float64")
    nr.manual_seed(7)
    guarded = nr.resnet18(num_classes=10, dtype="float64").to("guard")
    ref_losses, ref_logits = _train_steps(reference, "numpy", x, target, steps=2)
    losses, logits = _train_steps(guarded, "guard", x, target, steps=2)
    assert len(calls) == 2 * 2 * 20 and all(isinstance(p.data, GuardedArray) for p in guarded.parameters())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-11)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-11, atol=1e-11 * np.abs(ref_logits).max())
    _assert_states_match(guarded, reference, rtol=1e-11)


# --- modules and whole models ------------------------------------------------------------------------


def test_conv2d_module_gradcheck_under_implicit(rng, restore_algorithm):
    """nr.gradcheck (central differences, float64) on Conv2d layers computed by implicit GEMM."""
    nr.functional.set_conv_algorithm("implicit")
    x = rng.standard_normal((2, 4, 7, 6))
    for kwargs in (dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=2, dilation=2, groups=2),
                   dict(kernel_size=(2, 3), padding="same", bias=False)):
        conv = nr.nn.Conv2d(4, 4, dtype="float64", **kwargs)
        conv(x)
        assert algorithms.algorithm_of(conv.saved_cache()) == "implicit", kwargs
        result = nr.gradcheck(conv, x)
        assert result.passed(1e-6), (kwargs, str(result))


def test_resnet18_train_step_under_implicit_matches_torch(restore_algorithm, monkeypatch):
    """ResNet-18, training mode, every convolution on implicit GEMM (strided ones by the phase split): logits,
    dL/dx, every parameter gradient and the BN buffers against PyTorch in float64 (1e-10), then one SGD step."""
    import torch_reference as R
    from test_resnet import assert_all_below, batch, make_pair
    calls = []
    real = algorithms.implicit_conv2d_forward
    monkeypatch.setattr(algorithms, "implicit_conv2d_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    nr.functional.set_conv_algorithm("implicit")
    model, reference = make_pair("resnet18", "float64", True, torch_dtype="float64")
    x, upstream = batch("float64")
    errors = R.model_parity(model, reference, x, upstream)
    assert len(calls) == 20                    # every convolution of ResNet-18
    assert_all_below(errors, TOL["float64"])
    optimizer = nr.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer.step()
    torch_optimizer.step()
    state = reference.state_dict()
    worst = max(rel_err(p.data, state[name].detach().numpy()) for name, p in model.named_parameters())
    assert worst < TOL["float64"]


def test_folded_batchnorm_under_implicit(restore_algorithm):
    """Evaluation mode folds conv -> BN into one implicit-GEMM convolution (bias and ReLU in its output pass);
    forward equals the unfolded model's, and backward through the folded pairs matches PyTorch."""
    import torch_reference as R
    from test_resnet import make_pair
    from numres.functional.fused import FoldedConvCache
    nr.functional.set_conv_algorithm("implicit")
    model, reference = make_pair("resnet18", "float64", False, torch_dtype="float64")
    rng = np.random.default_rng(3)
    x, upstream = rng.standard_normal((2, 3, 40, 40)), rng.standard_normal((2, 1000))
    with nr.nn.batchnorm_folding(False):
        unfolded = model(x)
    folded_algorithms = []

    def record(m):
        folded_algorithms.extend(conv.saved_cache().algorithm for conv in m.modules()
                                 if isinstance(conv, nr.nn.Conv2d) and isinstance(conv.saved_cache(), FoldedConvCache))

    errors = R.model_parity(model, reference, x, upstream, after_forward=record)
    assert folded_algorithms.count("implicit") == 20
    assert max(errors.values()) < TOL["float64"], max(errors.items(), key=lambda item: item[1])
    assert rel_err(model(x), unfolded) < 1e-12


# --- OpenBLAS's worker threads: the same whatever the import order ---------------------------------------


@pytest.mark.skipif(not blas._loaded_openblas(), reason="NumPy's BLAS here is not OpenBLAS")
@pytest.mark.parametrize("numpy_first", [True, False])
def test_thread_timeout_whatever_the_import_order(numpy_first):
    """NumPy imported (and a GEMM run) before numres: numres still gets OpenBLAS's workers to sleep right
    after each call (the timeout OpenBLAS reports is 4, and they burn no CPU while the process sleeps)."""
    script = textwrap.dedent(f"""
        import ctypes, os, time
        os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
        if {numpy_first}:
            import numpy as np
            a = np.ones((400, 400), np.float32)
            a @ a
        import numres
        import numpy as np
        from numres import blas
        library = ctypes.CDLL(blas._loaded_openblas()[0])
        library.openblas_thread_timeout.restype = ctypes.c_uint
        a = np.ones((600, 600), np.float32)
        spent = []
        with blas.blas_threads(2):
            for _ in range(3):
                assert (a @ a)[0, 0] == 600
                start = time.process_time()
                time.sleep(0.15)
                spent.append(time.process_time() - start)
        print(library.openblas_thread_timeout(), min(spent))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    timeout, spent = out.stdout.split()
    assert int(timeout) == 4
    assert float(spent) < 0.02          # a spinning worker would burn ~0.1 s of CPU per sleep


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_bits_do_not_depend_on_the_thread_count(dtype):
    """dW's K (the pixel rows) is cut by the shape alone, and the partial GEMMs summed in a fixed order:
    one thread or two, numres's or BLAS's, the bits agree, so a seeded run resumes bit-identically
    whatever threads it gets (a split by the worker count once broke test_cli_train's resume)."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((4, 16, 64, 64)).astype(dtype)
    weight = stored_weight(rng.standard_normal((16, 16, 3, 3)).astype(dtype))
    y, cache = implicit_conv2d_forward(x, weight, None, 1, 1)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert IG.weight_gradient_parts(4 * 66 * 66) > 1                     # the case that splits
    results = []
    saved = nr.parallel.get_num_threads()
    try:
        for numres_threads, blas_count in [(1, 1), (2, 2), (2, 1), (1, 2)]:
            nr.parallel.set_num_threads(numres_threads)
            with blas.blas_threads(blas_count):
                results.append(implicit_conv2d_backward(dy, cache))
    finally:
        nr.parallel.set_num_threads(saved)
    for dx, dw, _ in results[1:]:
        assert np.array_equal(dw, results[0][1]) and np.array_equal(dx, results[0][0])


def test_auto_runs_wide_layers_backward_through_im2col(monkeypatch):
    """Under "auto" a 128-channel layer's forward is implicit GEMM and its backward im2col's (measured
    faster there), from the same saved input; a 64-channel layer keeps implicit GEMM both ways.  Both
    agree with PyTorch in float64."""
    rng = np.random.default_rng(41)
    monkeypatch.setattr(algorithms, "current_blas_threads", lambda: 2)    # "auto" with 1 BLAS thread may pick Winograd
    calls = []
    original = im2col_conv.im2col                       # im2col's backward rebuilds its patch matrix
    monkeypatch.setattr(im2col_conv, "im2col", lambda *a, **k: calls.append("im2col") or original(*a, **k))
    for channels, expected in [(128, "implicit fwd, im2col bwd"), (64, "implicit")]:
        conv = nr.nn.Conv2d(channels, channels, 3, padding=1, bias=True, dtype="float64")
        x = rng.standard_normal((2, channels, 56, 56))
        with nr.using_config(conv_algorithm="auto"):
            y = conv(x)
            assert algorithms.algorithm_of(conv.saved_cache()) == expected
            assert calls == []                          # the forward built no patch matrix
            dy = rng.standard_normal(y.shape)
            dx = conv.backward(dy)
        assert bool(calls) == (channels == 128)
        calls.clear()
        ty, tdx, tdw, tdb = torch_conv(x, conv.weight.data, conv.bias.data, 1, 1, 1, dy)
        for ours, theirs in [(y, ty), (dx, tdx), (conv.weight.grad, tdw), (conv.bias.grad, tdb)]:
            assert rel_err(ours, theirs) < TOL["float64"]
