"""SyncBatchNorm: BatchNorm2d whose training statistics are taken over the global batch of all ranks.

With ``W`` ranks, rank ``r`` holding ``m_r = N_r * H * W`` values of a channel, and ``M = sum_r m_r``,
the forward pass sums three things per channel over ranks (one ``allreduce`` of ``2C + 1`` numbers)::

    M,   S1 = sum_r sum_i (x_i - k),   S2 = sum_r sum_i (x_i - k)^2

around a shift ``k`` that every rank knows (the running mean, identical on all ranks; zero without
running statistics), which keeps ``S2 / M - (S1 / M)^2`` free of cancellation.  Then, on every rank::

    mean = k + S1 / M                 var = S2 / M - (S1 / M)^2            (biased)
    xhat = (x - mean) / sqrt(var + eps)           y = weight * xhat + bias  (then max(y, 0) with relu)
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)

which is exactly what one BatchNorm2d over the concatenated global batch computes.

Backward.  Each rank has ``g = dL_r/dy`` for its own loss ``L_r`` (through the ReLU mask when fused).
The gradient of ``L = sum_r L_r`` with respect to rank ``r``'s input needs two sums over *all* ranks
(the second ``allreduce``, ``2C`` numbers)::

    G1 = sum_r sum_i g_i          G2 = sum_r sum_i g_i * x_i
    dweight_global = invstd * (G2 - mean * G1)
    dx = weight * invstd * (g - G1 / M - xhat * dweight_global / M)

The parameter gradients stay *local*, ``dbias = sum_i g_i`` and ``dweight = sum_i g_i * xhat_i`` over
this rank's values, as in torch: DistributedDataParallel then averages them over ranks like every
other gradient, which gives the gradient of the mean loss over the global batch.

Evaluation mode, and training in a job of one, normalise exactly as BatchNorm2d does.
"""
from __future__ import annotations

import numpy as np

from .. import distributed as dist
from ..config import is_reference_mode
from ..functional.batchnorm import _moments, _normalise, batchnorm_backward, batchnorm_eval_forward
from ..functional.layout import channel_rows, rows_as_nchw
from .batchnorm import BatchNorm2d
from .module import Module


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm2d with statistics over every rank's batch (see the module docstring for the math)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, *, backend="numpy", dtype="float32"):
        if process_group is not None:
            raise ValueError("numres SyncBatchNorm synchronises over the whole job; process_group must be None")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, backend=backend, dtype=dtype)

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, x, relu=False):
        if is_reference_mode():
            raise NotImplementedError("SyncBatchNorm has no textbook version (its statistics come from an "
                                      "allreduce): numres.reference_mode() runs single-process models, with "
                                      "BatchNorm2d")
        self.check_input(x, ndim=4, channels=self.num_features)
        weight = None if self.weight is None else self.weight.data
        bias = None if self.bias is None else self.bias.data
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            y, cache = batchnorm_eval_forward(x, weight, bias, self.running_mean, self.running_var, self.eps, relu)
            self.save_for_backward((cache, None))
            return y
        momentum = self.momentum
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / self.num_batches_tracked
        rows = channel_rows(x)
        mean, var, count = self._global_moments(rows)
        if update:
            self.running_mean *= 1.0 - momentum
            self.running_mean += momentum * mean
            self.running_var *= 1.0 - momentum
            self.running_var += momentum * var * (count / (count - 1))
        y, cache = _normalise(rows, x.shape, mean, var, weight, bias, self.eps, relu, training=True)
        self.save_for_backward((cache, count))
        return y

    def _global_moments(self, rows):
        """``(mean, biased var, M)`` of each channel over the values of all ranks (one allreduce).

        This rank's ``m`` values have moments ``(mean_r, var_r)`` (:func:`_moments`, one tiled pass), so
        around the shared shift ``k``: ``sum(x - k) = m (mean_r - k)`` and
        ``sum((x - k)^2) = m (var_r + (mean_r - k)^2)``."""
        xp = self.xp
        local, channels = rows.shape
        shift = self.running_mean if self.running_mean is not None else xp.zeros(channels, dtype=rows.dtype)
        shift = shift.astype(rows.dtype, copy=False)
        stats = xp.zeros(2 * channels + 1, dtype=rows.dtype)
        if local:
            local_mean, local_var = _moments(rows)
            offset = local_mean - shift
            stats[:channels] = local * offset
            stats[channels:2 * channels] = local * (local_var + offset * offset)
        stats[2 * channels] = local
        dist.all_reduce(stats)
        count = stats[2 * channels]
        if xp is np and count < 2:
            raise ValueError(f"SyncBatchNorm in training mode needs more than 1 value per channel over all "
                             f"ranks, got {int(count)}")
        mean_deviation = stats[:channels] / count
        var = xp.maximum(stats[channels:2 * channels] / count - mean_deviation * mean_deviation, 0)
        return shift + mean_deviation, var, count

    # --- backward -------------------------------------------------------------------------------------

    def backward(self, grad_output):
        cache, count = self.saved_cache()
        xp = self.xp
        if not cache.training:                   # evaluation mode: nothing to synchronise
            dx, dweight, dbias = batchnorm_backward(grad_output, cache)
            self._accumulate(dbias, dweight)
            return dx
        g = channel_rows(grad_output)
        if cache.relu:
            g = g * (cache.y_rows > 0)
        channels = cache.rows.shape[1]
        sums = xp.empty(2 * channels, dtype=g.dtype)
        sums[:channels] = g.sum(axis=0)
        sums[channels:] = (g * cache.rows).sum(axis=0)
        local_dbias = sums[:channels].copy()
        local_dweight = cache.invstd * (sums[channels:] - cache.mean * local_dbias)
        dist.all_reduce(sums)
        global_dbias = sums[:channels]
        global_dweight = cache.invstd * (sums[channels:] - cache.mean * global_dbias)
        # dx = a * g + b * x + c, the same expansion as batchnorm_backward, with the global sums
        a = cache.invstd * cache.weight
        b = -a * cache.invstd * global_dweight / count
        c = -a * global_dbias / count - b * cache.mean
        dx = g * a + cache.rows * b + c
        self._accumulate(local_dbias, local_dweight)
        return rows_as_nchw(dx.astype(cache.rows.dtype, copy=False), cache.shape)

    def _accumulate(self, dbias, dweight):
        if self.weight is not None and dweight is not None:
            self.weight.accumulate_grad(dweight)
        if self.bias is not None and dbias is not None:
            self.bias.accumulate_grad(dbias)

    # --- conversion -----------------------------------------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, process_group=None) -> Module:
        """Replace every BatchNorm2d in ``module`` by a SyncBatchNorm that shares its parameters and
        buffers (an optimizer built before still updates them); returns the converted module."""
        if isinstance(module, BatchNorm2d) and not isinstance(module, SyncBatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, backend=module.backend, dtype=module.dtype)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            if module.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    converted.register_buffer(name, getattr(module, name))
            converted.train(module.training)
            return converted
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, cls.convert_sync_batchnorm(child, process_group))
        return module
