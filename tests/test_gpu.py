"""GPU-only checks of the CuPy backend (skipped cleanly without CuPy or a CUDA GPU).

Run them, with the rest of the suite over both backends, with ``scripts/gpu_check.sh``.

* every numres CUDA kernel against the generic op it replaces, on the same device input
  (random, odd sizes, float32 and float64): the generic code runs on CuPy too, so this isolates
  the kernel;
  (the BatchNorm finalize kernels, a block per channel with a shared-memory tree, with up to 2048
  lanes per channel);
* the kernel wrappers hand calls they do not support (empty batch, a frozen weight) to the generic op;
* every layer, on CuPy, against ``torch.nn`` on CUDA in **float64** (the truth): float64 results to
  1e-10, float32 results (same weights and inputs, rounded to float32) to 1e-4; TF32 off;
* ResNet-50 forward/backward against the torchvision-structured reference on CUDA: float64 to
  1e-10; float32 (train and eval) measured against the float64 reference, and required to be about
  as accurate as torch's own float32 on cuDNN (a float32-vs-float32 comparison would fail on a
  single ReLU mask that cuBLAS and cuDNN round to different sides of zero);
* a training step makes no host round-trip (CuPy's own synchronisation detector) and reuses the
  memory pool; the TF32 switch does what it says.

Written for the GPU image the project uses (torch 2.11 with CUDA, CuPy 14): nothing here needs a
newer torch than that.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import numres as nr

cupy = pytest.importorskip("cupy")
if not nr.backend.is_available("cupy"):
    pytest.skip("CuPy is installed but no CUDA GPU is usable", allow_module_level=True)
torch = pytest.importorskip("torch")
# The kernel-vs-generic checks need only CuPy; the comparisons with PyTorch also need a CUDA build of it.
TORCH_CUDA = torch.cuda.is_available()
needs_torch_cuda = pytest.mark.skipif(not TORCH_CUDA, reason="PyTorch has no CUDA device here (a CPU-only build?)")

import numres.cuda as cuda                                            # noqa: E402
import numres.functional as F                                         # noqa: E402
import torch_reference as ref                                         # noqa: E402
from error_measure import worst as worst_error                        # noqa: E402
from numres.cuda import activation, batchnorm, conv, loss, pooling   # noqa: E402
from test_cuda_sources import CONV_CASES, POOL_CASES                 # noqa: E402

pytestmark = pytest.mark.gpu
DTYPES = ["float32", "float64"]
TOL = {"float64": 1e-10, "float32": 1e-4}
KERNEL_TOL = {"float64": 1e-12, "float32": 2e-5}
DEVICE = torch.device("cuda") if TORCH_CUDA else None


@pytest.fixture(autouse=True)
def full_precision():
    """TF32 off on both sides for every parity check (restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.tf32_enabled())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda.set_tf32(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    cuda.set_tf32(saved[2])


def on_gpu(array, channels_last=True):
    array = np.asarray(array)
    if channels_last and array.ndim == 4:
        array = np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return nr.backend.convert(array, "cupy")


def host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return nr.to_numpy(value)


def assert_close(actual, expected, limit, what):
    error = ref.rel_err(host(actual), host(expected))
    assert error < limit, f"{what}: relative error {error:.2e} exceeds {limit:.0e}"


# --- kernels against the generic ops, both on the GPU ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, groups", CONV_CASES)
def test_conv_kernels_match_generic_on_gpu(rng, dtype, shape, kernel, stride, padding, dilation, groups):
    x = on_gpu(rng.standard_normal(shape).astype(dtype))
    cols, out_hw = conv.im2col(x, kernel, stride, padding, dilation, groups)
    expected, _ = F.im2col(x, kernel, stride, padding, dilation, groups)
    np.testing.assert_array_equal(host(cols), host(expected))
    dcols = cupy.asarray(rng.standard_normal(expected.shape).astype(dtype))
    np.testing.assert_array_equal(host(conv.col2im(dcols, shape, kernel, stride, padding, dilation, out_hw, groups)),
                                  host(F.col2im(dcols, shape, kernel, stride, padding, dilation, out_hw, groups)))
    weight = on_gpu(rng.standard_normal((2 * groups, shape[1] // groups, *kernel)).astype(dtype))
    bias = cupy.asarray(rng.standard_normal(2 * groups).astype(dtype))
    y, cache = conv.conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
    y_ref, cache_ref = F.conv2d_forward(x, weight, bias, stride, padding, dilation, groups)
    assert_close(y, y_ref, KERNEL_TOL[dtype], "conv y")
    dy = on_gpu(rng.standard_normal(y.shape).astype(dtype), channels_last=False)
    for name, a, b in zip(("dx", "dw", "db"), conv.conv2d_backward(dy, cache), F.conv2d_backward(dy, cache_ref)):
        assert_close(a, b, KERNEL_TOL[dtype], f"conv {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 40, 3, 1), (8, 64, 17, 17), (3, 2048, 1, 1),
                                   (16, 64, 56, 56), (32, 2048, 7, 7)])
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_kernels_match_generic_on_gpu(rng, dtype, shape, relu):
    c = shape[1]
    x = on_gpu((rng.standard_normal(shape) * 2 + 3).astype(dtype))
    weight, bias = (cupy.asarray(v.astype(dtype)) for v in (rng.uniform(0.5, 2, c), rng.standard_normal(c)))
    stats = [cupy.asarray(rng.standard_normal(c).astype(dtype)), cupy.asarray(rng.uniform(0.5, 2, c).astype(dtype))]
    mine, theirs = [s.copy() for s in stats], [s.copy() for s in stats]
    y, cache = batchnorm.batchnorm_train_forward(x, weight, bias, *mine, 0.1, 1e-5, relu)
    y_ref, cache_ref = F.batchnorm_train_forward(x, weight, bias, *theirs, 0.1, 1e-5, relu)
    limit = KERNEL_TOL[dtype] * 10
    assert_close(y, y_ref, limit, "bn y")
    assert_close(mine[0], theirs[0], limit, "running_mean")
    assert_close(mine[1], theirs[1], limit, "running_var")
    dy = on_gpu(rng.standard_normal(shape).astype(dtype))
    for name, a, b in zip(("dx", "dw", "db"), batchnorm.batchnorm_backward(dy, cache),
                          F.batchnorm_backward(dy, cache_ref)):
        assert_close(a, b, limit, f"bn {name}")
    y, cache = batchnorm.batchnorm_eval_forward(x, weight, bias, *mine, 1e-5, relu)
    y_ref, _ = F.batchnorm_eval_forward(x, weight, bias, *theirs, 1e-5, relu)
    assert_close(y, y_ref, limit, "bn eval y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, ceil_mode", POOL_CASES)
def test_maxpool_kernels_match_generic_on_gpu(rng, dtype, shape, kernel, stride, padding, dilation, ceil_mode):
    x = on_gpu(rng.integers(-3, 4, shape).astype(dtype))                   # ties: first maximum wins
    y, cache = pooling.maxpool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    y_ref, cache_ref = F.maxpool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    np.testing.assert_array_equal(host(y), host(y_ref))
    dy = on_gpu(rng.standard_normal(y.shape).astype(dtype))
    np.testing.assert_array_equal(host(pooling.maxpool2d_backward(dy, cache)),
                                  host(F.maxpool2d_backward(dy, cache_ref)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows, classes", [(5, 7), (128, 1000), (33, 2)])
def test_cross_entropy_kernels_match_generic_on_gpu(rng, dtype, reduction, rows, classes):
    logits = cupy.asarray((rng.standard_normal((rows, classes)) * 5).astype(dtype))
    target = cupy.asarray(rng.integers(0, classes, rows))
    value, cache = loss.cross_entropy_forward(logits, target, reduction, 0.1)
    value_ref, cache_ref = F.cross_entropy_forward(logits, target, reduction, 0.1)
    assert_close(value, value_ref, KERNEL_TOL[dtype], "loss")
    dloss = cupy.asarray(rng.standard_normal(rows).astype(dtype)) if reduction == "none" else cupy.asarray(
        0.7, dtype=dtype)
    assert_close(loss.cross_entropy_backward(dloss, cache), F.cross_entropy_backward(dloss, cache_ref),
                 KERNEL_TOL[dtype], "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_kernels_match_generic_on_gpu(rng, dtype):
    a, b = (on_gpu(rng.standard_normal((3, 33, 5, 7)).astype(dtype)) for _ in range(2))
    y, _ = activation.relu_forward(a)
    np.testing.assert_array_equal(host(y), host(F.relu_forward(a)[0]))
    np.testing.assert_array_equal(host(activation.relu_backward(b, y)), host(F.relu_backward(b, y)))
    np.testing.assert_array_equal(host(activation.add_relu_forward(a, b)), host(F.add_relu_forward(a.copy(), b)))
    np.testing.assert_array_equal(host(activation.add(a, b)), host(F.add(a, b)))


def test_kernel_wrappers_fall_back_on_gpu(rng, monkeypatch):
    """Calls a kernel does not support go to the generic op; a frozen weight skips its GEMM: the
    backward then runs one matmul (dx) where the trainable one runs two, rebuilds no patches, and its
    dx equals the generic op's."""
    empty = on_gpu(np.zeros((0, 4, 5, 5)))
    x, w = on_gpu(rng.standard_normal((2, 4, 5, 5))), on_gpu(rng.standard_normal((3, 4, 3, 3)))
    y, cache = conv.conv2d_forward(x, w, None, 1, 1)
    dy = on_gpu(rng.standard_normal(y.shape))
    calls = []
    real_matmul, real_im2col = cupy.matmul, conv.im2col

    def counted_matmul(*args, **kwargs):
        calls.append("matmul")
        return real_matmul(*args, **kwargs)

    def counted_im2col(*args, **kwargs):
        calls.append("im2col")
        return real_im2col(*args, **kwargs)

    monkeypatch.setattr(cupy, "matmul", counted_matmul)
    monkeypatch.setattr(conv, "im2col", counted_im2col)
    conv.conv2d_backward(dy, cache)
    trainable_calls = list(calls)
    del calls[:]
    dx, dweight, dbias = conv.conv2d_backward(dy, cache, need_weight_grad=False)
    frozen_calls = list(calls)
    monkeypatch.undo()
    assert dweight is None and dbias is None and dx.shape == (2, 4, 5, 5)
    assert trainable_calls.count("matmul") == 2, trainable_calls
    assert frozen_calls == ["matmul"], frozen_calls               # dx's GEMM only: no dW GEMM, no im2col
    _, generic_cache = F.conv2d_forward(x, w, None, 1, 1)
    assert_close(dx, F.conv2d_backward(dy, generic_cache)[0], KERNEL_TOL["float64"], "frozen-weight dx")
    try:
        expected = F.relu_forward(empty)[0]
    except Exception as error:      # noqa: BLE001 - whatever the generic op does, the wrapper does
        with pytest.raises(type(error)):
            activation.relu_forward(empty)
    else:
        assert activation.relu_forward(empty)[0].shape == expected.shape
    probabilities = cupy.asarray(rng.dirichlet(np.ones(5), 4))
    logits = cupy.asarray(rng.standard_normal((4, 5)))
    try:
        expected = F.cross_entropy_forward(logits, probabilities)[0]
    except Exception as error:      # noqa: BLE001
        with pytest.raises(type(error)):
            loss.cross_entropy_forward(logits, probabilities)
    else:
        assert_close(loss.cross_entropy_forward(logits, probabilities)[0], expected, 1e-12, "soft-target loss")


def test_the_cupy_backend_uses_the_kernels():
    if os.environ.get("NUMRES_CUDA_KERNELS", "1") == "0":
        pytest.skip("kernels switched off with NUMRES_CUDA_KERNELS=0")
    ops = nr.functional.ops_for("cupy")
    for name, function in cuda.kernel_functions().items():
        assert getattr(ops, name) is function, name


# --- layers against torch on CUDA ---------------------------------------------------------------------

LAYERS = [
    ("conv 3x3 s2", lambda **w: nr.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False, **w),
     lambda: torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (2, 6, 9, 11), {}),
    ("conv grouped dilated biased", lambda **w: nr.nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, **w),
     lambda: torch.nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3), (3, 6, 7, 5), {}),
    ("conv 7x7 stem", lambda **w: nr.nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False, **w),
     lambda: torch.nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), (2, 3, 33, 31), {}),
    ("conv 1x1", lambda **w: nr.nn.Conv2d(16, 8, 1, bias=False, **w),
     lambda: torch.nn.Conv2d(16, 8, 1, bias=False), (2, 16, 5, 5), {}),
    ("batchnorm", lambda **w: nr.nn.BatchNorm2d(7, **w), lambda: torch.nn.BatchNorm2d(7), (3, 7, 5, 9), {}),
    ("batchnorm+relu", lambda **w: nr.nn.BatchNorm2d(7, **w),
     lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(7), torch.nn.ReLU()), (3, 7, 5, 9), {"relu": True}),
    ("relu", lambda **w: nr.nn.ReLU(**w), lambda: torch.nn.ReLU(), (2, 5, 4, 3), {}),
    ("maxpool", lambda **w: nr.nn.MaxPool2d(3, stride=2, padding=1, **w),
     lambda: torch.nn.MaxPool2d(3, stride=2, padding=1), (2, 4, 9, 8), {}),
    ("maxpool ceil dilated", lambda **w: nr.nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=True, **w),
     lambda: torch.nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=True), (1, 3, 9, 7), {}),
    ("avgpool", lambda **w: nr.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, **w),
     lambda: torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 4, 9, 8), {}),
    ("adaptive avgpool", lambda **w: nr.nn.AdaptiveAvgPool2d((2, 3), **w),
     lambda: torch.nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7, 8), {}),
    ("linear", lambda **w: nr.nn.Linear(12, 5, **w), lambda: torch.nn.Linear(12, 5), (4, 12), {}),
]


@needs_torch_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, make_nr, make_torch, shape, kwargs", LAYERS, ids=[case[0] for case in LAYERS])
def test_layer_on_cupy_matches_torch_cuda(rng, dtype, name, make_nr, make_torch, shape, kwargs):
    """The truth is the torch layer in float64 on CUDA, holding the numres layer's weights exactly (they
    are rounded to ``dtype`` first) and fed the same (rounded) input and upstream gradient."""
    layer_t = make_torch().to(DEVICE, getattr(torch, dtype)).to(torch.float64)
    layer = make_nr(backend="cupy", dtype=dtype)
    state = {k: v.detach().cpu().numpy() for k, v in layer_t.state_dict().items()}
    layer.load_state_dict({k.split(".", 1)[-1] if k.startswith("0.") else k: v for k, v in state.items()})
    x = rng.standard_normal(shape).astype(dtype)
    x_t = torch.tensor(x, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y_t = layer_t(x_t)
    dy = rng.standard_normal(tuple(y_t.shape)).astype(dtype)
    y_t.backward(torch.tensor(dy, dtype=torch.float64, device=DEVICE))
    y = layer(on_gpu(x), **kwargs)
    dx = layer.backward(on_gpu(dy))
    assert_close(y, y_t, TOL[dtype], f"{name} output")
    assert_close(dx, x_t.grad, TOL[dtype], f"{name} input gradient")
    torch_params = {k.split(".", 1)[-1] if k.startswith("0.") else k: p for k, p in layer_t.named_parameters()}
    for pname, p in layer.named_parameters():
        assert_close(p.grad, torch_params[pname].grad, TOL[dtype], f"{name} grad {pname}")
    torch_buffers = {k.split(".", 1)[-1] if k.startswith("0.") else k: b for k, b in layer_t.named_buffers()}
    for bname, b in layer.named_buffers():
        if np.issubdtype(b.dtype, np.floating):
            assert_close(b, torch_buffers[bname], TOL[dtype], f"{name} buffer {bname}")


@needs_torch_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_on_cupy_matches_torch_cuda(rng, dtype, smoothing):
    """Against torch's cross-entropy in float64 on CUDA, for logits rounded to ``dtype``."""
    logits = (rng.standard_normal((16, 1000)) * 4).astype(dtype)
    target = rng.integers(0, 1000, 16)
    z_t = torch.tensor(logits, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(z_t, torch.tensor(target, device=DEVICE), label_smoothing=smoothing)
    loss_t.backward()
    crit = nr.nn.CrossEntropyLoss(label_smoothing=smoothing, backend="cupy", dtype=dtype)
    value = crit(cupy.asarray(logits), cupy.asarray(target))
    assert_close(value, loss_t, TOL[dtype], "loss")
    assert_close(crit.backward(), z_t.grad, TOL[dtype], "dlogits")


def _resnet50_pair(dtype, torch_dtype=None):
    """numres ResNet-50 on CuPy and the torchvision-structured reference on CUDA, holding equal values."""
    nr.manual_seed(0)
    model = nr.resnet50(num_classes=20, dtype=dtype)
    ref.randomize_batchnorms(model)                  # assigns host arrays: done on NumPy, then moved
    reference = ref.build("resnet50", num_classes=20).to(getattr(torch, torch_dtype or dtype))
    ref.load_numres_state(reference, model)
    return model.to("cupy"), reference.to(DEVICE)


def _torch_cuda_pass(torch_model, x, upstream):
    """ref.torch_pass on the GPU: one forward/backward, every result as a host array."""
    dtype = next(torch_model.parameters()).dtype
    torch_model.zero_grad()
    x_t = torch.tensor(x, dtype=dtype, device=DEVICE, requires_grad=True)
    logits = torch_model(x_t)
    logits.backward(torch.tensor(upstream, dtype=dtype, device=DEVICE))
    return {"logits": host(logits), "input_grad": host(x_t.grad),
            "param_grads": {k: host(p.grad) for k, p in torch_model.named_parameters()},
            "buffers": {k: host(b).copy() for k, b in torch_model.named_buffers()}}


def _resnet50_batch(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 64, 64)).astype(dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), rng.standard_normal((2, 20))


@needs_torch_cuda
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet50_float64_on_cupy_matches_torch_cuda(mode):
    """Logits, dL/dx, every parameter gradient and BN buffer, all to 1e-10."""
    model, reference = _resnet50_pair("float64")
    model.train(mode == "train")
    reference.train(mode == "train")
    x, upstream = _resnet50_batch("float64")
    errors = ref.compare_passes(ref.numres_pass(model, x, upstream), _torch_cuda_pass(reference, x, upstream))
    worst, error = worst_error(errors)
    assert error < TOL["float64"], f"{mode}/float64: worst {worst} {error:.2e}"


@needs_torch_cuda
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet50_float32_on_cupy_as_accurate_as_torch_cuda(mode):
    """Float32 ResNet-50 against a float64 truth (torch on CUDA in float64, the same weights).

    Float32 gradients of a deep ReLU network are ill-conditioned: with these seeds a handful of
    pre-activations lie within float32 rounding of zero, and a ReLU or max-pool decision that flips
    changes whole gradient entries.  So numres-cupy float32 and torch-CUDA float32 (cuDNN) are both
    measured against the float64 truth and numres must err about as little as torch does.  In eval
    mode the logits (well conditioned) must also be within 1e-4 of the truth outright.
    """
    x, upstream = _resnet50_batch("float32")
    model32, torch32 = _resnet50_pair("float32")
    _, truth = _resnet50_pair("float32", torch_dtype="float64")
    for module in (model32, torch32, truth):
        module.train(mode == "train")
    reference = _torch_cuda_pass(truth, x, upstream)
    ours = ref.compare_passes(ref.numres_pass(model32, x, upstream), reference)
    theirs = ref.compare_passes(_torch_cuda_pass(torch32, x, upstream), reference)
    if mode == "eval":
        assert ours["logits"] < TOL["float32"], f"logits {ours['logits']:.2e} from the float64 truth"
    assert ours["logits"] < 2 * theirs["logits"] + 1e-5
    assert ours["input gradient"] < 5 * theirs["input gradient"] + 1e-4
    grads = [k for k in ours if k.startswith("grad ")]
    ours_g, theirs_g = np.array([ours[k] for k in grads]), np.array([theirs[k] for k in grads])
    assert np.median(ours_g) <= 5 * np.median(theirs_g) + 1e-5
    assert ours_g.max() <= 5 * theirs_g.max() + 1e-4
    buffers = [k for k in ours if k.startswith("buffer ")]
    assert max(ours[k] for k in buffers) < 5 * max(theirs[k] for k in buffers) + 1e-5


# --- the training step on the device -------------------------------------------------------------------

def _step_parts(dtype="float32", batch=8, size=64):
    nr.manual_seed(1)
    model = nr.resnet50(num_classes=10, backend="cupy", dtype=dtype)
    crit = nr.nn.CrossEntropyLoss(label_smoothing=0.1, backend="cupy", dtype=dtype)
    opt = nr.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = on_gpu(rng.standard_normal((batch, 3, size, size)).astype(dtype))
    target = cupy.asarray(rng.integers(0, 10, batch))
    return model, crit, opt, x, target


def _step(model, crit, opt, x, target):
    opt.zero_grad()
    loss_value = crit(model(x), target)
    model.backward(crit.backward())
    opt.step()
    return loss_value


def test_a_training_step_never_synchronises_with_the_host():
    import cupyx
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    parts = _step_parts()
    _step(*parts)                                       # compile kernels, warm the pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # the detector is deprecated (CuPy >= 10) but works
        with cupyx.allow_synchronize(False):
            _step(*parts)


def test_the_memory_pool_is_reused_across_steps():
    parts = _step_parts()
    pool = cupy.get_default_memory_pool()
    for _ in range(2):
        _step(*parts)
    cupy.cuda.Device().synchronize()
    held = pool.total_bytes()
    for _ in range(3):
        _step(*parts)
    cupy.cuda.Device().synchronize()
    assert pool.total_bytes() <= held, "later steps allocated new device memory instead of reusing the pool"


def test_tf32_switch_changes_float32_gemms_only_when_on():
    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 needs compute capability 8.0 or newer")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)), rng.standard_normal((512, 512))
    exact = a @ b
    a32, b32 = cupy.asarray(a, dtype="float32"), cupy.asarray(b, dtype="float32")
    errors = {}
    for enabled in (False, True):
        cuda.set_tf32(enabled)
        assert cuda.tf32_enabled() is enabled
        errors[enabled] = ref.rel_err(host(a32 @ b32), exact)
        # The batched (3-D) path follows the cuBLAS handle's math mode.
        errors[(enabled, "batched")] = ref.rel_err(host(cupy.matmul(a32[None], b32[None]))[0], exact)
    cuda.set_tf32(False)
    assert errors[False] < 1e-5 and errors[(False, "batched")] < 1e-5
    # TF32 keeps 10 mantissa bits (unit roundoff 2^-11 = 4.9e-4): visibly worse than float32, yet
    # finite and far from garbage (rel_err gives inf for NaN or inf, which the upper bound refuses).
    assert 1e-4 < errors[True] < 1e-2 and 1e-4 < errors[(True, "batched")] < 1e-2, errors
