"""ReLU and the residual join on the GPU, beside numres.functional.activation.

Each is one kernel over a contiguous matrix of rows: a channels-last activation seen as
(N*H*W, C), or any other array as (-1, last axis).  4-D outputs are channels-last (a 4-D
input stored otherwise is copied into that layout once).
"""
from __future__ import annotations

import numres.functional.activation as generic

from .fallback import kernel_op
from .runtime import check_extent, runtime_for, supports


def _rows(array, xp):
    """``array`` as a contiguous 2-D matrix of rows (a free view for channels-last or C-order input)."""
    if array.ndim == 4:
        nhwc = array.transpose(0, 2, 3, 1)
        return xp.ascontiguousarray(nhwc).reshape(-1, array.shape[1])
    flat = xp.ascontiguousarray(array)
    return flat.reshape(-1, array.shape[-1])


def _like(rows, template):
    if template.ndim == 4:
        n, c, h, w = template.shape
        return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return rows.reshape(template.shape)


def _map(name, template, *operands):
    rt = runtime_for(template)
    rows = [_rows(operand, rt.xp) for operand in operands]
    out = rt.xp.empty_like(rows[0])
    count, width = out.shape
    check_extent(count, "rows")
    rt.launch(name, template.dtype, count, width, (*rows, count, width, out))
    return _like(out, template)


def _usable(*arrays):
    first = arrays[0]
    return (supports(first) and first.ndim >= 1 and first.size > 0
            and all(a.shape == first.shape and a.dtype == first.dtype for a in arrays))


@kernel_op(generic.relu_forward)
def relu_forward(x):
    """Kernel version of :func:`numres.functional.activation.relu_forward`: ``(y, y)``."""
    if not _usable(x):
        return generic.relu_forward(x)
    y = _map("relu_forward_rows", x, x)
    return y, y


@kernel_op(generic.relu_backward)
def relu_backward(dy, y):
    """Kernel version of :func:`numres.functional.activation.relu_backward`."""
    if not _usable(dy, y):
        return generic.relu_backward(dy, y)
    return _map("relu_backward_rows", dy, dy, y)


@kernel_op(generic.add_relu_forward)
def add_relu_forward(x, identity):
    """Kernel version of :func:`numres.functional.activation.add_relu_forward`."""
    if not _usable(x, identity):
        return generic.add_relu_forward(x, identity)
    return _map("add_relu_rows", x, x, identity)


@kernel_op(generic.add)
def add(a, b):
    """Kernel version of :func:`numres.functional.activation.add`."""
    if not _usable(a, b):
        return generic.add(a, b)
    return _map("add_rows", a, a, b)
