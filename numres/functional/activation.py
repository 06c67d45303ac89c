"""ReLU, and the residual join that ends every ResNet block.

The engine's version of :mod:`numres.reference.activation` (read that first): the same math,
run in cache-sized tiles on all cores and writing into preallocated outputs.

ReLU::            y = max(x, 0)                  dx = dy * [y > 0]
Residual join::   y = max(x + identity, 0)       dx = d(identity) = dy * [y > 0]

The ReLU mask is read from the *output*, which the next layer keeps anyway, so
nothing extra is saved.  (PyTorch also gives x = 0 a zero gradient.)  The work
runs in cache-sized tiles on all cores (:mod:`numres.parallel`).  Any shape works,
empty ones (N = 0) included.
"""
from __future__ import annotations

from ..backend import xp_of
from ..parallel import map_tiles
from .layout import as_rows, rows_like


def _rowwise(fill, template, *operands):
    """Allocate rows shaped like ``template`` and ``fill(out_tile, *operand_tiles)`` tile by tile
    (an empty ``template``, such as an empty batch, gives an empty result: there is nothing to fill)."""
    xp = xp_of(template)
    if template.size == 0:
        return xp.empty_like(template)
    rows = [as_rows(operand) for operand in operands]
    out = xp.empty_like(rows[0])
    map_tiles(lambda tile: fill(out[tile], *(r[tile] for r in rows)), out.shape[0], out.shape[1], xp)
    return rows_like(out, template)


def relu_forward(x):
    """``(y, cache)``; the cache is ``y`` itself."""
    xp = xp_of(x)
    y = _rowwise(lambda out, a: xp.maximum(a, 0, out=out), x, x)
    return y, y


def relu_backward(dy, y):
    """``dx = dy`` where the output was positive, else 0."""
    xp = xp_of(dy)
    return _rowwise(lambda out, g, o: xp.multiply(g, o > 0, out=out), dy, dy, y)


def add_relu_forward(x, identity):
    """``max(x + identity, 0)`` in one pass; its backward is :func:`relu_backward` on the output,
    and that gradient flows to both summands."""
    xp = xp_of(x)

    def fill(out, a, b):
        xp.add(a, b, out=out)
        xp.maximum(out, 0, out=out)
    return _rowwise(fill, x, x, identity)


def add(a, b):
    """``a + b`` for two gradients that meet (a residual fork), in tiles on all cores."""
    return _rowwise(lambda out, p, q: xp_of(p).add(p, q, out=out), a, a, b)
