"""numres.cpu_info: a generic OpenBLAS kernel on a CPU with AVX2/AVX-512 is named, with the fix."""
from __future__ import annotations

import os
import subprocess
import sys

from numres.cpu_info import blas_kernel, slow_blas_warning, vector_extension


def test_generic_kernel_on_a_vector_cpu_is_named(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    line = slow_blas_warning("Prescott", {"sse3", "avx2", "avx512f"})
    assert "'Prescott'" in line and "AVX-512" in line and "OPENBLAS_CORETYPE=SkylakeX" in line
    assert "pip install -U numpy" in line and "\n" not in line
    assert "OPENBLAS_CORETYPE=Haswell" in slow_blas_warning("Nehalem", {"avx2"})
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    assert slow_blas_warning("Prescott", {"avx2"}).startswith("note: OPENBLAS_CORETYPE=Prescott makes")


def test_nothing_to_say_for_a_fitting_kernel_or_an_old_cpu():
    assert slow_blas_warning("SkylakeX", {"avx2", "avx512f"}) is None
    assert slow_blas_warning("Haswell", {"avx2"}) is None
    assert slow_blas_warning("Prescott", {"sse3"}) is None          # the CPU has nothing better
    assert slow_blas_warning("", {"avx2"}) is None                  # not an OpenBLAS: nothing known
    assert vector_extension({"avx2"}) == "AVX2" and vector_extension(set()) is None


def test_a_forced_generic_kernel_is_detected_on_this_machine():
    """OPENBLAS_CORETYPE=Prescott makes this machine's OpenBLAS slow: the check must see it (or say nothing
    where NumPy's BLAS is not an OpenBLAS or the CPU lacks AVX2)."""
    code = "from numres.cpu_info import blas_kernel, slow_blas_warning, vector_extension as v; " \
           "print(blas_kernel(), v(), slow_blas_warning() is not None)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_CORETYPE": "Prescott"})
    kernel, extension, warned = result.stdout.split()
    if kernel != "None" and extension != "None":
        assert warned == "True", result.stdout
    assert blas_kernel() is None or isinstance(blas_kernel(), str)
