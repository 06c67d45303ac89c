"""Pure forward/backward pairs on arrays.

Each ``*_forward`` returns ``(output, cache)``; the matching ``*_backward`` takes the
upstream gradient and that cache and returns the gradients.  Backward never changes
the cache, so it can be run more than once.  These functions hold no state; the
modules in :mod:`numres.nn` wrap them.
"""
from .activation import add, add_relu_forward, relu_backward, relu_forward
from .batchnorm import batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward
from .conv import col2im, conv2d_backward, conv2d_forward, im2col
from .padding import pad2d_backward, pad2d_forward
from .conv_algorithms import choose_conv_algorithm, conv_algorithm, get_conv_algorithm, set_conv_algorithm
from .winograd import winograd_conv2d_backward, winograd_conv2d_forward
from .implicit_gemm import implicit_conv2d_backward, implicit_conv2d_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward, log_softmax
from .pooling import (adaptive_avgpool2d_backward, adaptive_avgpool2d_forward, avgpool2d_backward,
                      avgpool2d_forward, maxpool2d_backward, maxpool2d_forward, maxunpool2d_backward,
                      maxunpool2d_forward)
from .dispatch import ops_for, register_kernel, unregister_kernel

__all__ = ["add", "add_relu_forward", "relu_backward", "relu_forward", "batchnorm_backward", "batchnorm_eval_forward",
           "batchnorm_train_forward", "col2im", "conv2d_backward", "conv2d_forward", "im2col", "pad2d_backward",
           "pad2d_forward", "linear_backward",
           "linear_forward", "cross_entropy_backward", "cross_entropy_forward", "log_softmax",
           "adaptive_avgpool2d_backward", "adaptive_avgpool2d_forward", "avgpool2d_backward", "avgpool2d_forward",
           "maxpool2d_backward", "maxpool2d_forward", "maxunpool2d_backward",
           "maxunpool2d_forward", "ops_for", "register_kernel", "unregister_kernel",
           "choose_conv_algorithm", "conv_algorithm", "get_conv_algorithm", "set_conv_algorithm",
           "winograd_conv2d_backward", "winograd_conv2d_forward", "implicit_conv2d_backward",
           "implicit_conv2d_forward"]
