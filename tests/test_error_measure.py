"""The suite's error measure (tests/error_measure.py) treats every NaN and infinity as a failure.

Checked for each place a non-finite value can hide: either side, both sides, the first entry or a
later one, and in ``max()`` / ``worst`` over a collection of errors.  Also through the wrappers the
tests use: torch_reference.rel_err (torch tensors) and the MPI scripts' gathered_worst.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import error_measure as M
import torch_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed"))
import common  # noqa: E402  (the MPI scripts' helpers)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [0, 4])
@pytest.mark.parametrize("side", ["actual", "expected", "both"])
def test_a_non_finite_entry_is_an_infinite_error(bad, index, side):
    good = np.random.default_rng(0).standard_normal(6)
    broken = good.copy()
    broken[index] = bad
    actual = broken if side in ("actual", "both") else good
    expected = broken if side in ("expected", "both") else good
    assert M.rel_err(actual, expected) == math.inf
    assert torch_reference.rel_err(torch.from_numpy(actual), torch.from_numpy(expected)) == math.inf


def test_all_nan_on_both_sides_is_a_failure_not_zero():
    nan = np.full((2, 3), np.nan)
    assert M.rel_err(nan, nan) == math.inf
    assert M.rel_err(nan, nan, allow_matching_inf=True) == math.inf


def test_matching_infinities_only_when_asked():
    expected = np.array([-np.inf, 1.0, 2.0])
    close = np.array([-np.inf, 1.0, 2.0 + 1e-12])
    assert M.rel_err(close, expected) == math.inf
    assert M.rel_err(close, expected, allow_matching_inf=True) == pytest.approx(1e-12 / 2, rel=1e-3)
    for wrong in ([np.inf, 1.0, 2.0], [-np.inf, -np.inf, 2.0], [0.0, 1.0, 2.0], [-np.inf, np.nan, 2.0]):
        assert M.rel_err(np.array(wrong), expected, allow_matching_inf=True) == math.inf, wrong


def test_finite_values_give_the_relative_error():
    b = np.array([[1.0, -4.0], [2.0, 0.5]])
    a = b + np.array([[0.0, 0.0], [0.02, 0.0]])
    assert M.rel_err(a, b) == pytest.approx(0.02 / 4.0)
    assert M.rel_err(np.zeros(3), np.zeros(3)) == 0.0
    assert M.rel_err(np.array([1e-3, 0.0]), np.zeros(2)) == pytest.approx(1e-3)     # absolute when b is 0
    assert M.rel_err(np.array([1e308]), np.array([-1e308])) == math.inf              # overflow is a failure
    with pytest.raises(AssertionError, match=r"shape mismatch: actual \(3,\) vs expected \(1, 3\)"):
        M.rel_err(np.zeros(3), np.zeros((1, 3)))


def test_worst_and_max_error_never_drop_a_nan():
    errors = {"input": 1e-12, "weight": math.nan, "bias": 2e-12}
    assert max(errors.values()) == 2e-12                     # what Python's max does: the NaN is lost
    assert M.worst(errors) == ("weight", math.inf)
    assert M.max_error(errors.values()) == math.inf
    assert M.worst({"a": 1e-12, "b": 3e-12}) == ("b", 3e-12)
    with pytest.raises(ValueError, match="nothing was compared"):
        M.worst({})
    with pytest.raises(ValueError, match="nothing was compared"):
        M.max_error([])


class _FakeComm:
    """allgather as two ranks would answer it: this rank's dict, then the other rank's."""

    def __init__(self, other):
        self.other = other

    def allgather(self, value):
        return [value, self.other]


def test_gathered_worst_keeps_a_nan_from_any_rank():
    mine = {"output": 1e-15, "weight_grad": 2e-15}
    assert common.gathered_worst(_FakeComm({"output": 3e-15, "weight_grad": math.nan}), mine) == \
        {"output": 3e-15, "weight_grad": math.inf}
    with pytest.raises(RuntimeError, match="different tensors"):
        common.gathered_worst(_FakeComm({"output": 1e-15}), mine)
