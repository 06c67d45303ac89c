"""The CUDA sources of numres's kernels, and the one table that declares their signatures.

Each kernel is a ``template <typename T> __device__`` function in a ``kernels/*.cu`` file.
This module generates, from :data:`KERNELS`, an ``extern "C" __global__`` entry point per
kernel and dtype (``im2col_nhwc_f32``, ``im2col_nhwc_f64``, ...), so that

* CuPy compiles one :class:`cupy.RawModule` per file and finds the entry points by plain names;
* the test suite compiles the very same text with ``nvcc --ptx -arch=sm_90``; and
* with :data:`SHIM_HEADER` (``kernels/shim.h``) the same text builds with g++ into a CPU library
  in which ``numres_launch_<kernel>`` runs every thread of a launch grid in turn, so the
  kernels can be checked against the generic NumPy ops without a GPU.

The parameter types in :data:`KERNELS` are also what the launcher uses to convert Python
arguments (``int`` -> int32, ``long long`` -> int64, ``double`` -> float64, ``T`` -> the array
dtype) and to check each array argument's dtype before a launch.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

KERNEL_DIR = Path(__file__).with_name("kernels")
COMMON_HEADER = "common.cuh"
SHIM_HEADER = "shim.h"

DTYPES = {"float32": ("float", "f32"), "float64": ("double", "f64")}


class Kernel(NamedTuple):
    """One templated kernel: the file it lives in, its name, its parameters ``(type, name)`` and its
    launch layout: ``"map"`` (a 2-D grid of independent threads, :func:`numres.cuda.runtime.map_shape`)
    or ``"block"`` (one block per item, threads that meet at ``__syncthreads``,
    :func:`numres.cuda.runtime.block_shape`)."""
    unit: str
    name: str
    params: tuple
    layout: str = "map"

    def entry(self, dtype) -> str:
        """The plain name of the entry point for ``dtype`` (``float32``/``float64``)."""
        return f"{self.name}_{DTYPES[np.dtype(dtype).name][1]}"


def _params(text: str) -> tuple:
    """``"const T* x, int n"`` -> ``(("const T*", "x"), ("int", "n"))``."""
    params = []
    for item in text.split(","):
        kind, name = item.strip().rsplit(" ", 1)
        params.append((kind.strip(), name.strip()))
    return tuple(params)


_GEOMETRY = ("int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, "
             "int out_h, int out_w")
_STRIDES = "long long sn, long long sh, long long sw, long long sc"

KERNELS = {kernel.name: kernel for kernel in [
    Kernel("im2col.cu", "im2col_nhwc", _params(
        f"const T* x, {_STRIDES}, int n, int h, int w, int c_per_group, int groups, {_GEOMETRY}, T* cols")),
    Kernel("im2col.cu", "col2im_nhwc", _params(
        f"const T* dcols, int n, int h, int w, int c_per_group, int groups, {_GEOMETRY}, T* dx")),
    Kernel("maxpool.cu", "maxpool_forward_nhwc", _params(
        f"const T* x, {_STRIDES}, int n, int h, int w, int channels, {_GEOMETRY}, T* y, int* argmax")),
    Kernel("maxpool.cu", "maxpool_backward_nhwc", _params(
        f"const T* dy, {_STRIDES}, const int* argmax, int n, int h, int w, int channels, {_GEOMETRY}, T* dx")),
    Kernel("batchnorm.cu", "bn_partial_moments", _params(
        "const T* x, int rows, int channels, double* psum, double* psumsq")),
    Kernel("batchnorm.cu", "bn_finalize_moments", _params(
        "const T* x, const double* psum, const double* psumsq, int lanes, int rows, int channels, "
        "const T* weight, double eps, int update_running, double momentum, const double* momentum_ptr, "
        "int momentum_on_device, T* running_mean, T* running_var, T* mean_out, T* invstd_out, T* scale_out"),
        layout="block"),
    Kernel("batchnorm.cu", "bn_eval_params", _params(
        "const T* running_mean, const T* running_var, const T* weight, double eps, int channels, "
        "T* mean_out, T* invstd_out, T* scale_out")),
    Kernel("batchnorm.cu", "bn_apply", _params(
        "const T* x, int rows, int channels, const T* mean, const T* scale, const T* bias, int relu, T* y")),
    Kernel("batchnorm.cu", "bn_backward_partials", _params(
        "const T* dy, const T* x, int rows, int channels, const T* mean, const T* scale, const T* bias, "
        "int relu, double* pg, double* pgx")),
    Kernel("batchnorm.cu", "bn_backward_finalize", _params(
        "const double* pg, const double* pgx, int lanes, int rows, int channels, const T* invstd, "
        "const T* scale, int training, T* dweight, T* dbias, T* shift_out, T* slope_out"), layout="block"),
    Kernel("batchnorm.cu", "bn_backward_dx", _params(
        "const T* dy, const T* x, int rows, int channels, const T* mean, const T* scale, const T* bias, "
        "int relu, const T* shift, const T* slope, T* dx")),
    Kernel("softmax_xent.cu", "softmax_xent_forward", _params(
        "const T* logits, int rows, int classes, const long long* target, long long ignore_index, double smoothing, "
        "double* lse, T* loss")),
    Kernel("softmax_xent.cu", "softmax_xent_backward", _params(
        "const T* logits, const double* lse, const long long* target, long long ignore_index, int rows, int classes, "
        "double smoothing, const T* dloss, double dloss_value, int dloss_mode, T* dlogits")),
    Kernel("activation.cu", "relu_forward_rows", _params("const T* x, int rows, int cols, T* y")),
    Kernel("activation.cu", "relu_backward_rows", _params("const T* dy, const T* y, int rows, int cols, T* dx")),
    Kernel("activation.cu", "add_relu_rows", _params("const T* a, const T* b, int rows, int cols, T* y")),
    Kernel("activation.cu", "add_rows", _params("const T* a, const T* b, int rows, int cols, T* y")),
]}

UNITS = tuple(sorted({kernel.unit for kernel in KERNELS.values()}))


def read(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


def _concrete(kind: str, dtype) -> str:
    """``"const T*"`` -> ``"const float*"`` for float32; types without ``T`` are unchanged."""
    return re.sub(r"\bT\b", DTYPES[np.dtype(dtype).name][0], kind)


def _signature(kernel: Kernel, dtype) -> str:
    return ", ".join(f"{_concrete(kind, dtype)} {name}" for kind, name in kernel.params)


def _arguments(kernel: Kernel) -> str:
    return ", ".join(name for _, name in kernel.params)


def entry_points(unit: str) -> str:
    """The ``extern "C" __global__`` wrappers of every kernel in ``unit``, for float and double."""
    lines = []
    for kernel in KERNELS.values():
        if kernel.unit != unit:
            continue
        for dtype in DTYPES:
            c_type = DTYPES[dtype][0]
            lines.append(f'extern "C" __global__ void {kernel.entry(dtype)}({_signature(kernel, dtype)})\n'
                         f'{{ {kernel.name}<{c_type}>({_arguments(kernel)}); }}')
    return "\n".join(lines) + "\n"


def shim_launchers(unit: str) -> str:
    """For the CPU build: ``numres_launch_<entry>(grid, block, params...)`` runs every thread in turn
    (map kernels) or every block's threads as fibers that meet at each barrier (block kernels)."""
    lines = []
    for kernel in KERNELS.values():
        if kernel.unit != unit:
            continue
        for dtype in DTYPES:
            entry = kernel.entry(dtype)
            lines.append(
                f'extern "C" void numres_launch_{entry}(unsigned numres_gx, unsigned numres_gy, '
                f'unsigned numres_gz, unsigned numres_bx, unsigned numres_by, unsigned numres_bz, '
                f'{_signature(kernel, dtype)})\n'
                f'{{ {"NUMRES_SHIM_RUN_BLOCKS" if kernel.layout == "block" else "NUMRES_SHIM_RUN_GRID"}((numres_dim3{{numres_gx, numres_gy, numres_gz}}), '
                f'(numres_dim3{{numres_bx, numres_by, numres_bz}}), {entry}({_arguments(kernel)})); }}')
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def cuda_source(unit: str) -> str:
    """The complete CUDA text of ``unit`` (``"im2col.cu"``, ...): common header, kernels, entry points."""
    if unit not in UNITS:
        raise ValueError(f"unknown CUDA source {unit!r}; the sources are {UNITS}")
    return f"{read(COMMON_HEADER)}\n{read(unit)}\n{entry_points(unit)}"


@functools.lru_cache(maxsize=None)
def shim_source(unit: str) -> str:
    """``unit`` as C++ for g++: the shim header first, then the CUDA text, then the CPU launchers."""
    return f"{read(SHIM_HEADER)}\n{cuda_source(unit)}\n{shim_launchers(unit)}"
