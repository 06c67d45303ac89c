"""Layers with hand-written forward and backward passes, PyTorch's names and arguments."""
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .containers import Flatten, Identity, ModuleDict, ModuleList, Sequential
from .conv import Conv2d
from .dropout import Dropout, Dropout2d
from .linear import Linear
from .loss import CrossEntropyLoss, MSELoss
from .module import Module, Parameter, StateDictError, is_grad_enabled, no_grad
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d, MaxUnpool2d
from .sync_batchnorm import SyncBatchNorm
from . import parallel  # noqa: E402  (nn.parallel.DistributedDataParallel)
from . import init, utils  # noqa: E402  (nn.init.kaiming_normal_, nn.utils.clip_grad_norm_)
from .fusion import batchnorm_folding, is_batchnorm_folding_enabled, set_batchnorm_folding

__all__ = ["Module", "Parameter", "StateDictError", "no_grad", "is_grad_enabled", "Conv2d", "BatchNorm2d",
           "ReLU", "MaxPool2d", "MaxUnpool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Linear", "Flatten", "Identity",
           "Sequential", "CrossEntropyLoss"]
__all__ += ["Dropout", "Dropout2d", "ModuleList", "ModuleDict"]
__all__ += ["SyncBatchNorm", "parallel"]
__all__ += ["batchnorm_folding", "is_batchnorm_folding_enabled", "set_batchnorm_folding"]
__all__ += ["MSELoss", "init", "utils"]
