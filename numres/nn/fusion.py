"""Conv -> BatchNorm pairs run as one step: folded in evaluation mode.

The residual blocks call ``conv_bn(self.conv1, self.bn1, x, relu=True)`` where they used to call
``self.bn1(self.conv1(x), relu=True)``.  In training mode, and wherever folding does not apply,
that is exactly what runs.  In evaluation mode the BatchNorm is **folded** into the convolution
(:func:`numres.functional.fused.fold_conv_bn`: weight ``W * scale`` per output channel, bias
``shift``), and the folded convolution adds the bias and applies the ReLU to each chunk of its
GEMM output while it is in cache: no BatchNorm pass is made at all.

When the folded weights are made.  Once per parameter state: the first evaluation-mode forward
after ``eval()`` folds each pair and keeps the result; it folds again only when the parameters
or buffers may have changed.  A global counter (:func:`numres.nn.module.parameters_changed`) is
bumped by ``train()``/``eval()``, ``load_state_dict``, ``Module.to`` and every optimizer
``step()``, and each pair also notices a parameter or buffer array replaced by another one
(``p.data = new_array``).  **Writing into an array by hand** (``bn.running_var[...] = v``,
``p.data *= 2``) cannot be seen: call ``model.eval()`` again afterwards, which refolds.  The
folded weights are dropped at the next training-mode forward.

Backward works through a folded pair and gives the unfolded pair's gradients exactly (the
formulas are in :mod:`numres.functional.fused`): evaluation-mode gradients (saliency maps,
fine-tuning a frozen-statistics model) stay right.  Under ``no_grad`` nothing is kept.

The unfolded path, for study.  ``nr.nn.set_batchnorm_folding(False)`` (or ``with
nr.nn.batchnorm_folding(False): ...``) runs every pair unfolded, a Conv2d forward then a
BatchNorm2d forward, as in training.  A pair also runs unfolded, by itself, whenever its
convolution or its BatchNorm (or the downsample Sequential holding them) has a forward,
forward-pre or backward hook registered: hooks on a BatchNorm always fire, with the BatchNorm's
real input and output.  Only exact ``Conv2d`` -> ``BatchNorm2d`` pairs with running statistics
fold (a subclass such as SyncBatchNorm, or ``track_running_stats=False``, runs unfolded).
Nothing folds in ``nr.reference_mode()``: the textbook tier has no fused steps.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

from ..config import is_reference_mode
from ..functional import conv_algorithms
from ..functional.fused import FoldedConvCache, conv2d_bias_relu_forward, fold_conv_bn
from . import module as M
from .batchnorm import BatchNorm2d
from .containers import Sequential
from .conv import Conv2d

_folding = {"enabled": True}


def set_batchnorm_folding(enabled: bool) -> None:
    """Fold BatchNorm into the convolution before it in evaluation mode (True, the default) or not."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_batchnorm_folding takes True or False, got {enabled!r}")
    _folding["enabled"] = enabled


def is_batchnorm_folding_enabled() -> bool:
    return _folding["enabled"]


@contextlib.contextmanager
def batchnorm_folding(enabled: bool):
    """``with batchnorm_folding(False): model(x)`` runs the unfolded path inside the block only."""
    saved = _folding["enabled"]
    set_batchnorm_folding(enabled)
    try:
        yield
    finally:
        _folding["enabled"] = saved


class FoldedBatchNormCache(NamedTuple):
    """A folded BatchNorm's cache: its backward only applies the ReLU mask (the convolution's
    backward computes the BatchNorm's parameter gradients)."""
    output: object        # y, for the ReLU mask (None without the ReLU)
    relu: bool
    folded_into_conv: bool = True


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def can_fold(conv, bn) -> bool:
    """Whether ``bn(conv(x))`` runs folded now (evaluation mode, folding on, no hooks, plain pair)."""
    return (_folding["enabled"] and not is_reference_mode() and type(conv) is Conv2d and type(bn) is BatchNorm2d
            and not conv.training and not bn.training and bn.running_mean is not None
            and conv.out_channels == bn.num_features and conv.backend == bn.backend and conv.dtype == bn.dtype
            and conv._plain_padding() is not None and not _has_hooks(conv) and not _has_hooks(bn))


def _fold_key(conv, bn):
    arrays = (conv.weight.data, None if conv.bias is None else conv.bias.data,
              None if bn.weight is None else bn.weight.data, None if bn.bias is None else bn.bias.data,
              bn.running_mean, bn.running_var)
    return M.parameter_version(), arrays, bn.eps


def folded_parameters(conv, bn):
    """The folded weight and bias of a pair, made once and kept on the convolution until a change."""
    version, arrays, eps = _fold_key(conv, bn)
    kept = conv.__dict__.get("_folded")
    if kept is not None and kept[0] == version and kept[2] == eps and all(a is b for a, b in zip(kept[1], arrays)):
        return kept[3]
    folded = fold_conv_bn(conv.weight.data, arrays[1], arrays[2], arrays[3], bn.running_mean, bn.running_var, eps)
    conv.__dict__["_folded"] = (version, arrays, eps, folded)
    return folded


def _record_output(module, y):
    """What ``Module.__call__`` notes after a forward (the folded path calls ``forward`` on no module)."""
    module.__dict__["_unbatched"] = False
    module.__dict__["_output_signature"] = (tuple(y.shape), y.dtype)


def folded_forward(conv, bn, x, relu=False):
    """``relu(bn(conv(x)))`` by the folded convolution; both modules keep what their backward needs."""
    conv.check_input(x, ndim=4, channels=conv.in_channels)
    folded = folded_parameters(conv, bn)
    padding = conv._plain_padding()
    xp = conv.xp
    algorithm = conv_algorithms.choose_conv_algorithm(x.shape, folded.weight.shape, conv.stride, padding,
                                                      conv.dilation, conv.groups, xp)
    if algorithm == "im2col" and xp.__name__ == "numpy":
        y, conv_cache = conv2d_bias_relu_forward(x, folded.weight, folded.bias, conv.stride, padding,
                                                    conv.dilation, conv.groups, relu=relu)
    else:   # Winograd (bias and ReLU in its output pass), or a GPU's registered kernel
        y, conv_cache = conv_algorithms.conv2d_forward(x, folded.weight, folded.bias, conv.stride, padding,
                                                       conv.dilation, conv.groups, ops=conv.ops, relu=relu)
    conv_bias = None if conv.bias is None else conv.bias.data
    conv.save_for_backward(FoldedConvCache(conv_cache, conv.weight.data, folded.scale, folded.invstd, folded.mean,
                                           conv_bias, conv_algorithms.algorithm_of(conv_cache), bn.weight, bn.bias))
    bn.save_for_backward(FoldedBatchNormCache(y if relu else None, relu))
    _record_output(conv, y)
    _record_output(bn, y)
    return y


def conv_bn(conv, bn, x, relu=False):
    """``bn(conv(x), relu=relu)``: folded in evaluation mode where it can be (see the module's notes)."""
    if can_fold(conv, bn) and getattr(x, "ndim", None) == 4:
        return folded_forward(conv, bn, x, relu)
    if conv.training:
        conv.__dict__.pop("_folded", None)              # training: the folded weights are stale anyway
    return bn(conv(x), relu=relu)


def downsample_forward(downsample, x):
    """A residual block's shortcut ``downsample(x)``; a plain ``Sequential(Conv2d, BatchNorm2d)``
    without hooks goes through :func:`conv_bn` (and so folds in evaluation mode)."""
    if type(downsample) is Sequential and len(downsample) == 2 and not _has_hooks(downsample):
        conv, bn = downsample[0], downsample[1]
        if type(conv) is Conv2d and type(bn) is BatchNorm2d:
            y = conv_bn(conv, bn, x)
            _record_output(downsample, y)
            return y
    return downsample(x)
