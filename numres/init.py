"""Parameter initialisation, drawn on the host from one seedable generator.

Values are drawn in float64 in PyTorch's parameter shape, so a given seed yields
the same model on every backend and in every memory layout.

* :func:`kaiming_normal` - ``N(0, gain^2 / fan)`` with ``gain = sqrt(2)`` for ReLU
  (torchvision's choice for ResNet convolutions: ``mode="fan_out"``).
* :func:`default_uniform` - PyTorch's default for Linear and Conv2d:
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for both weight and bias.
"""
from __future__ import annotations

import math

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Seed the generator that every initialiser draws from; returns it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def default_generator() -> np.random.Generator:
    return _generator


def get_rng_state() -> dict:
    """The generator's state, for checkpoints."""
    return _generator.bit_generator.state


def set_rng_state(state: dict) -> None:
    _generator.bit_generator.state = state


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of PyTorch shape ``(out, in, *kernel)``."""
    receptive_field = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive_field, shape[0] * receptive_field


def kaiming_normal(shape, mode="fan_out", rng=None) -> np.ndarray:
    """He et al.'s normal init for a ReLU network."""
    fan_in, fan_out = fans(shape)
    fan = fan_out if mode == "fan_out" else fan_in
    return (rng or _generator).normal(0.0, math.sqrt(2.0 / fan), size=shape)


def uniform(shape, bound, rng=None) -> np.ndarray:
    return (rng or _generator).uniform(-bound, bound, size=shape)


def default_uniform(shape, fan_in, rng=None) -> np.ndarray:
    """PyTorch's default init for Linear/Conv2d weights and biases (kaiming_uniform with a=sqrt(5))."""
    return uniform(shape, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0, rng)
