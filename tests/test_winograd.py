"""Winograd convolution F(2x2, 3x3) and F(4x4, 3x3), and the choice of convolution algorithm.

* the transform matrices: the 1-D identity ``A^T [(G g) * (B^T d)] = correlation(d, g)``;
* forward, input gradient, weight gradient and bias gradient against PyTorch in float64
  (<= 1e-10), over odd sizes, batch 1, padding 0, 1, 2 and asymmetric, outputs smaller than
  one tile, inputs not stored channels-last;
* against the im2col reference path, through ``set_conv_algorithm``;
* float32 against a float64 truth: F(2,3) within 5e-6 relative (measured ~1e-6), F(4,3)
  within 5e-5 (measured ~1e-5);
* central finite differences in float64 on every gradient;
* one-image chunks and short runs of tile rows (threads), skipped gradients, the guard
  backend (the CuPy code path), the "auto" rule and bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import numres as nr
import numres.functional.winograd as W
from conftest import TOL, TORCH_DTYPE, assert_close, rel_err
from numres.functional import conv as im2col_conv
from numres.functional import conv_algorithms as algorithms
from numres.functional.winograd import winograd_conv2d_backward, winograd_conv2d_forward

TILES = [2, 4]


def channels_last(array):
    """The same values, stored (N, H, W, C) behind the (N, C, H, W) shape."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def stored_weight(weight):
    """A PyTorch-shaped weight stored (3, 3, I, O), as numres.nn.Conv2d stores it."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).transpose(3, 2, 0, 1)


def torch_conv(x, weight, bias, padding, dy, dtype="float64"):
    """PyTorch's output and gradients (x, weight, bias) for upstream gradient ``dy``."""
    tensors = [torch.tensor(a, dtype=TORCH_DTYPE[dtype], requires_grad=True) if a is not None else None
               for a in (x, weight, bias)]
    y = torch.nn.functional.conv2d(tensors[0], tensors[1], tensors[2], padding=padding)
    y.backward(torch.tensor(dy, dtype=TORCH_DTYPE[dtype]))
    return [y.detach().numpy()] + [t.grad.numpy() if t is not None else None for t in tensors]


def random_case(rng, n, c, o, h, w, padding, bias=True):
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((o, c, 3, 3))
    b = rng.standard_normal(o) if bias else None
    dy = rng.standard_normal((n, o, h + 2 * ph - 2, w + 2 * pw - 2))
    return x, weight, b, dy


# --- the transforms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", TILES)
def test_one_dimensional_identity(tile, rng):
    """A^T [(G g) * (B^T d)] is the correlation of d (length m+2) with g (length 3), in exact arithmetic."""
    t = W.TRANSFORMS[tile]
    bt, g_matrix, at = (np.array(m, dtype=np.float64) for m in (t.BT, t.G, t.AT))
    assert bt.shape == (tile + 2, tile + 2) and g_matrix.shape == (tile + 2, 3) and at.shape == (tile, tile + 2)
    for _ in range(5):
        d, g = rng.standard_normal(tile + 2), rng.standard_normal(3)
        expected = np.array([d[k:k + 3] @ g for k in range(tile)])
        assert rel_err(at @ ((g_matrix @ g) * (bt @ d)), expected) < 1e-14


@pytest.mark.parametrize("tile", TILES)
def test_two_dimensional_tile(tile, rng):
    """Y = A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of one (m+2)x(m+2) tile."""
    t = W.TRANSFORMS[tile]
    bt, g_matrix, at = (np.array(m, dtype=np.float64) for m in (t.BT, t.G, t.AT))
    d, g = rng.standard_normal((tile + 2, tile + 2)), rng.standard_normal((3, 3))
    expected = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(tile)] for i in range(tile)])
    assert rel_err(at @ ((g_matrix @ g @ g_matrix.T) * (bt @ d @ bt.T)) @ at.T, expected) < 1e-14


def test_combine_matches_matrix_product(rng):
    """The add/subtract/multiply plan of combine() computes sum_j c_j a_j for every transform row."""
    arrays = [rng.standard_normal((3, 5)) for _ in range(6)]
    for t in W.TRANSFORMS.values():
        for matrix in (t.BT, t.AT, W.transposed(t.AT), t.G):
            for row in matrix:
                out = np.empty((3, 5))
                W.combine(np, out, row, arrays[:len(row)])
                expected = sum(c * a for c, a in zip(row, arrays))
                assert rel_err(out, expected) < 1e-14


# --- against PyTorch in float64 ------------------------------------------------------------------------

CASES = [  # (n, c, o, h, w, padding)
    (2, 3, 5, 8, 8, 1),
    (1, 4, 6, 7, 9, 1),        # batch 1, odd sizes: the last tiles are partial
    (3, 2, 3, 5, 4, 0),
    (2, 3, 4, 6, 7, 2),
    (1, 2, 2, 3, 3, 0),        # a 1x1 output: one partial tile
    (2, 5, 3, 1, 1, 1),        # a 1x1 input
    (2, 3, 4, 9, 6, (1, 0)),   # asymmetric padding
    (1, 7, 9, 13, 11, (0, 2)),
]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("n, c, o, h, w, padding", CASES)
def test_matches_torch_float64(tile, n, c, o, h, w, padding, rng):
    x, weight, bias, dy = random_case(rng, n, c, o, h, w, padding)
    y_ref, dx_ref, dw_ref, db_ref = torch_conv(x, weight, bias, padding, dy)
    y, cache = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=padding, tile=tile)
    assert y.shape == y_ref.shape and y.transpose(0, 2, 3, 1).flags.c_contiguous    # channels-last output
    dx, dw, db = winograd_conv2d_backward(channels_last(dy), cache)
    assert dx.shape == x.shape and dw.shape == weight.shape and db.shape == bias.shape
    for name, ours, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dw, dw_ref), ("dbias", db, db_ref)):
        assert_close(ours, ref, "float64", f"F({tile},3) {name}")


@pytest.mark.parametrize("tile", TILES)
def test_inputs_not_channels_last_and_no_bias(tile, rng):
    """Plain NCHW-contiguous x, weight and dy give the same answers (one copy inside)."""
    x, weight, _, dy = random_case(rng, 2, 3, 4, 7, 6, 1, bias=False)
    y_ref, dx_ref, dw_ref, _ = torch_conv(x, weight, None, 1, dy)
    y, cache = winograd_conv2d_forward(x, weight, None, padding=1, tile=tile)
    dx, dw, db = winograd_conv2d_backward(dy, cache)
    assert db is None
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert_close(ours, ref, "float64")


@pytest.mark.parametrize("tile", TILES)
def test_small_chunks_and_runs_of_tile_rows(tile, rng, monkeypatch):
    """One image per chunk and runs of one or two tile rows that straddle images: same answers."""
    x, weight, bias, dy = random_case(rng, 3, 4, 5, 11, 10, 1)
    y_ref, dx_ref, dw_ref, db_ref = torch_conv(x, weight, bias, 1, dy)
    monkeypatch.setattr(W, "WORKSPACE_ELEMENTS", 1)
    monkeypatch.setattr(W, "TRANSFORM_TILE_ELEMENTS", 1)
    monkeypatch.setattr(W, "images_per_chunk", lambda n, per_image, xp=None: 1)
    y, cache = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=1, tile=tile)
    dx, dw, db = winograd_conv2d_backward(channels_last(dy), cache)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert_close(ours, ref, "float64")


def test_runs_of_tile_rows_straddle_images(rng, monkeypatch):
    """Whole chunks with runs of 3 tile rows over images of 4 tile rows: runs cross image borders."""
    x, weight, bias, dy = random_case(rng, 3, 2, 3, 8, 8, 1)
    y_ref, dx_ref, dw_ref, _ = torch_conv(x, weight, bias, 1, dy)
    tile_row = 16 * 4 * 3                              # a*a * tiles_w * channels for F(2,3) here
    monkeypatch.setattr(W, "TRANSFORM_TILE_ELEMENTS", 3 * tile_row)
    y, cache = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=1)
    dx, dw, _ = winograd_conv2d_backward(channels_last(dy), cache)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert_close(ours, ref, "float64")


@pytest.mark.parametrize("tile", TILES)
def test_bias_and_relu_in_the_output_pass(tile, rng, monkeypatch):
    """relu=True gives relu(conv(x) + b) as PyTorch computes it, also with runs of single tile rows."""
    x, weight, bias, _ = random_case(rng, 3, 4, 5, 9, 7, 1)
    expected = torch.relu(torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(weight), torch.tensor(bias),
                                                     padding=1)).numpy()
    y, _ = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=1, tile=tile, relu=True)
    assert_close(y, expected, "float64")
    monkeypatch.setattr(W, "TRANSFORM_TILE_ELEMENTS", 1)
    y, _ = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=1, tile=tile, relu=True)
    assert_close(y, expected, "float64")


def test_skipped_gradients_are_none(rng):
    x, weight, bias, dy = random_case(rng, 2, 3, 4, 6, 6, 1)
    _, dx_ref, dw_ref, db_ref = torch_conv(x, weight, bias, 1, dy)
    _, cache = winograd_conv2d_forward(x, weight, bias, padding=1)
    dx, dw, db = winograd_conv2d_backward(dy, cache, need_input_grad=False)
    assert dx is None
    assert_close(dw, dw_ref, "float64")
    assert_close(db, db_ref, "float64")
    dx, dw, db = winograd_conv2d_backward(dy, cache, need_weight_grad=False)
    assert dw is None and db is None
    assert_close(dx, dx_ref, "float64")
    _, _, db = winograd_conv2d_backward(dy, cache, need_weight_grad=False, need_bias_grad=True)
    assert_close(db, db_ref, "float64")


def test_empty_batch(rng):
    weight = rng.standard_normal((4, 3, 3, 3))
    y, cache = winograd_conv2d_forward(np.zeros((0, 3, 5, 5)), weight, None, padding=1)
    assert y.shape == (0, 4, 5, 5)
    dx, dw, _ = winograd_conv2d_backward(np.zeros((0, 4, 5, 5)), cache)
    assert dx.shape == (0, 3, 5, 5) and dw.shape == weight.shape and not dw.any()


# --- float32 against a float64 truth -------------------------------------------------------------------


@pytest.mark.parametrize("tile, limit", [(2, 5e-6), (4, 5e-5)])
def test_float32_error(tile, limit, rng):
    """Realistic scale (Kaiming weights, 64 channels): F(2,3) stays near 1e-6, F(4,3) near 1e-5."""
    n, c, h = 2, 64, 14
    x = rng.standard_normal((n, c, h, h))
    weight = rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))
    dy = rng.standard_normal((n, c, h, h))
    truth = torch_conv(x, weight, None, 1, dy)[:3]
    y, cache = winograd_conv2d_forward(channels_last(x.astype(np.float32)), stored_weight(weight.astype(np.float32)),
                                       None, padding=1, tile=tile)
    dx, dw, _ = winograd_conv2d_backward(channels_last(dy.astype(np.float32)), cache)
    for name, ours, ref in (("y", y, truth[0]), ("dx", dx, truth[1]), ("dweight", dw, truth[2])):
        assert ours.dtype == np.float32
        assert_close(ours, ref, "float32", f"F({tile},3) {name}", tol=limit)


# --- central finite differences (float64) --------------------------------------------------------------


@pytest.mark.parametrize("tile", TILES)
def test_finite_differences(tile, rng):
    """Every entry of dx, dweight and dbias against central differences of sum(y * r)."""
    x, weight, bias, r = random_case(rng, 2, 2, 3, 5, 4, 1)
    _, cache = winograd_conv2d_forward(x, weight, bias, padding=1, tile=tile)
    analytic = winograd_conv2d_backward(r, cache)
    eps = 1e-6
    for index, array in enumerate((x, weight, bias)):
        numeric = np.empty_like(array)
        for position in np.ndindex(array.shape):
            saved = array[position]
            values = []
            for step in (eps, -eps):
                array[position] = saved + step
                y, _ = winograd_conv2d_forward(x, weight, bias, padding=1, tile=tile)
                values.append(np.sum(y * r))
            array[position] = saved
            numeric[position] = (values[0] - values[1]) / (2 * eps)
        assert rel_err(analytic[index], numeric) < 1e-7, ("dx", "dweight", "dbias")[index]


# --- the algorithm choice -------------------------------------------------------------------------------


@pytest.fixture
def restore_algorithm():
    yield
    nr.functional.set_conv_algorithm("auto", winograd_tile=2, benchmark=False)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("padding", [0, 1, "same", "valid"])
def test_algorithms_agree(tile, padding, rng, restore_algorithm):
    """im2col and Winograd, chosen through set_conv_algorithm, agree with PyTorch and with each other on y, dx,
    dweight and dbias."""
    x, weight, bias, _ = random_case(rng, 2, 3, 5, 9, 7, 1)
    x, weight = channels_last(x), stored_weight(weight)
    results = {}
    for algorithm in ("im2col", "winograd"):
        nr.functional.set_conv_algorithm(algorithm, winograd_tile=tile)
        y, cache = algorithms.conv2d_forward(x, weight, bias, 1, padding)
        assert isinstance(cache, W.WinogradCache) == (algorithm == "winograd")
        assert algorithms.algorithm_of(cache) == algorithm
        dy = np.random.default_rng(5).standard_normal(y.shape)
        results[algorithm] = (y,) + algorithms.conv2d_backward(dy, cache)
    for ours, ref in zip(results["winograd"], torch_conv(x, weight, bias, padding, dy)):
        assert_close(ours, ref, "float64", f"F({tile},3) padding={padding!r}")
    for ours, ref in zip(results["winograd"], results["im2col"]):
        assert rel_err(ours, ref) < 1e-12
    nr.functional.set_conv_algorithm("winograd", winograd_tile=tile)
    y_relu, _ = algorithms.conv2d_forward(x, weight, bias, 1, padding, relu=True)
    nr.functional.set_conv_algorithm("im2col")
    y_relu_ref, _ = algorithms.conv2d_forward(x, weight, bias, 1, padding, relu=True)
    assert rel_err(y_relu, np.maximum(results["im2col"][0], 0)) < 1e-12
    assert rel_err(y_relu_ref, np.maximum(results["im2col"][0], 0)) == 0


def test_other_convolutions_take_im2col(rng, restore_algorithm):
    """Strided, dilated, grouped, 1x1 and non-zero padding modes fall back to im2col under "winograd"."""
    nr.functional.set_conv_algorithm("winograd")
    x = channels_last(rng.standard_normal((2, 4, 9, 9)))
    for weight_shape, kwargs in [((4, 4, 3, 3), dict(stride=2, padding=1)),
                                 ((4, 4, 3, 3), dict(padding=2, dilation=2)),
                                 ((4, 2, 3, 3), dict(padding=1, groups=2)),
                                 ((4, 4, 1, 1), dict()),
                                 ((4, 4, 3, 3), dict(padding=3)),
                                 ((4, 4, 3, 3), dict(padding=1, padding_mode="reflect"))]:
        weight = rng.standard_normal(weight_shape)
        y, cache = algorithms.conv2d_forward(x, weight, None, **kwargs)
        assert not isinstance(cache, W.WinogradCache), kwargs
        y_ref, _ = im2col_conv.conv2d_forward(x, weight, None, **kwargs)
        np.testing.assert_array_equal(y, y_ref)


def test_auto_rule(restore_algorithm):
    """The measured rule: with one BLAS thread, ResNet's 3x3 layers at batch 8 and 224x224 take Winograd except
    at 7x7; with more BLAS threads every layer keeps im2col (Winograd's transforms gain little from a second thread)."""
    from numres.blas import blas_threads, current_blas_threads
    if current_blas_threads() is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose thread count numres can read")
    choose = nr.functional.choose_conv_algorithm
    nr.functional.set_conv_algorithm("auto")
    with blas_threads(2):
        for c, side in [(64, 56), (128, 28), (256, 14)]:
            # not Winograd; implicit GEMM where its rule takes the layer (tests/test_implicit_gemm.py)
            expected = "implicit" if algorithms.implicit_available() else "im2col"
            assert choose((8, c, side, side), (c, c, 3, 3), 1, 1) == expected, (c, side)
    with blas_threads(1):
        _auto_rule_on_one_thread(choose)


def _auto_rule_on_one_thread(choose):
    for c, side in [(64, 56), (128, 28), (256, 14)]:
        assert choose((8, c, side, side), (c, c, 3, 3), 1, 1) == "winograd", (c, side)
    assert choose((8, 512, 7, 7), (512, 512, 3, 3), 1, 1) == "im2col"           # 8x8 of tiles for 7x7
    assert choose((32, 256, 8, 8), (256, 256, 3, 3), 1, 1) == "winograd"
    assert choose((32, 64, 16, 16), (64, 64, 3, 3), 1, 1) == "winograd"        # ResNet-50 at 64x64, batch 32
    assert choose((128, 16, 32, 32), (16, 16, 3, 3), 1, 1) == "winograd"       # a CIFAR ResNet at batch 128
    assert choose((32, 512, 2, 2), (512, 512, 3, 3), 1, 1) == "im2col"         # too few pixels
    assert choose((8, 64, 14, 14), (64, 64, 3, 3), 1, 1) != "winograd"         # too little work (implicit GEMM's)
    assert choose((8, 3, 224, 224), (16, 3, 3, 3), 1, 1) == "im2col"           # too few channels
    assert choose((8, 64, 56, 56), (64, 64, 3, 3), 2, 1) == "im2col"           # stride 2
    assert choose((8, 64, 56, 56), (64, 64, 1, 1), 1, 0) == "im2col"           # 1x1
    assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, xp=object()) == "im2col"   # not NumPy
    nr.functional.set_conv_algorithm("winograd")
    assert choose((8, 512, 7, 7), (512, 512, 3, 3), 1, 1) == "winograd"
    assert choose((1, 2, 3, 3), (2, 2, 3, 3), 1, 0) == "winograd"
    nr.functional.set_conv_algorithm("im2col")
    assert choose((8, 64, 56, 56), (64, 64, 3, 3), 1, 1) == "im2col"


def test_benchmark_mode_measures_each_shape_once(rng, restore_algorithm, monkeypatch):
    """auto + benchmark times both algorithms on the first forward of a shape, then follows the winner."""
    calls = []
    real = algorithms.measure_conv_algorithms

    def counting(*args, **kwargs):
        seconds = real(*args, **kwargs)
        assert {"im2col", "winograd"} <= set(seconds) and all(s > 0 for s in seconds.values())
        calls.append(seconds)
        faster = "winograd" if len(calls) == 1 else "im2col"
        return {name: 1.0 if name == faster else 2.0 for name in seconds}

    monkeypatch.setattr(algorithms, "measure_conv_algorithms", counting)
    nr.functional.set_conv_algorithm("auto", benchmark=True)
    x, weight, bias, _ = random_case(rng, 2, 3, 4, 6, 6, 1)
    y_ref, _ = im2col_conv.conv2d_forward(x, weight, bias, 1, 1)
    for _ in range(2):
        y, cache = algorithms.conv2d_forward(x, weight, bias, 1, 1)
        assert isinstance(cache, W.WinogradCache)          # the (pretended) faster one, measured once
        assert rel_err(y, y_ref) < 1e-12
    assert len(calls) == 1
    assert nr.functional.choose_conv_algorithm(x.shape, weight.shape, 1, 1) == "winograd"
    x2 = rng.standard_normal((2, 3, 5, 5))                  # a new shape is measured again
    _, cache = algorithms.conv2d_forward(x2, weight, bias, 1, 1)
    assert len(calls) == 2 and not isinstance(cache, W.WinogradCache)
    nr.functional.set_conv_algorithm("auto", benchmark=False)
    assert nr.functional.choose_conv_algorithm(x.shape, weight.shape, 1, 1) == "im2col"   # the rule: too small


def test_setting_and_context_manager(restore_algorithm):
    nr.functional.set_conv_algorithm("im2col")
    with nr.functional.conv_algorithm("winograd", winograd_tile=4):
        assert nr.functional.get_conv_algorithm() == "winograd" and algorithms.get_winograd_tile() == 4
    assert nr.functional.get_conv_algorithm() == "im2col" and algorithms.get_winograd_tile() == 2


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input_is_named(rng, restore_algorithm):
    with pytest.raises(ValueError, match="convolution algorithm must be one of"):
        nr.functional.set_conv_algorithm("fft")
    with pytest.raises(ValueError, match="Winograd output tile must be one of"):
        nr.functional.set_conv_algorithm("winograd", winograd_tile=3)
    with pytest.raises(TypeError, match="benchmark must be True or False"):
        nr.functional.set_conv_algorithm("auto", benchmark="yes")
    x = rng.standard_normal((1, 3, 6, 6))
    with pytest.raises(ValueError, match="3x3 kernel"):
        winograd_conv2d_forward(x, rng.standard_normal((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="stride 1, dilation 1 and groups 1"):
        winograd_conv2d_forward(x, rng.standard_normal((2, 3, 3, 3)), stride=2)
    with pytest.raises(ValueError, match="input has 3 channels but the weight expects 4"):
        winograd_conv2d_forward(x, rng.standard_normal((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="padding 0, 1 or 2"):
        winograd_conv2d_forward(x, rng.standard_normal((2, 3, 3, 3)), padding=3)
    with pytest.raises(TypeError, match="must share one dtype"):
        winograd_conv2d_forward(x.astype(np.float32), rng.standard_normal((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        winograd_conv2d_forward(rng.standard_normal((1, 3, 1, 2)), rng.standard_normal((2, 3, 3, 3)), padding=0)


# --- the CuPy code path, on the guard backend -----------------------------------------------------------


@pytest.mark.parametrize("tile", TILES)
def test_guard_backend_runs_without_host_round_trips(tile, rng):
    """The non-NumPy path (whole chunks, no threads) makes no hidden host trip and matches NumPy."""
    from numres.testing import no_transfers
    x, weight, bias, dy = random_case(rng, 2, 3, 4, 7, 6, 1)
    expected_y, cache = winograd_conv2d_forward(channels_last(x), stored_weight(weight), bias, padding=1, tile=tile)
    expected = winograd_conv2d_backward(channels_last(dy), cache)
    on_guard = [nr.backend.convert(channels_last(a) if a.ndim == 4 else a, "guard") for a in (x, dy)]
    weight_g = nr.backend.convert(stored_weight(weight), "guard")
    bias_g = nr.backend.convert(bias, "guard")
    W.kernel_matrix(nr.backend.get_xp("guard"), np.dtype("float64"), W.TRANSFORMS[tile])   # made once, outside
    W.kernel_matrix(nr.backend.get_xp("guard"), np.dtype("float64"), W.TRANSFORMS[tile], flipped=True)
    with no_transfers():
        y, cache_g = winograd_conv2d_forward(on_guard[0], weight_g, bias_g, padding=1, tile=tile)
        grads = winograd_conv2d_backward(on_guard[1], cache_g)
    for ours, ref in zip((y,) + grads, (expected_y,) + expected):
        assert rel_err(nr.backend.to_numpy(ours), ref) < 1e-12


# --- registered kernels -----------------------------------------------------------------------------


def test_registered_kernels_still_run_the_im2col_path(rng, restore_algorithm):
    """With a backend's ops (ops_for), the im2col path runs its registered conv kernel (CUDA on a GPU);
    Winograd runs where it is chosen."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append("forward")
        return im2col_conv.conv2d_forward(*args, **kwargs)

    x, weight, bias, _ = random_case(rng, 2, 3, 4, 6, 6, 1)
    nr.functional.register_kernel("numpy", "conv2d_forward", kernel)
    try:
        ops = nr.functional.ops_for("numpy")
        nr.functional.set_conv_algorithm("im2col")
        _, cache = algorithms.conv2d_forward(x, weight, bias, 1, 1, ops=ops)
        assert calls == ["forward"] and not isinstance(cache, W.WinogradCache)
        nr.functional.set_conv_algorithm("winograd")
        _, cache = algorithms.conv2d_forward(x, weight, bias, 1, 1, ops=ops)
        assert calls == ["forward"] and isinstance(cache, W.WinogradCache)
        _, cache = algorithms.conv2d_forward(x, weight, bias, 2, 1, ops=ops)      # stride 2: the kernel again
        assert calls == ["forward", "forward"]
    finally:
        nr.functional.unregister_kernel("numpy", "conv2d_forward")


# --- whole models: numres.nn.Conv2d dispatches through set_conv_algorithm -----------------------------


def test_conv2d_module_uses_the_chosen_algorithm(rng, restore_algorithm):
    conv = nr.nn.Conv2d(3, 4, 3, padding=1, dtype="float64")
    x = rng.standard_normal((2, 3, 6, 5))
    for algorithm in ("winograd", "im2col"):
        nr.functional.set_conv_algorithm(algorithm)
        conv(x)
        assert algorithms.algorithm_of(conv.saved_cache()) == algorithm
        conv.backward(rng.standard_normal((2, 4, 6, 5)))


def test_conv2d_module_gradcheck_under_winograd(rng, restore_algorithm):
    """nr.gradcheck (central differences, float64) on a Conv2d computed by Winograd F(2,3) and F(4,3)."""
    x = rng.standard_normal((2, 3, 7, 6))
    for tile in TILES:
        nr.functional.set_conv_algorithm("winograd", winograd_tile=tile)
        conv = nr.nn.Conv2d(3, 4, 3, padding=1, dtype="float64")
        conv(x)
        assert algorithms.algorithm_of(conv.saved_cache()) == "winograd"
        result = nr.gradcheck(conv, x)
        assert result.passed(1e-6), str(result)


@pytest.mark.parametrize("dtype, train", [("float64", True), ("float32", False)])
def test_resnet18_under_winograd_matches_torch(dtype, train, restore_algorithm, monkeypatch):
    """ResNet-18 with every 3x3 stride-1 layer on Winograd: logits, dL/dx, every parameter gradient and
    the BN buffers against PyTorch in float64 (1e-10 in float64, 1e-4 in float32)."""
    import torch_reference as R
    from test_resnet import assert_all_below, batch, make_pair
    calls = []
    real = algorithms.winograd_conv2d_forward
    monkeypatch.setattr(algorithms, "winograd_conv2d_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    nr.functional.set_conv_algorithm("winograd")
    model, reference = make_pair("resnet18", dtype, train, torch_dtype="float64")
    x, upstream = batch(dtype)
    errors = R.model_parity(model, reference, x, upstream)
    assert len(calls) == 13                    # every 3x3 stride-1 convolution of ResNet-18
    assert_all_below(errors, TOL[dtype])
