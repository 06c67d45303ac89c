"""CUDA kernels for the CuPy backend, and the GPU settings numres exposes.

:func:`register_kernels` makes the ``"cupy"`` backend use numres's own kernels in place of the
generic array code for these ops (each kernel sits beside the generic op it replaces, with the
same signature; forward and backward are registered in pairs because they share a cache format):

=============================================  ===============================================
op                                             kernel module
=============================================  ===============================================
im2col, col2im, conv2d_forward/backward         :mod:`numres.cuda.conv`
batchnorm_train/eval_forward, batchnorm_backward :mod:`numres.cuda.batchnorm` (ReLU fused)
maxpool2d_forward/backward                      :mod:`numres.cuda.pooling` (saved indices)
cross_entropy_forward/backward                  :mod:`numres.cuda.loss` (label smoothing)
relu_forward/backward, add_relu_forward, add    :mod:`numres.cuda.activation`
=============================================  ===============================================

Every kernel is wrapped by :func:`numres.cuda.fallback.kernel_op`: a call with an argument or an
input the kernel does not handle (a keyword it lacks, an empty batch, ...) runs the generic op.
:func:`register_kernels` is called by :mod:`numres.backend` when CuPy loads.  ``NUMRES_CUDA_KERNELS=0`` in the
environment leaves every op generic (for comparisons and debugging).

TF32.  On Ampere and newer GPUs cuBLAS can round float32 GEMM inputs to TF32 (10-bit
mantissa) for tensor-core speed.  numres leaves it **off** by default, so float32 results keep
full float32 precision (PyTorch's default for matmul, ``torch.backends.cuda.matmul.allow_tf32 =
False``; note that PyTorch's cuDNN convolutions *do* use TF32 by default,
``torch.backends.cudnn.allow_tf32 = True``).  :func:`set_tf32` switches it; ``NUMRES_TF32=1``
in the environment switches it on at start-up.  Float32 comparisons against PyTorch need TF32
off on both sides (or tolerances near 1e-3); float64 is never affected.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["register_kernels", "set_tf32", "tf32_enabled", "OPS"]

# op name -> (module, function): every op the CuPy backend runs through a numres kernel.
OPS = {
    "im2col": "conv", "col2im": "conv", "conv2d_forward": "conv", "conv2d_backward": "conv",
    "batchnorm_train_forward": "batchnorm", "batchnorm_eval_forward": "batchnorm",
    "batchnorm_backward": "batchnorm",
    "maxpool2d_forward": "pooling", "maxpool2d_backward": "pooling",
    "cross_entropy_forward": "loss", "cross_entropy_backward": "loss",
    "relu_forward": "activation", "relu_backward": "activation", "add_relu_forward": "activation",
    "add": "activation",
}

_CUBLAS_DEFAULT_MATH = 0
_CUBLAS_TF32_TENSOR_OP_MATH = 3      # cublasMath_t value (cuBLAS 11+); CuPy's enum does not name it
_tf32 = False


def kernel_functions() -> dict:
    """``{op name: kernel function}`` for every op in :data:`OPS`."""
    import importlib
    return {name: getattr(importlib.import_module(f"{__name__}.{module}"), name) for name, module in OPS.items()}


def register_kernels(backend: str = "cupy") -> list:
    """Route ``backend``'s ops through numres's CUDA kernels; returns the names registered.

    Does nothing (returns ``[]``) when ``NUMRES_CUDA_KERNELS=0``.  Must not load the backend
    itself: :mod:`numres.backend` calls it while loading CuPy.
    """
    from numres.functional.dispatch import register_kernel
    if os.environ.get("NUMRES_CUDA_KERNELS", "1") == "0":
        return []
    for name, function in kernel_functions().items():
        register_kernel(backend, name, function)
    if backend == "cupy":
        try:
            set_tf32(os.environ.get("NUMRES_TF32", "0") == "1")
        except Exception as exc:        # a CuPy without these internals must not make the backend unusable
            warnings.warn(f"numres could not set the TF32 mode of CuPy's GEMMs ({type(exc).__name__}: {exc}); "
                          f"CuPy's own setting (CUPY_TF32) applies", RuntimeWarning, stacklevel=2)
    return list(OPS)


def unregister_kernels(backend: str = "cupy") -> None:
    """Back to the generic ops on ``backend``."""
    from numres.functional.dispatch import unregister_kernel
    for name in OPS:
        unregister_kernel(backend, name)


def set_tf32(enabled: bool) -> None:
    """Allow (True) or forbid (False) TF32 tensor-core math in float32 GEMMs on the current device.

    Sets both places CuPy takes it from: the compute type of its 2-D GEMM path
    (``cupy._core._routines_linalg.set_compute_type``, which ``CUPY_TF32`` otherwise decides on
    first use) and the math mode of the device's cuBLAS handle, which its batched GEMMs follow.
    The handle is per device and per thread: call this again after switching either.
    """
    global _tf32
    import numpy
    import cupy
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas

    enabled = bool(enabled)
    tf32, default = getattr(linalg, "COMPUTE_TYPE_TF32", 7), getattr(linalg, "COMPUTE_TYPE_DEFAULT", 1)
    linalg.set_compute_type(numpy.float32, tf32 if enabled else default)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, _CUBLAS_TF32_TENSOR_OP_MATH if enabled else _CUBLAS_DEFAULT_MATH)
    _tf32 = enabled


def tf32_enabled() -> bool:
    """Whether :func:`set_tf32` last allowed TF32 (False until it is called)."""
    return _tf32
