"""numres's CUDA kernels, checked without a GPU.

* Every CUDA source compiles with ``nvcc --ptx -arch=sm_90`` for float and double, and the PTX
  assembles with ``ptxas`` (skipped where nvcc is absent).
* Every kernel is a plain per-thread map, so the same source also builds with g++ under
  ``kernels/shim.h`` and runs on the CPU (:mod:`numres.cuda.shim`).  The kernel ops then run on
  NumPy arrays exactly as they would on CuPy ones - same wrappers, argument checks and launch
  shapes, only with few blocks so the grid-stride loops wrap - and are compared with the
  generic numres ops on random inputs with odd sizes, in float32 and float64, with the threads
  run forwards and backwards, and with every output framed by canaries that catch a write out
  of bounds (inputs are framed by NaN, so a read out of bounds shows up in the result).
* Last, the kernels are registered for the NumPy backend and whole models train through them.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import numres as nr
import numres.functional as F
from numres.cuda import activation, batchnorm, conv, loss, pooling, runtime, shim, sources
from numres.functional.dispatch import ops_for

DTYPES = ["float32", "float64"]
TOL = {"float32": 2e-5, "float64": 1e-12}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
needs_gxx = pytest.mark.skipif(shim.compiler() is None, reason="g++ not installed")


# --- nvcc --------------------------------------------------------------------------------------------

@needs_nvcc
@pytest.mark.parametrize("unit", sources.UNITS)
def test_source_compiles_with_nvcc_for_sm90(unit, tmp_path):
    source = tmp_path / unit
    source.write_text(sources.cuda_source(unit))
    ptx = tmp_path / f"{source.stem}.ptx"
    result = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings",
                             "-o", str(ptx), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {unit}:\n{result.stderr}"
    text = ptx.read_text()
    for kernel in sources.KERNELS.values():
        if kernel.unit == unit:
            for dtype in DTYPES:
                assert f".entry {kernel.entry(dtype)}(" in text, f"{kernel.entry(dtype)} missing from the PTX"
    ptxas = shutil.which("ptxas") or str(
        __import__("pathlib").Path(shutil.which("nvcc")).resolve().with_name("ptxas"))
    assembled = subprocess.run([ptxas, "-arch=sm_90", "-o", str(tmp_path / "out.cubin"), str(ptx)],
                               capture_output=True, text=True)
    assert assembled.returncode == 0, f"ptxas failed on {unit}:\n{assembled.stderr}"


def test_sources_need_no_headers():
    """CuPy compiles with NVRTC, which has no standard headers: the sources must include nothing."""
    for unit in sources.UNITS:
        assert "#include" not in sources.cuda_source(unit), unit


def test_every_kernel_has_a_generated_entry_point_per_dtype():
    for kernel in sources.KERNELS.values():
        text = sources.cuda_source(kernel.unit)
        assert f"__device__ void {kernel.name}(" in text, f"template {kernel.name} not found in {kernel.unit}"
        for dtype in DTYPES:
            assert f'extern "C" __global__ void {kernel.entry(dtype)}(' in text


# --- the shim ------------------------------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["threads-forward", "threads-reversed"])
def host(request):
    """Kernel ops accept NumPy arrays inside this fixture (g++ builds of the CUDA sources)."""
    if shim.compiler() is None:
        pytest.skip("g++ not installed")
    rt = shim.ShimRuntime(max_blocks=3, reverse=request.param)
    with runtime.use_host_runtime(rt):
        yield rt


def framed_input(array, channels_last=True):
    """``array`` as a kernel input: NaN around it in memory, channels-last if asked (4-D)."""
    if channels_last and array.ndim == 4:
        return shim.framed(np.ascontiguousarray(array.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    return shim.framed(array)


def assert_close(actual, expected, dtype, what):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values (a read out of bounds?)"
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    error = np.abs(actual - expected).max(initial=0.0) / scale
    assert error < TOL[dtype], f"{what}: relative error {error:.2e} ({dtype})"


CONV_CASES = [  # (N, C, H, W), kernel, stride, padding, dilation, groups
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 5, 6), (3, 3), (2, 2), (1, 1), (1, 1), 2),
    ((3, 5, 9, 7), (7, 7), (2, 2), (3, 3), (1, 1), 1),
    ((2, 6, 8, 5), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    ((2, 6, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1), 3),
    ((1, 6, 9, 10), (2, 3), (2, 1), (1, 0), (2, 1), 3),
    ((2, 33, 3, 3), (3, 3), (1, 1), (1, 1), (1, 1), 1),      # more channels than a warp
    ((1, 2, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, groups", CONV_CASES)
def test_im2col_and_col2im_kernels_equal_the_generic_ops(host, rng, dtype, shape, kernel, stride, padding, dilation,
                                                         groups):
    values = rng.standard_normal(shape).astype(dtype)
    for channels_last in (True, False):
        x = framed_input(values, channels_last)
        cols, out_hw = conv.im2col(x, kernel, stride, padding, dilation, groups)
        expected, expected_hw = F.im2col(values, kernel, stride, padding, dilation, groups)
        assert out_hw == expected_hw
        np.testing.assert_array_equal(cols, expected)
    dcols = framed_input(rng.standard_normal(expected.shape).astype(dtype))
    dx = conv.col2im(dcols, shape, kernel, stride, padding, dilation, out_hw, groups)
    # Gather in the generic op's tap order: bit-identical, not merely close.
    np.testing.assert_array_equal(dx, F.col2im(np.array(dcols), shape, kernel, stride, padding, dilation, out_hw,
                                               groups))
    assert dx.transpose(0, 2, 3, 1).flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, groups", CONV_CASES[:6])
def test_conv2d_kernel_path_matches_generic(host, rng, dtype, shape, kernel, stride, padding, dilation, groups):
    values = rng.standard_normal(shape).astype(dtype)
    out_channels = 2 * groups
    weight = rng.standard_normal((out_channels, shape[1] // groups, *kernel)).astype(dtype)
    bias = rng.standard_normal(out_channels).astype(dtype)
    y, cache = conv.conv2d_forward(framed_input(values), weight, bias, stride, padding, dilation, groups)
    y_ref, cache_ref = F.conv2d_forward(values, weight, bias, stride, padding, dilation, groups)
    assert_close(y, y_ref, dtype, "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    for need_input_grad in (True, False):
        got = conv.conv2d_backward(framed_input(dy, channels_last=False), cache, need_input_grad)
        want = F.conv2d_backward(dy, cache_ref, need_input_grad)
        for name, a, b in zip(("dx", "dweight", "dbias"), got, want):
            if b is None:
                assert a is None, name
            else:
                assert_close(a, b, dtype, name)


def _bn_reference(x, weight, bias, eps, relu):
    """BatchNorm in float64 straight from the definition (independent of numres)."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    y = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + eps) * weight[:, None, None] + bias[:, None, None]
    return (np.maximum(y, 0) if relu else y), mean, var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 40, 3, 1), (4, 3, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_kernels_match_generic(host, rng, dtype, shape, relu, affine):
    c = shape[1]
    values = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    weight = rng.uniform(0.5, 2, c).astype(dtype) if affine else None
    bias = rng.standard_normal(c).astype(dtype) if affine else None
    stats = [rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)]
    mine, ref = [s.copy() for s in stats], [s.copy() for s in stats]
    y, cache = batchnorm.batchnorm_train_forward(framed_input(values), weight, bias, *mine, 0.1, 1e-5, relu)
    y_ref, cache_ref = F.batchnorm_train_forward(values, weight, bias, *ref, 0.1, 1e-5, relu)
    assert_close(y, y_ref, dtype, "y")
    assert_close(mine[0], ref[0], dtype, "running_mean")
    assert_close(mine[1], ref[1], dtype, "running_var")
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    dy = rng.standard_normal(shape).astype(dtype)
    got = batchnorm.batchnorm_backward(framed_input(dy, channels_last=False), cache)
    want = F.batchnorm_backward(dy, cache_ref)
    for name, a, b in zip(("dx", "dweight", "dbias"), got, want):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, dtype, name)
    # Evaluation mode, with the running statistics just updated.
    y, cache = batchnorm.batchnorm_eval_forward(framed_input(values), weight, bias, *mine, 1e-5, relu)
    y_ref, cache_ref = F.batchnorm_eval_forward(values, weight, bias, *ref, 1e-5, relu)
    assert_close(y, y_ref, dtype, "eval y")
    for name, a, b in zip(("eval dx", "eval dweight", "eval dbias"), batchnorm.batchnorm_backward(dy, cache),
                          F.batchnorm_backward(dy, cache_ref)):
        if b is not None:
            assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_statistics_survive_a_large_mean(host, rng, dtype):
    """One-pass variance of data with mean 1e4 and std 1: shifted sums keep it accurate."""
    shape = (4, 3, 5, 5)
    values = (1e4 + rng.standard_normal(shape)).astype(dtype)
    weight, bias = np.ones(3, dtype), np.zeros(3, dtype)
    running = [np.zeros(3, dtype), np.ones(3, dtype)]
    y, _ = batchnorm.batchnorm_train_forward(framed_input(values), weight, bias, *running, 1.0, 1e-5, False)
    y_ref, mean, var = _bn_reference(values, weight, bias, 1e-5, relu=False)
    count = values.size // 3
    tolerance = {"float32": 1e-3, "float64": 1e-10}[dtype]      # float32 input carries ~1e-3 absolute noise
    assert np.abs(y - y_ref).max() < tolerance
    np.testing.assert_allclose(running[1], var * count / (count - 1), rtol=tolerance)


def test_batchnorm_momentum_may_live_on_the_device(host, rng):
    """PyTorch's momentum=None uses 1/num_batches_tracked, a device scalar: read in the kernel."""
    values = rng.standard_normal((2, 4, 3, 3))
    mine, ref = [np.zeros(4), np.ones(4)], [np.zeros(4), np.ones(4)]
    batchnorm.batchnorm_train_forward(framed_input(values), None, None, *mine, np.asarray(1.0 / 3.0), 1e-5)
    F.batchnorm_train_forward(values, None, None, *ref, 1.0 / 3.0, 1e-5)
    np.testing.assert_allclose(mine[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(mine[1], ref[1], rtol=1e-12)


POOL_CASES = [  # shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 3, 7, 9), 3, 2, 1, 1, False),
    ((1, 33, 6, 5), 2, 2, 0, 1, True),
    ((2, 4, 9, 8), 3, 1, 1, 2, True),
    ((1, 2, 5, 5), (3, 2), (2, 1), (1, 0), 1, False),
    ((1, 1, 1, 1), 1, 1, 0, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, ceil_mode", POOL_CASES)
def test_maxpool_kernels_equal_the_generic_ops(host, rng, dtype, shape, kernel, stride, padding, dilation, ceil_mode):
    for values in (rng.standard_normal(shape).astype(dtype),
                   rng.integers(-2, 3, shape).astype(dtype)):        # many ties: the first maximum wins
        y, cache = pooling.maxpool2d_forward(framed_input(values), kernel, stride, padding, dilation, ceil_mode)
        y_ref, cache_ref = F.maxpool2d_forward(values, kernel, stride, padding, dilation, ceil_mode)
        np.testing.assert_array_equal(y, y_ref)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = pooling.maxpool2d_backward(framed_input(dy, channels_last=False), cache)
        np.testing.assert_array_equal(dx, F.maxpool2d_backward(dy, cache_ref))


def test_maxpool_propagates_nan(host):
    values = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    values[0, 0, 1, 1] = np.nan
    y, _ = pooling.maxpool2d_forward(framed_input(values), 2, 2)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("rows, classes", [(5, 7), (1, 1000), (33, 2)])
def test_cross_entropy_kernels_match_generic(host, rng, dtype, reduction, smoothing, rows, classes):
    logits = (rng.standard_normal((rows, classes)) * 5).astype(dtype)
    target = rng.integers(0, classes, rows)
    value, cache = loss.cross_entropy_forward(framed_input(logits), target, reduction, smoothing)
    value_ref, cache_ref = F.cross_entropy_forward(logits, target, reduction, smoothing)
    assert_close(value, value_ref, dtype, "loss")
    upstream = [1.0, 0.37, np.asarray(0.37, dtype=dtype)] if reduction != "none" else \
        [rng.standard_normal(rows).astype(dtype)]
    for dloss in upstream:
        assert_close(loss.cross_entropy_backward(dloss, cache), F.cross_entropy_backward(dloss, cache_ref), dtype,
                     "dlogits")


def test_cross_entropy_kernel_marks_a_bad_target_with_nan(host, rng):
    logits = rng.standard_normal((3, 4))
    value, cache = loss.cross_entropy_forward(framed_input(logits), np.array([0, 4, 1]), "none")
    assert np.isnan(value[1]) and np.isfinite(value[[0, 2]]).all()
    dlogits = loss.cross_entropy_backward(np.ones(3), cache)
    assert np.isnan(dlogits[1]).all() and np.isfinite(dlogits[[0, 2]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 40), (7,)])
def test_activation_kernels_equal_the_generic_ops(host, rng, dtype, shape):
    a = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype)
    a.reshape(-1)[:3] = [0.0, -0.0, np.nan]
    y, _ = activation.relu_forward(framed_input(a))
    np.testing.assert_array_equal(y, F.relu_forward(a)[0])
    np.testing.assert_array_equal(activation.relu_backward(framed_input(b), y), F.relu_backward(b, y))
    np.testing.assert_array_equal(activation.add_relu_forward(framed_input(a), framed_input(b)),
                                  F.add_relu_forward(a.copy(), b))
    np.testing.assert_array_equal(activation.add(framed_input(a), framed_input(b)), F.add(a, b))


def test_launcher_rejects_mismatched_arguments(host):
    x = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="argument y must have dtype float32, got float64"):
        host.launch("relu_forward_rows", np.float32, 2, 3, (x, 2, 3, np.zeros((2, 3))))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        host.launch("relu_forward_rows", np.float32, 2, 3, (x, 2, 3))
    with pytest.raises(ValueError, match="does not fit a 32-bit int"):
        host.launch("relu_forward_rows", np.float32, 2, 3, (x, 2**40, 3, x))


def test_launch_shapes_cover_the_problem_and_respect_the_budget():
    for rows, cols, budget in [(1, 1, 4), (401408, 64, 4224), (7, 1000, 3), (100, 3, 2), (1, 4608, 132)]:
        grid, block = runtime.map_shape(rows, cols, budget)
        assert block[0] * block[1] <= 256 and grid[0] * grid[1] <= max(budget, 1)
        assert grid[0] >= 1 and grid[1] >= 1


# --- whole models through the kernels -------------------------------------------------------------------

def _train(builder, x, target):
    nr.manual_seed(11)
    model = builder(num_classes=10, dtype="float64")
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, dtype="float64")
    opt = nr.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = crit(model(x), target)
        model.backward(crit.backward())
        opt.step()
        losses.append(float(loss))
    return np.array(losses), model


def _bottleneck_resnet(**kwargs):
    """ResNet-50's blocks, one per stage (1x1 reduce, strided 3x3, 1x1 expand, projection shortcut)."""
    return nr.ResNet(nr.Bottleneck, [1, 1, 1, 1], **kwargs)


@pytest.mark.parametrize("builder", [nr.resnet18, _bottleneck_resnet])
def test_resnets_train_through_the_kernels_like_the_generic_path(builder, rng):
    # 40x40 leaves 2x2 pixels in layer4, so its BatchNorms see 8 values per channel: with fewer,
    # BN's gradient is ill-conditioned and two correct float64 paths drift apart by ~1e-8.
    x = np.ascontiguousarray(rng.standard_normal((2, 40, 40, 3))).transpose(0, 3, 1, 2)
    target = np.array([1, 9])
    losses_ref, reference = _train(builder, x, target)
    import numres.cuda as cuda
    rt = shim.ShimRuntime(max_blocks=8, block_threads=4)
    with runtime.use_host_runtime(rt):
        try:
            cuda.register_kernels("numpy")
            assert ops_for("numpy").conv2d_forward is conv.conv2d_forward
            losses, model = _train(builder, x, target)
        finally:
            cuda.unregister_kernels("numpy")
    assert ops_for("numpy").conv2d_forward is F.conv2d_forward
    used = {entry.rsplit("_", 1)[0] for entry, _, _ in rt.launches}
    assert {"im2col_nhwc", "col2im_nhwc", "bn_apply", "bn_backward_dx", "maxpool_forward_nhwc",
            "maxpool_backward_nhwc", "softmax_xent_forward", "softmax_xent_backward"} <= used
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-11)
    state = model.state_dict()
    for name, value in reference.state_dict().items():
        np.testing.assert_allclose(state[name], value, rtol=0, atol=1e-10 * np.abs(value).max(), err_msg=name)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=0, atol=1e-10 * np.abs(q.grad).max(), err_msg=name)


# --- the generic op stands in when a call asks for more than a kernel does ------------------------------

def test_every_registered_kernel_falls_back_to_its_generic_op():
    import numres.cuda as cuda
    for name, function in cuda.kernel_functions().items():
        assert function.generic is getattr(F, name), name


def _fake_pair():
    """A generic op with a keyword its kernel lacks, and that kernel, recording which one ran."""
    from numres.cuda.fallback import kernel_op
    calls = []

    def generic_op(x, scale=1.0, ignore_index=-100, weight=None, **options):
        calls.append(("generic", ignore_index, weight, options))
        return x * scale

    @kernel_op(generic_op, usable=lambda x, *args, **kwargs: x.size > 0)
    def kernel_op_version(x, scale=1.0):
        calls.append(("kernel",))
        return x * scale

    class KernelCache(tuple):
        pass

    def generic_backward(dy, cache, need_input_grad=True, keep=False):
        calls.append(("generic backward",))
        return dy

    @kernel_op(generic_backward, cache_type=KernelCache)
    def kernel_backward(dy, cache, need_input_grad=True):
        calls.append(("kernel backward",))
        return dy

    return calls, kernel_op_version, kernel_backward, KernelCache


def test_a_call_the_kernel_supports_runs_the_kernel():
    calls, forward, _, _ = _fake_pair()
    x = np.ones(3)
    forward(x)
    forward(x, 2.0)
    forward(x, scale=2.0)
    forward(x, ignore_index=-100, weight=None)         # the generic defaults, spelled out
    assert calls == [("kernel",)] * 4


@pytest.mark.parametrize("extra", [{"ignore_index": 3}, {"weight": np.ones(3)}, {"ignore_index": -100.5},
                                   {"label_smoothing_mode": "x"}])
def test_a_call_with_an_argument_the_kernel_lacks_runs_the_generic_op(extra):
    calls, forward, _, _ = _fake_pair()
    np.testing.assert_array_equal(forward(np.ones(3), 2.0, **extra), np.full(3, 2.0))
    assert calls[0][0] == "generic" and len(calls) == 1


def test_an_argument_neither_op_knows_gets_the_generic_ops_error():
    _, forward, _, _ = _fake_pair()
    with pytest.raises(TypeError):
        forward(np.ones(3), 1.0, -100, None, "one too many")


def test_an_input_the_kernel_cannot_take_runs_the_generic_op():
    calls, forward, _, _ = _fake_pair()
    forward(np.ones(0))
    assert calls[0][0] == "generic"


def test_backward_follows_the_cache_its_forward_made():
    calls, _, backward, KernelCache = _fake_pair()
    dy = np.ones(2)
    backward(dy, ("generic cache",), keep=True)         # a generic cache: the generic backward, any arguments
    backward(dy, KernelCache(), need_input_grad=False)
    backward(dy, KernelCache(), keep=False)             # the generic default: fine
    assert calls == [("generic backward",), ("kernel backward",), ("kernel backward",)]
    with pytest.raises(TypeError, match=r"kernel's backward does not take \['keep'\]"):
        backward(dy, KernelCache(), keep=True)


def _no_launch(host, function, *args, **kwargs):
    """Run ``function`` and check that it launched no kernel (the generic op ran)."""
    before = len(host.launches)
    result = function(*args, **kwargs)
    assert len(host.launches) == before, f"{function.__name__} launched a kernel"
    return result


def _same_outcome(kernel_call, generic_call):
    """Both raise the same kind of error, or both return equal arrays (while other work teaches the generic
    ops empty batches, the generic op's outcome, whatever it is, is the standard)."""
    try:
        expected = generic_call()
    except Exception as error:      # noqa: BLE001 - the kernel wrapper must do exactly what the generic op does
        with pytest.raises(type(error)):
            kernel_call()
        return
    got = kernel_call()
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else
                    (expected,)):
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b)


def test_an_empty_batch_goes_to_the_generic_ops(host, rng):
    x = np.zeros((0, 4, 5, 5))
    w = rng.standard_normal((3, 4, 3, 3))
    _same_outcome(lambda: _no_launch(host, conv.conv2d_forward, x, w, None, 1, 1)[0],
                  lambda: F.conv2d_forward(x, w, None, 1, 1)[0])
    _same_outcome(lambda: _no_launch(host, pooling.maxpool2d_forward, x, 3, 2, 1)[0],
                  lambda: F.maxpool2d_forward(x, 3, 2, 1)[0])
    _same_outcome(lambda: _no_launch(host, batchnorm.batchnorm_eval_forward, x, None, None, np.zeros(4),
                                     np.ones(4))[0],
                  lambda: F.batchnorm_eval_forward(x, None, None, np.zeros(4), np.ones(4))[0])
    _same_outcome(lambda: _no_launch(host, batchnorm.batchnorm_train_forward, x, None, None, np.zeros(4),
                                     np.ones(4))[0],
                  lambda: F.batchnorm_train_forward(x, None, None, np.zeros(4), np.ones(4))[0])
    _same_outcome(lambda: _no_launch(host, activation.relu_forward, x)[0], lambda: F.relu_forward(x)[0])
    _same_outcome(lambda: _no_launch(host, loss.cross_entropy_forward, np.zeros((0, 5)), np.zeros(0, int),
                                     "sum")[0],
                  lambda: F.cross_entropy_forward(np.zeros((0, 5)), np.zeros(0, int), "sum")[0])


def test_batchnorm_with_weight_but_no_bias_goes_to_the_generic_op(host, rng):
    x = rng.standard_normal((2, 3, 4, 4))
    weight = rng.uniform(0.5, 2, 3)
    mine, theirs = [np.zeros(3), np.ones(3)], [np.zeros(3), np.ones(3)]
    _same_outcome(lambda: _no_launch(host, batchnorm.batchnorm_train_forward, x, weight, None, *mine)[0],
                  lambda: F.batchnorm_train_forward(x, weight, None, *theirs)[0])


def test_soft_targets_go_to_the_generic_loss(host, rng):
    logits = rng.standard_normal((4, 5))
    probabilities = rng.dirichlet(np.ones(5), 4)
    _same_outcome(lambda: _no_launch(host, loss.cross_entropy_forward, logits, probabilities)[0],
                  lambda: F.cross_entropy_forward(logits, probabilities)[0])


@pytest.mark.parametrize("need_input_grad", [True, False])
def test_conv_kernel_skips_the_weight_gradient_when_asked(host, rng, need_input_grad):
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    y, cache = conv.conv2d_forward(framed_input(x), w, None, 2, 1)
    y_ref, cache_ref = F.conv2d_forward(x, w, None, 2, 1)
    dy = rng.standard_normal(y.shape)
    before = len(host.launches)
    dx, dweight, dbias = conv.conv2d_backward(dy, cache, need_input_grad=need_input_grad, need_weight_grad=False)
    assert dweight is None and dbias is None
    launched = {entry for entry, _, _ in host.launches[before:]}
    assert "im2col_nhwc_f64" not in launched                   # the patches are not rebuilt for a skipped dW
    if need_input_grad:
        assert_close(dx, F.conv2d_backward(dy, cache_ref)[0], "float64", "dx")
    else:
        assert dx is None


# --- block kernels: shared memory and __syncthreads on the CPU ------------------------------------------

_BARRIER_PROBE = r"""
// Thread t writes slot t, waits at the barrier, then reads its neighbour's slot: correct only if
// every thread of the block has written before any reads.
__device__ void neighbour_sum(const double* in, double* out)
{
    __shared__ double slot[64];
    const unsigned t = threadIdx.x;
    slot[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = slot[t] + slot[(t + 1) % blockDim.x];
}

// Thread 0 returns early: the others wait at a barrier it never reaches (undefined on a GPU).
__device__ void divergent(double* out)
{
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0;
}

extern "C" void run_neighbour_sum(unsigned blocks, unsigned threads, const double* in, double* out)
{ NUMRES_SHIM_RUN_BLOCKS((numres_dim3{blocks, 1, 1}), (numres_dim3{threads, 1, 1}), neighbour_sum(in, out)); }
extern "C" void run_divergent(unsigned threads, double* out)
{ NUMRES_SHIM_RUN_BLOCKS((numres_dim3{1, 1, 1}), (numres_dim3{threads, 1, 1}), divergent(out)); }
extern "C" void run_barrier_in_a_map(double* out)
{ NUMRES_SHIM_RUN_GRID((numres_dim3{1, 1, 1}), (numres_dim3{2, 1, 1}), neighbour_sum(out, out)); }
"""


@pytest.fixture(scope="module")
def barrier_probe():
    if shim.compiler() is None:
        pytest.skip("g++ not installed")
    import ctypes
    library = shim.build_text(sources.read(sources.SHIM_HEADER) + _BARRIER_PROBE, "barrier-probe")
    pointer = ctypes.c_void_p
    library.run_neighbour_sum.argtypes = [ctypes.c_uint, ctypes.c_uint, pointer, pointer]
    library.run_divergent.argtypes = [ctypes.c_uint, pointer]
    library.run_barrier_in_a_map.argtypes = [pointer]
    return library


@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("blocks, threads", [(1, 1), (3, 7), (2, 64)])
def test_the_shim_honours_syncthreads_and_shared_memory(barrier_probe, rng, reverse, blocks, threads):
    values = rng.standard_normal((blocks, threads))
    out = np.full_like(values, np.nan)
    barrier_probe.numres_shim_set_order(reverse)
    barrier_probe.run_neighbour_sum(blocks, threads, values.ctypes.data, out.ctypes.data)
    barrier_probe.numres_shim_set_order(0)
    assert barrier_probe.numres_shim_take_error() == 0
    np.testing.assert_array_equal(out, values + np.roll(values, -1, axis=1))


def test_the_shim_reports_a_divergent_barrier(barrier_probe):
    out = np.zeros(4)
    barrier_probe.run_divergent(4, out.ctypes.data)
    assert barrier_probe.numres_shim_take_error() == 1
    barrier_probe.run_barrier_in_a_map(out.ctypes.data)
    assert barrier_probe.numres_shim_take_error() == 2
    assert barrier_probe.numres_shim_take_error() == 0          # taking the error clears it


def test_block_launch_shapes():
    assert runtime.block_shape(64, 2048, 4224) == ((64, 1, 1), (256, 1, 1))
    assert runtime.block_shape(2048, 3, 100) == ((100, 1, 1), (4, 1, 1))
    assert runtime.block_shape(5, 1, 3) == ((3, 1, 1), (1, 1, 1))
    assert runtime.block_shape(5, 100, 3, max_threads=48) == ((3, 1, 1), (32, 1, 1))
    assert sources.KERNELS["bn_finalize_moments"].layout == sources.KERNELS["bn_backward_finalize"].layout == "block"
    assert f"#define NUMRES_BLOCK_THREADS {runtime.BLOCK_THREADS}" in sources.read(sources.COMMON_HEADER)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("max_blocks, block_threads", [(1, 1), (3, 4), (5, 256)])
def test_batchnorm_finalize_blocks_match_generic(rng, reverse, max_blocks, block_threads):
    """The block-per-channel tree reductions, with blocks wrapping over channels (max_blocks < C) and
    threads wrapping over lanes (block_threads < lanes), against the generic op in float64."""
    if shim.compiler() is None:
        pytest.skip("g++ not installed")
    shape = (3, 11, 7, 5)
    values = (rng.standard_normal(shape) * 2 + 3)
    weight, bias = rng.uniform(0.5, 2, 11), rng.standard_normal(11)
    mine, ref = [np.zeros(11), np.ones(11)], [np.zeros(11), np.ones(11)]

    class FewFinalizeBlocks(shim.ShimRuntime):
        """Many lanes for the partial sums, but only ``max_blocks`` blocks for the block kernels."""

        def launch(self, name, dtype, rows, cols, args, max_blocks=None):
            if sources.KERNELS[name].layout == "block":
                max_blocks = finalize_blocks
            return super().launch(name, dtype, rows, cols, args, max_blocks)

    finalize_blocks = max_blocks
    rt = FewFinalizeBlocks(max_blocks=64, reverse=reverse, block_threads=block_threads)
    lanes = batchnorm._lanes(rt, 3 * 7 * 5, 11)
    with runtime.use_host_runtime(rt):
        y, cache = batchnorm.batchnorm_train_forward(framed_input(values), weight, bias, *mine, 0.1, 1e-5, True)
        dy = rng.standard_normal(shape)
        got = batchnorm.batchnorm_backward(framed_input(dy, channels_last=False), cache)
    y_ref, cache_ref = F.batchnorm_train_forward(values, weight, bias, *ref, 0.1, 1e-5, True)
    finalize = [(grid, block) for entry, grid, block in rt.launches if "finalize" in entry]
    assert finalize == [((min(max_blocks, 11), 1, 1), (min(block_threads, runtime._pow2_at_least(lanes)), 1, 1))] * 2
    assert lanes > 4
    assert_close(y, y_ref, "float64", "y")
    assert_close(mine[0], ref[0], "float64", "running_mean")
    assert_close(mine[1], ref[1], "float64", "running_var")
    for name, a, b in zip(("dx", "dweight", "dbias"), got, F.batchnorm_backward(dy, cache_ref)):
        assert_close(a, b, "float64", name)


# --- scripts/gpu_probe.py: what it says is missing ------------------------------------------------------

def _load_probe():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_probe.py"
    spec = importlib.util.spec_from_file_location("numres_gpu_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_cupy(failures, driver=13000):
    """A stand-in for CuPy on NumPy arrays: its RawModule runs numres's kernels through the g++ shim;
    ``failures`` maps a function name to the exception it raises instead."""
    import types

    def maybe_fail(name, function):
        def call(*args, **kwargs):
            if name in failures:
                raise failures[name]
            return function(*args, **kwargs)
        return call

    class RawModule:
        def __init__(self, code, options=()):
            if "RawModule" in failures:
                raise failures["RawModule"]
            self.unit = next(unit for unit in sources.UNITS if sources.cuda_source(unit) == code)
            assert "-std=c++17" in options

        def get_function(self, entry):
            name, suffix = entry.rsplit("_", 1)
            kernel = sources.KERNELS[name]
            assert kernel.unit == self.unit
            dtype = {"f32": np.float32, "f64": np.float64}[suffix]
            return lambda grid, block, args: shim.ShimRuntime(canaries=False)._run(kernel, dtype, grid, block, args)

    properties = {"name": b"Fake H200", "totalGlobalMem": 2**37, "multiProcessorCount": 132}
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda device: properties,
                                      runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: driver),
        Device=lambda: types.SimpleNamespace(id=0, compute_capability="90"),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)))
    return types.SimpleNamespace(
        __version__="14.2.0-fake", cuda=cuda, float32=np.float32, RawModule=RawModule,
        asarray=lambda a, dtype=None: np.asarray(a, dtype=dtype), asnumpy=np.asarray, empty=np.empty,
        matmul=maybe_fail("matmul", np.matmul), arange=maybe_fail("arange", np.arange))


@pytest.mark.parametrize("failure, step, component", [
    (None, None, None),
    ({"matmul": RuntimeError("libcublas.so.13: cannot open shared object file: No such file or directory")},
     "cuBLAS GEMM", "cuBLAS"),
    ({"RawModule": RuntimeError("nvrtc: libnvrtc.so.13: cannot open shared object file")},
     "RawModule compile", "NVRTC"),
    ({"arange": RuntimeError('catastrophic error: cannot open source file "cuda_fp16.h"')},
     "CuPy runtime kernels", "CUDA headers"),
    ("old driver", "device", "driver"),
])
def test_the_gpu_probe_names_what_is_missing(monkeypatch, failure, step, component):
    import sys
    if shim.compiler() is None:
        pytest.skip("g++ not installed")
    probe = _load_probe()
    fake = _fake_cupy({} if failure in (None, "old driver") else failure,
                      driver=12080 if failure == "old driver" else 13000)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    report = probe.probe()
    steps = report["steps"]
    if step is None:       # everything but torch works (torch here is a CPU build)
        assert all(steps[name]["ok"] for name in ("device", "cuBLAS GEMM", "CuPy runtime kernels",
                                                  "RawModule compile")), steps
        assert report["card"] == "Fake H200" and report["cuda_runtime_version"] == 13000
    else:
        assert not steps[step]["ok"] and component in steps[step]["missing"], steps[step]
        assert not report["ok"]
    import torch
    assert steps["torch CUDA"]["ok"] is torch.cuda.is_available()


def test_the_gpu_probe_without_cupy_says_so(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)         # import cupy raises ImportError
    report = _load_probe().probe()
    assert not report["ok"] and "CuPy" in report["steps"]["import cupy"]["missing"]


def test_gpu_check_script_is_valid_bash():
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    # The H200 image has no network: where CuPy, CUDA torch and pytest import, nothing is installed.
    assert 'import cupy, torch, pytest; assert torch.cuda.is_available()' in text
    assert "PYTHONPATH" in text and "--time-budget" in text


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_kernel_ignores_targets_like_the_generic_op(host, rng, dtype, reduction, ignore_index):
    logits = (rng.standard_normal((9, 6)) * 3).astype(dtype)
    target = rng.integers(0, 6, 9)
    target[[1, 4, 5]] = ignore_index
    value, cache = loss.cross_entropy_forward(framed_input(logits), target, reduction, 0.2, ignore_index=ignore_index)
    value_ref, cache_ref = F.cross_entropy_forward(logits, target, reduction, 0.2, ignore_index=ignore_index)
    assert_close(value, value_ref, dtype, "loss")
    assert any(entry.startswith("softmax_xent_forward") for entry, _, _ in host.launches)
    dloss = rng.standard_normal(9).astype(dtype) if reduction == "none" else np.asarray(0.6, dtype=dtype)
    for upstream in ([dloss] if reduction == "none" else [dloss, 0.6]):
        dlogits = loss.cross_entropy_backward(upstream, cache)
        assert_close(dlogits, F.cross_entropy_backward(upstream, cache_ref), dtype, "dlogits")
        assert not dlogits[[1, 4, 5]].any()


def test_cross_entropy_kernel_mean_over_no_counted_row_is_nan(host, rng):
    logits = rng.standard_normal((3, 4))
    target = np.full(3, -100)
    value, cache = loss.cross_entropy_forward(framed_input(logits), target)
    value_ref, _ = F.cross_entropy_forward(logits, target)
    assert np.isnan(value) and np.isnan(value_ref)


def test_kernels_take_the_frozen_and_weighted_variants(host, rng):
    """need_param_grads=False (BN), need_bias_grad (conv), class weights (loss: the generic op)."""
    x = rng.standard_normal((2, 3, 5, 4))
    weight, bias = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    y, cache = batchnorm.batchnorm_train_forward(framed_input(x), weight, bias, None, None)
    y_ref, cache_ref = F.batchnorm_train_forward(x, weight, bias, None, None)
    dy = rng.standard_normal(x.shape)
    dx, dweight, dbias = batchnorm.batchnorm_backward(dy, cache, need_param_grads=False)
    assert dweight is None and dbias is None
    assert_close(dx, F.batchnorm_backward(dy, cache_ref)[0], "float64", "bn dx")
    w = rng.standard_normal((4, 3, 3, 3))
    conv_bias = rng.standard_normal(4)
    y, cache = conv.conv2d_forward(framed_input(x), w, conv_bias, 1, 1)
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = conv.conv2d_backward(dy, cache, need_weight_grad=False, need_bias_grad=True)
    assert dweight is None
    assert_close(dbias, dy.sum(axis=(0, 2, 3)), "float64", "conv dbias")
    assert conv.conv2d_backward(dy, cache, need_weight_grad=False)[2] is None
    logits, target = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    class_weight = rng.uniform(0.5, 2, 4)
    value = _no_launch(host, loss.cross_entropy_forward, logits, target, weight=class_weight)[0]
    assert_close(value, F.cross_entropy_forward(logits, target, weight=class_weight)[0], "float64", "weighted loss")


def test_conv_kernel_leaves_same_padding_and_padding_modes_to_the_generic_op(host, rng):
    x = rng.standard_normal((1, 2, 6, 5))
    w = rng.standard_normal((3, 2, 2, 3))
    for padding, options in (("same", {}), ((1, 1), {"padding_mode": "reflect"})):
        y = _no_launch(host, conv.conv2d_forward, x, w, None, 1, padding, 1, 1, **options)[0]
        np.testing.assert_array_equal(y, F.conv2d_forward(x, w, None, 1, padding, 1, 1, **options)[0])
