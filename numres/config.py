"""numres's global switches, gathered in one settings object (after Chainer's ``chainer.config``).

::

    nr.config.show()                               # every setting, one per line
    nr.config.conv_algorithm = "im2col"            # set one for the rest of the program
    with nr.using_config(reference_mode=True, num_threads=1):
        model(x); model.backward(dy)               # ... or several, inside a block only
    with nr.reference_mode(): ...                  # the textbook tier (numres.reference) everywhere

=====================  ==========================================================================
setting                what it switches
=====================  ==========================================================================
reference_mode         every layer runs :mod:`numres.reference` (the textbook) instead of the engine
grad_enabled           False inside ``nr.no_grad()``: forward keeps nothing for backward
batchnorm_folding      evaluation-mode BatchNorm folded into the convolution before it
conv_algorithm         "im2col", "winograd", "implicit" or "auto" (:mod:`numres.functional.conv_algorithms`)
num_threads            numres's own thread pool (BatchNorm tiles, im2col, Winograd transforms)
tf32                   TF32 tensor-core math for float32 GEMMs on the GPU (CuPy only)
=====================  ==========================================================================

Each setting lives where it always did, and the old spellings keep working and stay in step
with this object: ``nr.no_grad()``, ``nr.nn.set_batchnorm_folding``,
``nr.functional.set_conv_algorithm``, ``nr.parallel.set_num_threads``, ``nr.cuda.set_tf32``.
:meth:`Settings.show` also prints what the process cannot change from inside: NumPy's BLAS and
its thread count, and the ``NUMRES_*`` / ``OPENBLAS_*`` environment variables.  Benchmarks
record its text beside their numbers.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

_reference = {"enabled": False}


def _grad_enabled():
    from .nn import module
    return module.is_grad_enabled()


def _set_grad_enabled(enabled):
    from .nn import module
    module._grad_enabled = _boolean("grad_enabled", enabled)


def _folding():
    from .nn import fusion
    return fusion.is_batchnorm_folding_enabled()


def _set_folding(enabled):
    from .nn import fusion
    fusion.set_batchnorm_folding(enabled)


def _conv_algorithm():
    from .functional import conv_algorithms
    return conv_algorithms.get_conv_algorithm()


def _set_conv_algorithm(algorithm):
    from .functional import conv_algorithms
    conv_algorithms.set_conv_algorithm(algorithm)


def _num_threads():
    from . import parallel
    return parallel.get_num_threads()


def _set_num_threads(count):
    from . import parallel
    parallel.set_num_threads(count)


def _tf32():
    cuda = sys.modules.get("numres.cuda")
    return bool(cuda and cuda.tf32_enabled())


def _set_tf32(enabled):
    from . import cuda
    cuda.set_tf32(_boolean("tf32", enabled))


def _reference_mode():
    return _reference["enabled"]


def _set_reference_mode(enabled):
    _reference["enabled"] = _boolean("reference_mode", enabled)


def _boolean(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# name -> (getter, setter); the order is the order show() prints.
_SETTINGS = {
    "reference_mode": (_reference_mode, _set_reference_mode),
    "grad_enabled": (_grad_enabled, _set_grad_enabled),
    "batchnorm_folding": (_folding, _set_folding),
    "conv_algorithm": (_conv_algorithm, _set_conv_algorithm),
    "num_threads": (_num_threads, _set_num_threads),
    "tf32": (_tf32, _set_tf32),
}


class Settings:
    """The global switches as attributes: reading one asks its owner, assigning one sets it there."""

    def __getattr__(self, name):
        if name not in _SETTINGS:
            raise AttributeError(f"numres has no setting {name!r}; the settings are {', '.join(_SETTINGS)}")
        return _SETTINGS[name][0]()

    def __setattr__(self, name, value):
        if name not in _SETTINGS:
            raise AttributeError(f"numres has no setting {name!r}; the settings are {', '.join(_SETTINGS)}")
        _SETTINGS[name][1](value)

    def __dir__(self):
        return list(_SETTINGS) + ["show", "as_dict"]

    def as_dict(self) -> dict:
        """Every setting's current value, by name."""
        return {name: getter() for name, (getter, _) in _SETTINGS.items()}

    def show(self, file=None) -> str:
        """Print (to ``file``, default stdout) and return every setting, then the BLAS and environment."""
        out = io.StringIO()
        width = max(len(name) for name in _SETTINGS) + 2
        for name, value in self.as_dict().items():
            print(f"{name:<{width}}{value!r}", file=out)
        print(f"{'blas':<{width}}{_blas_description()}", file=out)
        variables = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NUMRES_", "OPENBLAS_"))}
        print(f"{'environment':<{width}}{' '.join(f'{k}={v}' for k, v in variables.items()) or '(none set)'}",
              file=out)
        text = out.getvalue()
        print(text, end="", file=file if file is not None else sys.stdout)
        return text

    def __repr__(self):
        return "numres.config(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


def _blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        from .blas import current_blas_threads
        return f"threads={current_blas_threads()} (threadpoolctl not installed: kernel unknown)"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return "; ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                     f"threads={p.get('num_threads')}" for p in pools) or "none found"


config = Settings()


@contextlib.contextmanager
def using_config(**settings):
    """Set the named settings inside the block only; each gets its old value back on the way out."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise AttributeError(f"numres has no setting {unknown[0]!r}; the settings are {', '.join(_SETTINGS)}")
    saved = {name: getattr(config, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(config, name, value)
        yield config
    finally:
        for name, value in saved.items():
            if getattr(config, name) != value:
                setattr(config, name, value)


def reference_mode(enabled: bool = True):
    """``with nr.reference_mode(): ...`` runs every layer on :mod:`numres.reference`, the textbook tier.

    Forward and backward, training and evaluation, the residual joins too: inside the block no
    engine code runs (no im2col, col2im, Winograd, BatchNorm folding, channels-last tiles or
    thread pool).  Run a forward and its backward in the same mode.
    """
    return using_config(reference_mode=enabled)


def is_reference_mode() -> bool:
    return _reference["enabled"]
