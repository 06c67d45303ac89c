"""The textbook tier: one plain forward/backward pair per op, to read first.

numres has two tiers with the same function names, arguments and return values:

* ``numres.reference`` (this package) is the textbook.  Each op is plain NumPy on NCHW
  arrays, vectorised over images and pixels but with nothing else: no threads, no
  chunking, no channels-last storage, no folding of BatchNorm into convolutions, no
  ReLU fused into another op.  Each ``*_forward`` returns ``(output, cache)``, the cache
  a plain tuple of what backward needs; each ``*_backward`` takes the upstream gradient
  and that cache, is at most 25 lines of code, and its docstring derives the gradient
  from the forward with the chain rule, in the symbols the code uses.
* ``numres.functional`` is the engine: the same math, rearranged for speed (im2col and
  one big GEMM, channels-last memory, cache-sized tiles on all cores, BatchNorm written
  in terms of ``x``, fused ReLUs, Winograd).  Its docstrings name the reference function
  each op accelerates, and the tests check every engine op against its reference op and
  both against PyTorch.

Because the signatures match, either tier can stand in for the other wherever a module
calls ``self.ops.<name>(...)``: ``nr.reference_mode()`` runs whole models on this one.

::

    import numres.reference as R
    y, cache = R.conv2d_forward(x, w, b, stride=2, padding=1)
    dx, dw, db = R.conv2d_backward(dy, cache)

The ops, one file per family: :mod:`.conv`, :mod:`.batchnorm`, :mod:`.activation`,
:mod:`.pooling`, :mod:`.linear`, :mod:`.loss`.
"""
from .activation import add, add_relu_forward, relu_backward, relu_forward
from .batchnorm import batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward
from .conv import conv2d_backward, conv2d_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .pooling import (adaptive_avgpool2d_backward, adaptive_avgpool2d_forward, avgpool2d_backward,
                      avgpool2d_forward, maxpool2d_backward, maxpool2d_forward, maxunpool2d_backward,
                      maxunpool2d_forward)

__all__ = ["add", "add_relu_forward", "relu_backward", "relu_forward",
           "batchnorm_backward", "batchnorm_eval_forward", "batchnorm_train_forward",
           "conv2d_backward", "conv2d_forward", "linear_backward", "linear_forward",
           "cross_entropy_backward", "cross_entropy_forward",
           "adaptive_avgpool2d_backward", "adaptive_avgpool2d_forward", "avgpool2d_backward", "avgpool2d_forward",
           "maxpool2d_backward", "maxpool2d_forward", "maxunpool2d_backward", "maxunpool2d_forward"]

BACKWARDS = ("relu_backward", "batchnorm_backward", "conv2d_backward", "linear_backward", "cross_entropy_backward",
             "maxpool2d_backward", "maxunpool2d_backward", "avgpool2d_backward", "adaptive_avgpool2d_backward")
