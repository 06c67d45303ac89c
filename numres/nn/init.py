"""``torch.nn.init``'s initialisers: fill a Parameter (or an array) in place and return it.

Each function takes a :class:`~numres.nn.Parameter` or a NumPy/CuPy array, writes new
values into it (the array keeps its memory layout: a Conv2d weight stays channels-last)
and returns what it was given, as PyTorch's return the tensor.  The random ones draw
from ``generator`` - a ``numpy.random.Generator`` - or, when it is None, from numres's
seedable default generator (:func:`numres.init.manual_seed`).  Values are drawn on the
host in float64 and in PyTorch's shape, then written into the array (one upload on a GPU),
so a seed gives the same values on every backend and in every layout.

With ``fan_in = shape[1] * receptive field`` and ``fan_out = shape[0] * receptive field``
(receptive field: the product of ``shape[2:]``, 1 for a matrix):

=====================  ==========================================================================
``uniform_``           ``U(a, b)``
``normal_``            ``N(mean, std^2)``
``trunc_normal_``      ``N(mean, std^2)`` conditioned on ``a <= x <= b`` (absolute bounds)
``constant_`` etc.     ``val``; ``ones_`` 1; ``zeros_`` 0; ``eye_`` the identity matrix;
                       ``dirac_`` a convolution that passes ``groups`` x ``min(out, in)`` channels through
``xavier_uniform_``    ``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``
``xavier_normal_``     ``N(0, std^2)``, ``std = gain * sqrt(2 / (fan_in + fan_out))``
``kaiming_uniform_``   ``U(-b, b)``, ``b = sqrt(3) * gain / sqrt(fan)``,
                       ``gain = calculate_gain(nonlinearity, a)``, ``fan`` chosen by ``mode``
``kaiming_normal_``    ``N(0, std^2)``, ``std = gain / sqrt(fan)``
``orthogonal_``        ``gain * Q``, Q from the QR decomposition of a normal matrix (signs fixed by R)
=====================  ==========================================================================

:func:`calculate_gain` gives the recommended gain of each nonlinearity: 1 for linear layers,
convolutions and the sigmoid, 5/3 for tanh, sqrt(2) for ReLU, ``sqrt(2 / (1 + slope^2))``
for leaky ReLU (slope 0.01 by default), 3/4 for SELU.

``kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g)`` draws exactly the values
of :func:`numres.init.kaiming_normal`, the initialisation numres's ResNets use.
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from .. import backend as B
from .. import init as _init
from .module import Parameter, parameters_changed

__all__ = ["calculate_gain", "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
           "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_"]

_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def calculate_gain(nonlinearity, param=None) -> float:
    """The recommended scale of the weights in front of ``nonlinearity`` (see the module notes)."""
    if nonlinearity in _LINEAR or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, numbers.Real) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def _array(tensor, what):
    """The array behind ``tensor`` (a Parameter or an array)."""
    data = tensor.data if isinstance(tensor, Parameter) else tensor
    try:
        B.backend_of(data)
    except TypeError:
        raise TypeError(f"{what} takes a numres Parameter or a NumPy/CuPy array, got "
                        f"{type(tensor).__name__}") from None
    return data


def _float_array(tensor, what):
    data = _array(tensor, what)
    if data.dtype.kind != "f":
        raise TypeError(f"{what} fills floating-point arrays, got dtype {data.dtype}")
    return data


def _generator(generator):
    if generator is None:
        return _init.default_generator()
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator (or None for numres's default), "
                        f"got {type(generator).__name__}")
    return generator


def _write(tensor, data, values):
    """Copy the host array ``values`` into ``data`` in place; note the change; return ``tensor``."""
    if isinstance(data, np.ndarray):
        data[...] = values
    else:
        data[...] = B.xp_of(data).asarray(values, dtype=data.dtype)
    parameters_changed()
    return tensor


def _fill(tensor, data, value):
    data.fill(value)          # on the device itself, no transfer
    parameters_changed()
    return tensor


def _calculate_fan_in_and_fan_out(tensor):
    """``(fan_in, fan_out)`` of a weight of PyTorch's shape ``(out, in, *kernel)``; needs 2 dimensions or more."""
    shape = tuple(_array(tensor, "_calculate_fan_in_and_fan_out").shape)
    if len(shape) < 2:
        raise ValueError("Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")
    return _init.fans(shape)


def _calculate_correct_fan(tensor, mode):
    mode = mode.lower() if isinstance(mode, str) else mode
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _no_elements(data, what) -> bool:
    if data.size == 0:
        warnings.warn(f"{what}: initializing zero-element tensors is a no-op", stacklevel=3)
        return True
    return False


def uniform_(tensor, a: float = 0.0, b: float = 1.0, generator=None):
    """Fill with values drawn from ``U(a, b)``."""
    data = _float_array(tensor, "uniform_")
    return _write(tensor, data, _generator(generator).uniform(a, b, size=data.shape))


def normal_(tensor, mean: float = 0.0, std: float = 1.0, generator=None):
    """Fill with values drawn from ``N(mean, std^2)``."""
    data = _float_array(tensor, "normal_")
    return _write(tensor, data, _generator(generator).normal(mean, std, size=data.shape))


def trunc_normal_(tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0, generator=None):
    """Fill with ``N(mean, std^2)`` values conditioned on ``a <= x <= b`` (``a`` and ``b`` are values, not
    multiples of ``std``).  Values outside are drawn again until none is left (rejection sampling)."""
    data = _float_array(tensor, "trunc_normal_")
    if not a < b:
        raise ValueError(f"trunc_normal_ needs a < b, got a={a}, b={b}")
    rng = _generator(generator)
    values = rng.normal(mean, std, size=data.shape)
    outside = (values < a) | (values > b)
    for _ in range(1000):
        count = int(outside.sum())
        if not count:
            break
        values[outside] = rng.normal(mean, std, size=count)
        outside = (values < a) | (values > b)
    else:
        raise ValueError(f"trunc_normal_: [{a}, {b}] holds too little of N({mean}, {std}^2) to sample from")
    return _write(tensor, data, values)


def constant_(tensor, val: float):
    """Fill with ``val``."""
    return _fill(tensor, _array(tensor, "constant_"), val)


def ones_(tensor):
    """Fill with ones."""
    return _fill(tensor, _array(tensor, "ones_"), 1)


def zeros_(tensor):
    """Fill with zeros."""
    return _fill(tensor, _array(tensor, "zeros_"), 0)


def eye_(tensor):
    """Fill a 2-D array with the identity matrix (ones on the diagonal of a rectangle too)."""
    data = _array(tensor, "eye_")
    if data.ndim != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    data.fill(0)
    B.xp_of(data).fill_diagonal(data, 1)
    parameters_changed()
    return tensor


def dirac_(tensor, groups: int = 1):
    """Fill a 3-, 4- or 5-D convolution weight with the Dirac delta: in each of ``groups`` groups,
    output channel ``d`` copies input channel ``d`` (for ``d < min(out / groups, in)``) at the kernel centre."""
    data = _array(tensor, "dirac_")
    if data.ndim not in (3, 4, 5):
        raise ValueError("Only tensors with 3, 4, or 5 dimensions are supported")
    if data.shape[0] % groups != 0:
        raise ValueError("dim 0 must be divisible by groups")
    out_per_group = data.shape[0] // groups
    data.fill(0)
    centre = tuple(k // 2 for k in data.shape[2:])
    for g in range(groups):
        for d in range(min(out_per_group, data.shape[1])):
            data[(g * out_per_group + d, d) + centre] = 1
    parameters_changed()
    return tensor


def xavier_uniform_(tensor, gain: float = 1.0, generator=None):
    """Glorot & Bengio (2010): ``U(-b, b)`` with ``b = gain * sqrt(6 / (fan_in + fan_out))``."""
    data = _float_array(tensor, "xavier_uniform_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(data)
    bound = math.sqrt(3.0) * gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return _write(tensor, data, _generator(generator).uniform(-bound, bound, size=data.shape))


def xavier_normal_(tensor, gain: float = 1.0, generator=None):
    """Glorot & Bengio (2010): ``N(0, std^2)`` with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""
    data = _float_array(tensor, "xavier_normal_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(data)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return _write(tensor, data, _generator(generator).normal(0.0, std, size=data.shape))


def kaiming_uniform_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator=None):
    """He et al. (2015): ``U(-b, b)`` with ``b = sqrt(3) * calculate_gain(nonlinearity, a) / sqrt(fan)``.

    ``mode="fan_in"`` keeps the forward pass's variance, ``"fan_out"`` the backward pass's; ``a`` is the
    negative slope of a leaky ReLU (PyTorch's default for Linear/Conv2d weights is ``a=sqrt(5)``)."""
    data = _float_array(tensor, "kaiming_uniform_")
    if _no_elements(data, "kaiming_uniform_"):
        return tensor
    fan = _calculate_correct_fan(data, mode)
    bound = math.sqrt(3.0) * calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return _write(tensor, data, _generator(generator).uniform(-bound, bound, size=data.shape))


def kaiming_normal_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator=None):
    """He et al. (2015): ``N(0, std^2)`` with ``std = calculate_gain(nonlinearity, a) / sqrt(fan)``.

    torchvision's ResNets use ``mode="fan_out", nonlinearity="relu"`` for their convolutions."""
    data = _float_array(tensor, "kaiming_normal_")
    if _no_elements(data, "kaiming_normal_"):
        return tensor
    fan = _calculate_correct_fan(data, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return _write(tensor, data, _generator(generator).normal(0.0, std, size=data.shape))


def orthogonal_(tensor, gain: float = 1, generator=None):
    """Saxe et al. (2013): a (semi-)orthogonal matrix times ``gain``; dimensions after the first are
    flattened.  ``Q`` comes from the QR decomposition of a standard normal matrix, each column's sign
    multiplied by the sign of ``R``'s diagonal so that the result is uniformly distributed."""
    data = _float_array(tensor, "orthogonal_")
    if data.ndim < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")
    if data.size == 0:
        return tensor
    rows = data.shape[0]
    cols = data.size // rows
    flat = _generator(generator).normal(0.0, 1.0, size=(rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return _write(tensor, data, (gain * q).reshape(data.shape))
