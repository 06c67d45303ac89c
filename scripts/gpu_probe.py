"""Probe the CUDA toolchain numres needs on this machine, for real, and say exactly what is missing.

    PYTHONPATH=. python3 scripts/gpu_probe.py [--json probe.json]

It does what numres does on a GPU, once each, smallest first:

1. import CuPy and see a device (the **driver**: too old for the wheel's CUDA major, or no GPU);
2. one float32 GEMM through ``cupy.matmul``, checked against NumPy (**cuBLAS** of the wheel's major);
3. one CuPy elementwise kernel and one reduction, which CuPy compiles at run time with its own
   headers, ``cuda_fp16.h`` among them (**NVRTC** and the **CUDA headers** of the wheel's major);
4. one ``cupy.RawModule`` compile of numres's own kernel source (``activation.cu``) and a launch,
   checked against NumPy (NVRTC again, with numres's compile options);
5. PyTorch: a CUDA build that sees the device (for the parity tests and the benchmark).

Each step reports ``ok`` or the missing component and the error text; the exit status is 0 only
if every step passed.  The JSON names the card, the driver, the CUDA runtime, CuPy, NumPy, torch
and cuDNN versions, and is what ``scripts/gpu_check.sh`` keeps with its results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Words in an error message -> the component that is missing or broken.  Checked in this order.
_COMPONENTS = [
    ("cuda_fp16", "CUDA headers (cuda_fp16.h and friends) of the CuPy wheel's CUDA major: install the "
                  "nvidia-cuda-runtime / CUDA toolkit headers, or set CUDA_PATH"),
    ("cannot open source file", "CUDA headers of the CuPy wheel's CUDA major (NVRTC cannot find an include): "
                                "install the CUDA toolkit headers, or set CUDA_PATH"),
    ("nvrtc", "NVRTC (libnvrtc of the CuPy wheel's CUDA major): install nvidia-cuda-nvrtc or the CUDA toolkit"),
    ("cublas", "cuBLAS (libcublas of the CuPy wheel's CUDA major): install nvidia-cublas or the CUDA toolkit"),
    ("insufficient", "the NVIDIA driver: too old for the CuPy wheel's CUDA major"),
    ("driver", "the NVIDIA driver (not loaded, or too old for the CuPy wheel's CUDA major)"),
    ("no cuda-capable device", "a visible GPU (none found: check CUDA_VISIBLE_DEVICES and the driver)"),
    ("cudaerrornodevice", "a visible GPU (none found: check CUDA_VISIBLE_DEVICES and the driver)"),
]


def missing_component(message: str, default: str) -> str:
    """The component an error message points at (see ``_COMPONENTS``), else ``default``."""
    text = message.lower()
    for words, component in _COMPONENTS:
        if words in text:
            return component
    return default


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _step(report, name, default_component, function):
    """Run one probe step; record ``ok`` and its details, or the missing component and the error."""
    try:
        details = function() or {}
        report["steps"][name] = {"ok": True, **details}
        return True
    except Exception as exc:        # noqa: BLE001 - every failure is reported, with its text
        text = _error_text(exc)
        report["steps"][name] = {"ok": False, "missing": missing_component(text, default_component),
                                 "error": text, "traceback": traceback.format_exc(limit=4)}
        return False


def _device_info(cupy):
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    runtime_version = cupy.cuda.runtime.runtimeGetVersion()
    driver_version = cupy.cuda.runtime.driverGetVersion()
    return {"card": name, "compute_capability": device.compute_capability,
            "memory_bytes": int(props["totalGlobalMem"]), "multiprocessors": int(props["multiProcessorCount"]),
            "driver_cuda_version": driver_version, "cuda_runtime_version": runtime_version,
            "cupy": cupy.__version__}


def probe() -> dict:
    report = {"python": platform.python_version(), "host": platform.node(), "steps": {}}
    try:
        import numpy as np
        report["numpy"] = np.__version__
    except ImportError as exc:
        report["steps"]["numpy"] = {"ok": False, "missing": "NumPy", "error": _error_text(exc)}
        return report
    try:
        import cupy
    except Exception as exc:        # noqa: BLE001 - ImportError, or a CUDA library failing to load
        text = _error_text(exc)
        report["steps"]["import cupy"] = {"ok": False, "missing": missing_component(
            text, "CuPy (pip install cupy-cuda13x, or cupy-cuda12x for a CUDA 12 driver)"), "error": text}
        cupy = None
    if cupy is not None:
        def device():
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
            info = _device_info(cupy)
            report.update({key: info[key] for key in ("card", "cupy", "driver_cuda_version",
                                                       "cuda_runtime_version", "compute_capability")})
            if info["driver_cuda_version"] // 1000 < info["cuda_runtime_version"] // 1000:
                raise RuntimeError(f"insufficient driver: it supports CUDA {info['driver_cuda_version']}, the CuPy "
                                   f"wheel needs CUDA {info['cuda_runtime_version']}")
            return info

        if _step(report, "device", "the NVIDIA driver or a visible GPU", device):
            rng = np.random.default_rng(0)

            def gemm():
                a, b = rng.standard_normal((96, 80)), rng.standard_normal((80, 72))
                product = cupy.matmul(cupy.asarray(a, dtype=cupy.float32), cupy.asarray(b, dtype=cupy.float32))
                error = float(abs(cupy.asnumpy(product) - a @ b).max() / abs(a @ b).max())
                if not error < 1e-2:
                    raise RuntimeError(f"cuBLAS GEMM gave a wrong result (relative error {error:.1e})")
                return {"relative_error": error}

            def cupy_kernels():
                x = cupy.arange(1000, dtype=cupy.float32)
                total = float((x * 2 + 1).sum())            # one elementwise kernel, one reduction
                if total != 1000.0 * 999 + 1000:
                    raise RuntimeError(f"CuPy elementwise/reduction kernels gave {total}")
                return {}

            def raw_module():
                from numres.cuda import runtime as kernel_runtime, sources
                module = cupy.RawModule(code=sources.cuda_source("activation.cu"), options=("-std=c++17",))
                relu = module.get_function(sources.KERNELS["relu_forward_rows"].entry("float32"))
                values = rng.standard_normal((37, 5)).astype(np.float32)
                x, y = cupy.asarray(values), cupy.empty((37, 5), dtype=cupy.float32)
                grid, block = kernel_runtime.map_shape(37, 5, 64)
                relu(grid, block, (x, np.int32(37), np.int32(5), y))
                if not (cupy.asnumpy(y) == np.maximum(values, 0)).all():
                    raise RuntimeError("numres's relu kernel compiled but computed a wrong result")
                try:
                    return {"nvrtc_version": list(cupy.cuda.nvrtc.getVersion())}
                except Exception:       # noqa: BLE001 - the version is a detail; the compile worked
                    return {}

            _step(report, "cuBLAS GEMM", "cuBLAS (libcublas of the CuPy wheel's CUDA major)", gemm)
            _step(report, "CuPy runtime kernels", "NVRTC or the CUDA headers of the CuPy wheel's CUDA major",
                  cupy_kernels)
            _step(report, "RawModule compile", "NVRTC (libnvrtc of the CuPy wheel's CUDA major)", raw_module)

    def torch_cuda():
        import torch
        report.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda})
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise RuntimeError(f"PyTorch {torch.__version__} ({build}) sees no usable CUDA device; the parity "
                               f"tests and the benchmark need one")
        report["cudnn"] = torch.backends.cudnn.version()
        report["torch_card"] = torch.cuda.get_device_name()
        return {}

    _step(report, "torch CUDA", "a CUDA build of PyTorch", torch_cuda)
    report["ok"] = all(step["ok"] for step in report["steps"].values()) and "device" in report["steps"]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here as JSON")
    args = parser.parse_args(argv)
    report = probe()
    for name, step in report["steps"].items():
        if step["ok"]:
            print(f"probe: {name}: ok")
        else:
            print(f"probe: {name}: FAILED - missing or broken: {step['missing']}\n       {step['error']}")
    versions = ", ".join(f"{key} {report[key]}" for key in ("card", "driver_cuda_version", "cuda_runtime_version",
                                                             "cupy", "torch", "torch_cuda", "cudnn", "numpy")
                         if key in report)
    print(f"probe: {'PASS' if report['ok'] else 'FAIL'} ({versions})")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(report, stream, indent=2, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
