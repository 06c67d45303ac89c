"""Tests written to kill the mutants that survived scripts/mutation_check.py (see benchmarks/results/mutation.md).

Each test names the backward function it guards (the mutation check selects tests by that name), checks it
against PyTorch's autograd in float64 to 1e-10 with a random upstream gradient, and reaches a path the
rest of the suite leaves out: col2im's own return value (conv2d_backward passes ``out=`` and ignores it),
tiles and chunks forced small, and the options each backward branches on.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from numres.functional import conv

from torch_reference import rel_err

TOL = 1e-10


def _close(ours, theirs, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    error = rel_err(np.asarray(ours), theirs)
    assert error < TOL, f"{what}: relative error {error:.3e}"


# --- col2im ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, padding, dilation, groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((1, 1), (1, 1), (0, 0), (1, 1), 1),          # the reshape-only path
    ((2, 3), (2, 2), (0, 1), (2, 1), 1),
])
@pytest.mark.parametrize("with_out", [False, True])
def test_col2im_returns_the_adjoint_of_unfold(kernel, stride, padding, dilation, groups, with_out):
    """col2im's return value against autograd through torch's unfold: d/dx sum(unfold(x) * dcols)."""
    rng = np.random.default_rng(40)
    n, c, h, w = 2, 4, 7, 6
    x = rng.standard_normal((n, c, h, w))
    cols, out_hw = conv.im2col(x, kernel, stride, padding, dilation, groups)
    dcols = rng.standard_normal(cols.shape)                 # (groups, N*OH*OW, kh*kw*C/groups)
    out = np.empty((n, h, w, c)) if with_out else None
    dx = conv.col2im(dcols, x.shape, kernel, stride, padding, dilation, out_hw, groups, out=out)

    cg = c // groups
    # numres's column order is (kh, kw, c) per group; torch's unfold is (C, kh, kw) by output pixel.
    torch_layout = dcols.reshape(groups, n, out_hw[0], out_hw[1], kernel[0], kernel[1], cg) \
        .transpose(1, 0, 6, 4, 5, 2, 3).reshape(n, c * kernel[0] * kernel[1], out_hw[0] * out_hw[1])
    tx = torch.tensor(x, requires_grad=True)
    unfolded = TF.unfold(tx, kernel, dilation=dilation, padding=padding, stride=stride)
    (unfolded * torch.tensor(torch_layout)).sum().backward()
    _close(dx, tx.grad, "col2im")
    if with_out:
        _close(out.transpose(0, 3, 1, 2), tx.grad, "col2im's out")


# --- batchnorm_backward -------------------------------------------------------------------------------

def _torch_batchnorm(x, weight, bias, running_mean, running_var, training, relu, dy):
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True) if weight is not None else None
    tb = torch.tensor(bias, requires_grad=True) if bias is not None else None
    ty = TF.batch_norm(tx, torch.tensor(running_mean), torch.tensor(running_var), tw, tb, training, 0.1, 1e-5)
    ty = torch.relu(ty) if relu else ty
    ty.backward(torch.tensor(dy))
    return ty, tx.grad, None if tw is None else tw.grad, None if tb is None else tb.grad


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_backward_over_uneven_tiles(monkeypatch, training, relu, affine):
    """Rows split into 3-row tiles with a shorter last one (2*5*2 = 20 rows of 4 channels: six tiles of 3 and
    one of 2), in both modes: every tile must read its own rows and the matching rows of the per-channel
    constants."""
    from numres import parallel
    from numres.functional import batchnorm
    monkeypatch.setattr(parallel, "TILE_ELEMENTS", 3 * 4)
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 4, 5, 2)) * 2 + 3
    assert [t.stop - t.start for t in parallel.tiles(20, 4)] == [3, 3, 3, 3, 3, 3, 2]
    weight, bias = (rng.standard_normal(4), rng.standard_normal(4)) if affine else (None, None)
    running_mean, running_var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    forward = batchnorm.batchnorm_train_forward if training else batchnorm.batchnorm_eval_forward
    args = (x, weight, bias, running_mean.copy(), running_var.copy())
    y, cache = forward(*args, 0.1, 1e-5, relu) if training else forward(*args, 1e-5, relu)
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = batchnorm.batchnorm_backward(dy, cache)
    ty, tdx, tdw, tdb = _torch_batchnorm(x, weight, bias, running_mean, running_var, training, relu, dy)
    _close(y, ty, "output")
    _close(dx, tdx, "dx")
    if affine:
        _close(dweight, tdw, "dweight")
        _close(dbias, tdb, "dbias")


# --- folded_conv_bn_backward ----------------------------------------------------------------------------

def _folded_pair(rng, bias, relu, groups=1, stride=1):
    import numres as nr
    from numres.nn.fusion import FoldedBatchNormCache, conv_bn
    nr.nn.set_batchnorm_folding(True)
    conv = nr.nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias, dtype="float64")
    conv.weight.data[...] = rng.standard_normal(conv.weight.shape)
    if bias:
        conv.bias.data[...] = rng.standard_normal(6)
    bn = nr.nn.BatchNorm2d(6, dtype="float64")
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 6)
    bn.bias.data[...] = rng.standard_normal(6)
    bn.running_mean[...] = rng.standard_normal(6)
    bn.running_var[...] = rng.uniform(0.5, 2.0, 6)
    conv.eval(), bn.eval()
    x = rng.standard_normal((2, 4, 7, 5))
    y = conv_bn(conv, bn, x, relu=relu)
    assert isinstance(bn._cache, FoldedBatchNormCache), "the pair did not fold"
    return conv, bn, x, y


def _torch_pair(conv, bn, x, relu, upstream):
    leaf = lambda a: torch.tensor(np.array(a), requires_grad=True)      # noqa: E731
    tx, tw, tg, tb = leaf(x), leaf(conv.weight.data), leaf(bn.weight.data), leaf(bn.bias.data)
    tcb = leaf(conv.bias.data) if conv.bias is not None else None
    z = TF.conv2d(tx, tw, tcb, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = TF.batch_norm(z, torch.tensor(np.array(bn.running_mean)), torch.tensor(np.array(bn.running_var)), tg, tb,
                      False, 0.1, bn.eps)
    y = torch.relu(y) if relu else y
    y.backward(torch.tensor(upstream))
    return tx.grad, tw.grad, None if tcb is None else tcb.grad, tg.grad, tb.grad


@pytest.mark.parametrize("frozen", ["all", "conv", "bn"])
@pytest.mark.parametrize("bias", [False, True])
def test_folded_conv_bn_backward_with_frozen_parameters(frozen, bias):
    """dx through a folded pair whose parameters are all frozen (the early return), or only the conv's or only
    the BatchNorm's: the gradients that remain against autograd."""
    rng = np.random.default_rng(42)
    conv, bn, x, y = _folded_pair(rng, bias, relu=True)
    if frozen in ("all", "conv"):
        conv.requires_grad_(False)
    if frozen in ("all", "bn"):
        bn.requires_grad_(False)
    conv.zero_grad(), bn.zero_grad()
    upstream = rng.standard_normal(y.shape)
    dx = conv.backward(bn.backward(upstream))
    tdx, tdw, tdcb, tdg, tdb = _torch_pair(conv, bn, x, True, upstream)
    _close(dx, tdx, "dx")
    if frozen == "bn":
        _close(conv.weight.grad, tdw, "conv weight")
        if bias:
            _close(conv.bias.grad, tdcb, "conv bias")
    if frozen == "conv":
        _close(bn.weight.grad, tdg, "bn weight")
        _close(bn.bias.grad, tdb, "bn bias")


# --- winograd_conv2d_backward -----------------------------------------------------------------------------

@pytest.mark.parametrize("workspace, chunks", [(256, [1, 1, 1, 1, 1]), (2048, [2, 2, 1])])
def test_winograd_conv2d_backward_chunks_from_a_small_workspace(monkeypatch, workspace, chunks):
    """The chunk size that images_per_chunk derives from a small workspace (not a patched images_per_chunk):
    5 images of 4x4 F(2,3) tiles, a*a*tiles*max(C, O) = 16*16*4 = 1024 elements each."""
    from numres.functional import winograd as W
    monkeypatch.setattr(W, "WORKSPACE_ELEMENTS", workspace)
    monkeypatch.setattr(W, "TRANSFORM_TILE_ELEMENTS", 1)
    step = W.images_per_chunk(5, 1024)
    assert [min(step, 5 - start) for start in range(0, 5, step)] == chunks
    rng = np.random.default_rng(43)
    x, weight, bias = rng.standard_normal((5, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, cache = W.winograd_conv2d_forward(x, weight, bias, padding=1, tile=2)
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = W.winograd_conv2d_backward(dy, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    TF.conv2d(tx, tw, tb, padding=1).backward(torch.tensor(dy))
    _close(dx, tx.grad, "dx")
    _close(dweight, tw.grad, "dweight")
    _close(dbias, tb.grad, "dbias")


# --- conv2d_backward (the dispatch by algorithm) -------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["im2col", "winograd", "implicit"])
def test_conv2d_backward_follows_the_forward_algorithm(algorithm):
    """numres.functional.conv_algorithms.conv2d_backward hands each cache to its own algorithm's backward; the
    gradients against autograd for each algorithm chosen explicitly (a 3x3 stride-1 layer all three take)."""
    from numres.functional import conv_algorithms as A
    rng = np.random.default_rng(44)
    x, weight, bias = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    with A.conv_algorithm(algorithm):
        y, cache = A.conv2d_forward(x, weight, bias, 1, 1)
    assert A.algorithm_of(cache) == algorithm
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = A.conv2d_backward(dy, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    TF.conv2d(tx, tw, tb, padding=1).backward(torch.tensor(dy))
    _close(dx, tx.grad, "dx")
    _close(dweight, tw.grad, "dweight")
    _close(dbias, tb.grad, "dbias")


# --- implicit_conv2d_backward_xp ------------------------------------------------------------------------------

@pytest.mark.parametrize("need_input_grad, need_weight_grad", [(False, False), (True, False), (False, True)])
def test_implicit_conv2d_backward_xp_with_gradients_skipped(need_input_grad, need_weight_grad):
    """The generic implicit-GEMM backward asked for some gradients only (a frozen weight, a stem with no dx, a
    bias alone): the ones asked for against autograd, the others None."""
    from numres.functional import implicit_gemm as I
    rng = np.random.default_rng(45)
    x, weight, bias = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, cache = I.implicit_conv2d_forward_xp(x, weight, bias, 2, 1)
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = I.implicit_conv2d_backward_xp(dy, cache, need_input_grad, need_weight_grad=need_weight_grad,
                                                       need_bias_grad=True)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    TF.conv2d(tx, tw, tb, stride=2, padding=1).backward(torch.tensor(dy))
    _close(dbias, tb.grad, "dbias")
    if need_input_grad:
        _close(dx, tx.grad, "dx")
    else:
        assert dx is None
    if need_weight_grad:
        _close(dweight, tw.grad, "dweight")
    else:
        assert dweight is None
