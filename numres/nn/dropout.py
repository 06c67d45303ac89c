"""Dropout and Dropout2d, as PyTorch's: random zeroing in training mode, the identity in eval mode.

In training mode, with ``p`` the probability of dropping::

    m ~ Bernoulli(1 - p)                       one draw per element (Dropout)
                                               or per (sample, channel) map (Dropout2d)
    y = x * m / (1 - p)                         forward: the expectation of y is x
    dL/dx = dL/dy * m / (1 - p)                 backward: the same scaled mask, kept from forward

``p = 0`` is the identity; ``p = 1`` gives zeros (``x * 0``, as PyTorch computes it) and zero
gradients.  In eval mode (``module.eval()``) both passes are the identity.

The mask is drawn from numres's seedable generator (:func:`numres.manual_seed`) on the module's
backend.  On the CPU it comes straight from that generator, so a seed (or a checkpoint's
generator state) replays the same masks.  On a GPU the mask is drawn on the device, by a
device generator that is seeded from numres's generator the first time it is needed after each
:func:`numres.manual_seed`; the same seed gives the same masks there too, and nothing is copied
between host and device.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend as B
from .. import init
from .module import Module

_device_generators: dict = {}      # backend -> (numres generator it was seeded from, device generator)


def _device_generator(backend: str, xp):
    """``xp.random.RandomState`` for ``backend``, reseeded whenever numres's generator was replaced."""
    host = init.default_generator()
    seeded_from, generator = _device_generators.get(backend, (None, None))
    if seeded_from is not host:
        generator = xp.random.RandomState(int(host.integers(0, 2 ** 63 - 1)))
        _device_generators[backend] = (host, generator)
    return generator


def keep_mask(shape, keep_probability: float, backend: str):
    """A boolean array of ``shape`` on ``backend``, each element True with probability ``keep_probability``."""
    xp = B.get_xp(backend)
    if xp is np:
        return init.default_generator().random(shape, dtype=np.float32) < keep_probability
    if hasattr(xp, "random"):
        return _device_generator(backend, xp).random_sample(shape, dtype=np.float32) < keep_probability
    # An array module without a random generator (the guard test double): draw on the host, upload.
    return xp.asarray(init.default_generator().random(shape, dtype=np.float32) < keep_probability)


def _check_probability(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r}")


class Dropout(Module):
    """Zeroes each element with probability ``p`` in training mode and scales the rest by ``1 / (1 - p)``.

    Takes an input of any shape.  ``inplace=True`` writes the result into the input array.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, backend="numpy", dtype="float32"):
        super().__init__(backend=backend, dtype=dtype)
        _check_probability(p)
        self.p, self.inplace = p, inplace

    def mask_shape(self, x):
        """The shape of one draw: an element each (Dropout2d overrides it: a channel each)."""
        return x.shape

    def check_dropout_input(self, x):
        self.check_input(x, ndim=None)

    def forward(self, x):
        """``x * m / (1 - p)`` in training mode, ``x`` in eval mode; keeps the scaled mask for backward."""
        self.check_dropout_input(x)
        if not self.training or self.p == 0:
            noise = None
        elif self.p == 1:
            noise = self.xp.zeros((1,) * x.ndim, dtype=x.dtype)       # x * 0: zeros with x's signs, as PyTorch
        else:
            noise = keep_mask(self.mask_shape(x), 1.0 - self.p, self.backend).astype(x.dtype)
            noise *= 1.0 / (1.0 - self.p)
        self.save_for_backward((noise,))
        if noise is None:
            return x
        if self.inplace:
            x *= noise
            return x
        return x * noise

    def backward(self, grad_output):
        """``dL/dx = dL/dy * m / (1 - p)`` with the forward's mask (the identity in eval mode or for p = 0)."""
        (noise,) = self.saved_cache()
        return grad_output if noise is None else grad_output * noise

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


class Dropout2d(Dropout):
    """Zeroes whole channels: each ``(sample, channel)`` feature map is dropped with probability ``p``
    and the kept maps are scaled by ``1 / (1 - p)``.

    Takes ``(N, C, H, W)`` input, or an unbatched ``(C, H, W)`` one, whose channels are dropped in
    the same way.  (PyTorch 2.13 still reads a 3-D input as ``(N, C, L)`` for backward
    compatibility and warns that it will read it as ``(C, H, W)``; numres reads it as ``(C, H, W)``.)
    """

    accepts_unbatched = True

    def mask_shape(self, x):
        return x.shape[:2] + (1,) * (x.ndim - 2)

    def check_dropout_input(self, x):
        if getattr(x, "ndim", 4) != 4:
            raise ValueError(f"Dropout2d expects a 4-D (N, C, H, W) input or an unbatched 3-D (C, H, W) one, "
                             f"got shape {tuple(x.shape)}; use Dropout for element-wise dropout")
        self.check_input(x, ndim=4)
