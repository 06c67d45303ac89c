"""numres: deep learning from scratch on NumPy and CuPy, with every backward pass written by hand.

    import numres as nr
    model = nr.resnet50(backend="numpy", dtype="float32")
    logits = model(x); loss = crit(logits, y); model.backward(crit.backward())
"""
import os as _os

# OpenBLAS's worker threads busy-wait for about 0.1 s after every GEMM before they sleep, and on
# a small machine that spinning takes the cores away from numres's own threads (BatchNorm, im2col,
# ReLU run between GEMMs): a ResNet-50 train step is ~25% slower.  A short timeout lets them sleep.
# It only takes effect when numres is imported before NumPy loads OpenBLAS; the user's setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import allocator, backend, data, distributed, functional, init, nn, optim, parallel, study  # noqa: E402
from .backend import to_numpy  # noqa: E402
from .config import config, reference_mode, using_config  # noqa: E402
from .gradcheck import GradcheckResult, gradcheck  # noqa: E402
from .inference import load_model  # noqa: E402
from .init import manual_seed  # noqa: E402
from .io import load, load_weights, save  # noqa: E402
from .models import (BasicBlock, Bottleneck, ResNet, plain20, plain32, plain44, plain56, plain110,  # noqa: E402
                     resnet18, resnet20, resnet32, resnet34, resnet44, resnet50, resnet56, resnet101, resnet110,
                     resnet152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2)
from .nn import no_grad  # noqa: E402
from .summary import summarize  # noqa: E402
from .torch_checkpoint import load_torch_checkpoint  # noqa: E402

__version__ = "0.1.0"

__all__ = ["allocator", "backend", "data", "distributed", "functional", "init", "nn", "optim", "parallel", "study",
           "to_numpy", "gradcheck", "GradcheckResult", "manual_seed", "save", "load", "load_weights",
           "load_torch_checkpoint", "load_model", "summarize", "no_grad", "config", "using_config", "reference_mode",
           "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain20", "plain32", "plain44", "plain56",
           "plain110"]
