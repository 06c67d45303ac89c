"""Build the notebooks in this folder from the cells below, run them, and save them with their outputs.

::

    python notebooks/make_notebooks.py               # build, execute and write every notebook
    python notebooks/make_notebooks.py 02 03         # only those whose file name contains "02" or "03"
    python notebooks/make_notebooks.py --no-execute  # write them without outputs

Each notebook is a list of cells, markdown (:func:`md`) and code (:func:`code`), in the
CS231n / d2l manner: a short explanation, a short piece of code, its output.  The code
cells hold real ``assert`` statements, so running a notebook is a test
(``tests/test_notebooks.py`` runs every committed notebook).  Outputs are seeded and
carry no timings (except in 04, whose subject is time), and cell ids are fixed, so
running this script twice gives the same files up to the timings of 04.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str) -> tuple:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str, *helpers: str) -> tuple:
    """A code cell: ``helpers`` (unindented source, e.g. :data:`REL_ERROR`) after ``text``, a blank line apart."""
    parts = [textwrap.dedent(text).strip("\n")] + [helper.strip("\n") for helper in helpers]
    return ("code", "\n\n\n".join(parts))


# Shared by several notebooks: the error measure of numres's test suite, and finite differences written out.
REL_ERROR = '''
def rel_error(a, b):
    """max|a - b| / max|b|, with b the trusted value: the error measure numres's tests use."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
'''

NUMERICAL_GRADIENT = '''
def numerical_gradient(f, a, h=1e-6):
    """dL/da by central differences, one entry at a time: (f(a + h) - f(a - h)) / 2h.

    f() takes no arguments and reads the array a, which is changed in place and restored."""
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        saved = a[index]
        a[index] = saved + h
        plus = f()
        a[index] = saved - h
        minus = f()
        a[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad
'''


# ------------------------------------------------------------------------------------------------
# 01: the convolution's backward
# ------------------------------------------------------------------------------------------------

CONV = [
    md(r"""
    # The convolution's backward pass, derived and checked

    numres has no autograd: every layer's gradient is written by hand. This notebook derives the
    gradient of a 2-D convolution from its forward pass, then checks it four ways:

    1. against **finite differences**, written out here in a few lines;
    2. with **`nr.gradcheck`**, the same check for any numres module;
    3. against **PyTorch's autograd**;
    4. against numres's fast **engine** (`numres.functional`), which computes the same sums in another order.

    The code under study is the textbook tier,
    [`numres/reference/conv.py`](../numres/reference/conv.py) (`conv2d_forward`, `conv2d_backward`).
    Its docstrings use the same symbols as this notebook. Everything runs in float64.

    To run it yourself: `pip install -e ".[notebooks]"` in the repository root, then `jupyter lab notebooks/`.
    """),
    code("""
    import numpy as np
    import torch
    import torch.nn.functional as TF

    import numres as nr
    import numres.functional as F       # the engine
    import numres.reference as R        # the textbook

    np.set_printoptions(precision=4, suppress=True)
    rng = np.random.default_rng(0)
    """, REL_ERROR),
    md(r"""
    ## 1. The forward pass as a sum over kernel offsets

    Shapes, NCHW as in PyTorch:

    | symbol | shape | |
    |---|---|---|
    | `x` | $(N, C, H, W)$ | input |
    | `W` | $(O, C, K_H, K_W)$ | weight (one group; with $G$ groups the second axis is $C/G$) |
    | `b` | $(O,)$ | bias |
    | `y` | $(N, O, O_H, O_W)$ | output |

    Pad `x` with zeros to get `x_pad`. With stride $(s_h, s_w)$ and dilation $(d_h, d_w)$, every output
    pixel $(p, q)$ is a dot product of the weight with one window of `x_pad`:

    $$y[n, o, p, q] = b[o] + \sum_{c} \sum_{i, j} W[o, c, i, j]\; x_{pad}[n, c,\; p s_h + i d_h,\; q s_w + j d_w].$$

    Fix one kernel offset $(i, j)$. The input pixels it reads, over all $(p, q)$, form a strided view
    of `x_pad`, called `x_shifted(i, j)` in the code (shape $(N, C, O_H, O_W)$). Flatten its pixels to
    $P = O_H O_W$ columns, $X_{ij}[n]$ of shape $(C, P)$, and write $W_{ij} = W[:, :, i, j]$ of shape
    $(O, C)$. The convolution is then one small matrix product per offset:

    $$y[n] = b + \sum_{i, j} W_{ij}\, X_{ij}[n] \qquad (O \times P).$$

    `R.conv2d_forward` is that loop over the $K_H K_W$ offsets.
    """),
    code("""
    N, C, H, W_ = 2, 3, 7, 7          # odd sizes on purpose
    O, KH, KW = 4, 3, 3
    stride, padding = 2, 1

    x = rng.standard_normal((N, C, H, W_))
    W = rng.standard_normal((O, C, KH, KW))
    b = rng.standard_normal(O)

    y, cache = R.conv2d_forward(x, W, b, stride=stride, padding=padding)
    OH, OW = y.shape[2:]
    print("x", x.shape, " W", W.shape, " b", b.shape, " ->  y", y.shape)
    """),
    md(r"""
    Before we differentiate it, confirm that the forward pass is the formula. Here the formula is
    evaluated literally, one output pixel at a time (slow, but there are only 128 pixels):
    """),
    code("""
    x_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y_loops = np.zeros_like(y)
    for n in range(N):
        for o in range(O):
            for p in range(OH):
                for q in range(OW):
                    window = x_pad[n, :, p * stride:p * stride + KH, q * stride:q * stride + KW]
                    y_loops[n, o, p, q] = b[o] + np.sum(W[o] * window)

    print(f"relative error of R.conv2d_forward against the formula: {rel_error(y, y_loops):.1e}")
    assert rel_error(y, y_loops) < 1e-14
    """),
    md(r"""
    ## 2. The backward pass, derived

    Some loss $L$ sits above the layer. The layers above hand down the upstream gradient
    $dy = \partial L / \partial y$, of the same shape as $y$. Here we draw it at random, so the loss
    is $L = \sum y \cdot dy$. (Never use all ones. [Notebook 02](02_batchnorm_backward.ipynb) shows
    which bugs that hides.)

    The chain rule sums over every output that an input touched:
    $\partial L / \partial v = \sum_{n,o,p,q} dy[n,o,p,q]\; \partial y[n,o,p,q] / \partial v$.
    Apply it to the formula above:

    **Bias.** $b[o]$ is added to every output pixel of channel $o$:

    $$db[o] = \sum_{n, p, q} dy[n, o, p, q].$$

    **Weight.** $W[o, c, i, j]$ multiplies `x_shifted(i, j)` at every output pixel of every image:

    $$dW[o, c, i, j] = \sum_{n, p, q} dy[n, o, p, q]\; x_{shifted}(i, j)[n, c, p, q]
    \quad\Longleftrightarrow\quad dW_{ij} = \sum_n dy[n]\, X_{ij}[n]^{\mathsf T}.$$

    **Input.** For one offset, $Y = W_{ij} X_{ij}$ is a matrix product, whose gradient with respect
    to the right factor is $W_{ij}^{\mathsf T} dY$. So

    $$dX_{ij}[n] = W_{ij}^{\mathsf T}\, dy[n] \qquad (C \times P).$$

    $X_{ij}$ is a *view* of `x_pad`, so its gradient is added back onto the pixels it was read from:
    `dx_pad[shifted(i, j)] += dX_ij`. A pixel read by several offsets (overlapping windows) collects
    a contribution from each of them, hence the `+=`. Finally `dx` is `dx_pad` without its frame: the
    zero padding is a constant, and its gradient is thrown away.

    Here are those three formulas in a few lines of NumPy (`einsum` spells out the matrix products):
    """),
    code("""
    dy = rng.standard_normal(y.shape)
    dy_flat = dy.reshape(N, O, OH * OW)                                # dy[n]: (O, P)

    db_hand = dy.sum(axis=(0, 2, 3))
    dW_hand = np.zeros_like(W)
    dx_pad = np.zeros_like(x_pad)
    for i in range(KH):
        for j in range(KW):
            rows = slice(i, i + stride * (OH - 1) + 1, stride)         # the pixels offset (i, j) reads
            cols = slice(j, j + stride * (OW - 1) + 1, stride)
            X_ij = x_pad[:, :, rows, cols].reshape(N, C, OH * OW)      # X_ij[n]: (C, P)
            dW_hand[:, :, i, j] = np.einsum("nop,ncp->oc", dy_flat, X_ij)          # sum_n dy[n] X_ij[n]^T
            dX_ij = np.einsum("oc,nop->ncp", W[:, :, i, j], dy_flat)               # W_ij^T dy[n]
            dx_pad[:, :, rows, cols] += dX_ij.reshape(N, C, OH, OW)                # scatter-add
    dx_hand = dx_pad[:, :, padding:-padding, padding:-padding]          # drop the zero frame
    print("dx", dx_hand.shape, " dW", dW_hand.shape, " db", db_hand.shape)
    """),
    md(r"""
    `R.conv2d_backward(dy, cache)` is the same loop, written once for any stride, padding, dilation and
    number of groups. It returns `(dx, dW, db)`:
    """),
    code("""
    dx, dW, db = R.conv2d_backward(dy, cache)

    for name, ours, hand in (("dx", dx, dx_hand), ("dW", dW, dW_hand), ("db", db, db_hand)):
        print(f"{name}: relative error against the lines above {rel_error(ours, hand):.1e}")
        assert rel_error(ours, hand) < 1e-14
    """),
    md(r"""
    ## 3. Check: central finite differences

    The derivative of $L$ with respect to one entry $v$ is approximately

    $$\frac{\partial L}{\partial v} \approx \frac{L(v + h) - L(v - h)}{2h},$$

    with an error of order $h^2$. Evaluate it for every entry of `x`, `W` and `b`: two forward passes
    per entry. We need float64. The rounding error of $L$ (about $10^{-16}$ of its size) is divided by
    $2h$, so with $h = 10^{-6}$ we can expect agreement to about $10^{-9}$ to $10^{-10}$. A wrong derivative
    is off by order 1.
    """),
    code(NUMERICAL_GRADIENT),
    code("""
    def loss():
        out, _ = R.conv2d_forward(x, W, b, stride=stride, padding=padding)
        return np.sum(out * dy)


    for name, array, analytic in (("x", x, dx), ("W", W, dW), ("b", b, db)):
        numeric = numerical_gradient(loss, array)
        error = rel_error(analytic, numeric)
        print(f"d{name}: {array.size:4d} entries, relative error against finite differences {error:.1e}")
        assert error < 1e-7
    """),
    md(r"""
    ## 4. Check: `nr.gradcheck` on a `Conv2d` module

    `nr.gradcheck(module, x)` runs the same central differences on any numres module: a layer, a block,
    a whole ResNet. It checks the input and every parameter, with a random upstream gradient, and prints
    a verdict. This time we use a harder convolution: two groups, dilation 2, stride 2 and an odd,
    non-square input.
    """),
    code("""
    nr.manual_seed(0)
    conv = nr.nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, dtype="float64")
    result = nr.gradcheck(conv, rng.standard_normal((2, 4, 9, 8)))
    print(conv)
    print(result)
    assert result.passed()
    """),
    md(r"""
    `gradcheck` refuses a float32 module. In float32 the rounding error of $L$ is about $10^{-7}$ of
    its size. Divided by $2h$, that swamps the derivative, so finite differences cannot tell a right
    backward pass from a wrong one:
    """),
    code("""
    try:
        nr.gradcheck(nr.nn.Conv2d(4, 6, 3, dtype="float32"), rng.standard_normal((1, 4, 5, 5)))
    except ValueError as error:
        print("ValueError:", error)
    """),
    md(r"""
    ## 5. Check: PyTorch's autograd

    PyTorch builds the backward pass of `torch.nn.functional.conv2d` for us. Give it the same `x`, `W`, `b`
    and `dy`, and compare all four arrays, for several shapes of convolution: a 1x1 stride-2 kernel
    (a ResNet shortcut), batch 1, groups and dilation. In float64 they agree to rounding error, far
    below the test suite's limit of $10^{-10}$.
    """),
    code("""
    def against_torch(x, W, b, **options):
        \"\"\"Relative errors of y, dx, dW, db of numres.reference against PyTorch autograd.\"\"\"
        y, cache = R.conv2d_forward(x, W, b, **options)
        dy = rng.standard_normal(y.shape)
        dx, dW, db = R.conv2d_backward(dy, cache)
        xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
        yt = TF.conv2d(xt, Wt, bt, **options)
        yt.backward(torch.tensor(dy))
        return [rel_error(ours, theirs.detach().numpy())
                for ours, theirs in ((y, yt), (dx, xt.grad), (dW, Wt.grad), (db, bt.grad))]


    cases = [
        ("3x3, stride 2, padding 1", (2, 3, 7, 7), (4, 3, 3, 3), dict(stride=2, padding=1)),
        ("3x3, stride 1, padding 1", (2, 3, 6, 5), (4, 3, 3, 3), dict(stride=1, padding=1)),
        ("1x1, stride 2 (shortcut)", (2, 8, 7, 7), (16, 8, 1, 1), dict(stride=2)),
        ("7x7, stride 2, padding 3, batch 1", (1, 3, 11, 11), (8, 3, 7, 7), dict(stride=2, padding=3)),
        ("3x3, groups 2, dilation 2", (2, 4, 9, 8), (6, 2, 3, 3), dict(padding=2, dilation=2, groups=2)),
    ]
    print(f"{'convolution':<36}{'y':>10}{'dx':>10}{'dW':>10}{'db':>10}")
    worst = 0.0
    for label, x_shape, w_shape, options in cases:
        errors = against_torch(rng.standard_normal(x_shape), rng.standard_normal(w_shape),
                               rng.standard_normal(w_shape[0]), **options)
        worst = max(worst, *errors)
        print(f"{label:<36}" + "".join(f"{e:10.1e}" for e in errors))
    print(f"worst relative error against PyTorch: {worst:.1e}")
    assert worst < 1e-10
    """),
    md(r"""
    The input gradient $dX_{ij} = W_{ij}^{\mathsf T} dy$, scattered back, is itself a convolution run
    backwards: a **transposed convolution** of `dy` with the same weights. That is where
    `ConvTranspose2d` gets its name. PyTorch's `conv_transpose2d` gives our `dx`:
    """),
    code("""
    dx_transposed = TF.conv_transpose2d(torch.tensor(dy), torch.tensor(W), stride=stride, padding=padding)
    print(f"dx against conv_transpose2d(dy, W): relative error {rel_error(dx, dx_transposed.numpy()):.1e}")
    assert rel_error(dx, dx_transposed.numpy()) < 1e-12
    """),
    md(r"""
    ## 6. Check: the engine

    `numres.functional.conv2d_forward` / `conv2d_backward` take the same arguments and return the same
    values, computed differently. The engine gathers every window into one patch matrix (im2col) and
    does one large matrix product. It keeps activations channels-last in memory, so its arrays have the
    NCHW shape but other strides. It builds the patch matrix a chunk of images at a time. Same sums,
    different order, so the results agree to rounding error.
    """),
    code("""
    y_fast, cache_fast = F.conv2d_forward(x, W, b, stride=stride, padding=padding)
    dx_fast, dW_fast, db_fast = F.conv2d_backward(dy, cache_fast)

    print("reference y: shape", y.shape, "strides", y.strides, "(NCHW in memory)")
    print("engine    y: shape", y_fast.shape, "strides", y_fast.strides, "(channels-last in memory)")
    for name, ref, fast in (("y", y, y_fast), ("dx", dx, dx_fast), ("dW", dW, dW_fast), ("db", db, db_fast)):
        print(f"{name:>2}: engine against reference, relative error {rel_error(fast, ref):.1e}")
        assert rel_error(fast, ref) < 1e-12
    """),
    md(r"""
    ## Summary

    | check | what it compares | result |
    |---|---|---|
    | formula | `R.conv2d_forward` against the sum, pixel by pixel | rounding error |
    | derivation | `R.conv2d_backward` against the three formulas in NumPy | rounding error |
    | finite differences | every entry of `x`, `W`, `b` | about 1e-9 (the limit of the method) |
    | `nr.gradcheck` | a grouped, dilated `nr.nn.Conv2d` | PASS |
    | PyTorch autograd | five shapes of convolution | rounding error, below 1e-10 |
    | engine | `numres.functional`, im2col + GEMM, channels-last | rounding error |

    Next: [02, BatchNorm's backward](02_batchnorm_backward.ipynb), where all four arrays depend on
    each other through the batch statistics.
    """),
    code("""
    print("all checks passed")
    """),
]


# ------------------------------------------------------------------------------------------------
# 02: BatchNorm's backward
# ------------------------------------------------------------------------------------------------

BATCHNORM = [
    md(r"""
    # BatchNorm's backward pass, in terms of $\hat{x}$

    In a convolution each output depends on a few inputs. In BatchNorm (training mode) every output of a
    channel depends on *every* input of that channel, through the batch mean and variance. This notebook
    derives the gradient, checks it against finite differences and PyTorch, and then shows why a test
    must never use an all-ones upstream gradient. With all ones, a BatchNorm backward with a term
    missing still looks right.

    The code under study: [`numres/reference/batchnorm.py`](../numres/reference/batchnorm.py)
    (`batchnorm_train_forward`, `batchnorm_backward`). Its docstring uses the symbols below.
    """),
    code("""
    import numpy as np
    import torch
    import torch.nn.functional as TF

    import numres as nr
    import numres.reference as R

    np.set_printoptions(precision=4, suppress=True)
    rng = np.random.default_rng(0)
    """, REL_ERROR),
    md(r"""
    ## 1. The forward pass, per channel

    For each channel $c$, take its $m = N H W$ values (sums run over axes `(0, 2, 3)`):

    $$\mu = \frac{1}{m}\sum x, \qquad \sigma^2 = \frac{1}{m}\sum (x - \mu)^2 \;\text{(biased)}, \qquad
    \texttt{invstd} = \frac{1}{\sqrt{\sigma^2 + \epsilon}},$$

    $$\hat{x} = (x - \mu)\cdot\texttt{invstd}, \qquad y = \gamma\,\hat{x} + \beta.$$

    In the code, $\gamma$ is `weight`, $\beta$ is `bias` and $\hat{x}$ is `xhat`. The running statistics
    are updated on the side, with the *unbiased* variance, as in PyTorch.
    """),
    code("""
    N, C, H, W = 4, 3, 5, 5
    m = N * H * W
    x = 3.0 + 2.0 * rng.standard_normal((N, C, H, W))       # not already normalised
    weight = rng.uniform(0.5, 1.5, C)                       # gamma: random, not 1
    bias = rng.uniform(-0.5, 0.5, C)                        # beta: random, not 0
    running_mean, running_var = np.zeros(C), np.ones(C)

    y, cache = R.batchnorm_train_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5)
    xhat, invstd = cache[0], cache[1]
    print(f"per channel: largest |mean of xhat| {np.abs(xhat.mean(axis=(0, 2, 3))).max():.0e},"
          f" std of xhat {xhat.std(axis=(0, 2, 3))}")
    print("running_mean:", running_mean, " running_var:", running_var)
    """),
    md(r"""
    ## 2. The backward pass, derived

    Write $g = \partial L/\partial y$ (the upstream gradient `dy`).

    **Step 1: the affine part.** $y = \gamma \hat{x} + \beta$, with $\gamma$ and $\beta$ shared by all $m$ values of the channel:

    $$d\beta = \sum g, \qquad d\gamma = \sum g\,\hat{x}, \qquad d\hat{x} = \gamma\, g.$$

    **Step 2: the Jacobian of the normalisation.** $\mu$ and $\sigma$ depend on every $x_k$ of the channel:

    $$\frac{\partial \mu}{\partial x_k} = \frac{1}{m}, \qquad
    \frac{\partial \sigma^2}{\partial x_k} = \frac{2(x_k - \mu)}{m}, \qquad
    \frac{\partial\, \texttt{invstd}}{\partial x_k} = -\tfrac12 (\sigma^2+\epsilon)^{-3/2}\,\frac{2(x_k - \mu)}{m}
    = -\frac{\texttt{invstd}^2\, \hat{x}_k}{m}.$$

    Then, from $\hat{x}_j = (x_j - \mu)\,\texttt{invstd}$ with the product rule:

    $$\frac{\partial \hat{x}_j}{\partial x_k} = \texttt{invstd}\Big([j = k] - \frac{1}{m}\Big) + (x_j - \mu)\frac{\partial\,\texttt{invstd}}{\partial x_k}
    = \texttt{invstd}\Big([j = k] - \frac{1}{m} - \frac{\hat{x}_j \hat{x}_k}{m}\Big).$$

    **Step 3: the chain rule**, $dx_k = \sum_j d\hat{x}_j \, \partial \hat{x}_j / \partial x_k$:

    $$dx = \texttt{invstd}\,\Big(d\hat{x} - \frac{1}{m}\sum d\hat{x} - \hat{x}\,\frac{1}{m}\sum d\hat{x}\,\hat{x}\Big)
    = \gamma\,\texttt{invstd}\,\Big(g - \frac{d\beta}{m} - \hat{x}\,\frac{d\gamma}{m}\Big).$$

    The second form reuses the parameter gradients already computed: three sums per channel, one pass.

    **What it means.** $dx$ is $d\hat{x}$ with two components removed: its mean, and its component
    along $\hat{x}$. These are exactly the two directions in which $\hat{x}$ cannot move, because $\hat{x}$
    always has mean 0 and (up to $\epsilon$) variance 1, whatever $x$ is. So $\sum dx = 0$ exactly and
    $\sum dx\,\hat{x} \approx 0$ in every channel (not exactly 0, because of $\epsilon$: the variance of
    $\hat{x}$ is $\sigma^2/(\sigma^2+\epsilon)$, a hair below 1).
    """),
    code("""
    dy = rng.standard_normal(y.shape)
    dx, dweight, dbias = R.batchnorm_backward(dy, cache)

    print("dx", dx.shape, " dweight", dweight.shape, " dbias", dbias.shape)
    print(f"per channel, largest |sum(dx)|        = {np.abs(dx.sum(axis=(0, 2, 3))).max():.0e}"
          f"   (sum |dx|        = {np.abs(dx).sum():.1f})")
    print(f"per channel, largest |sum(dx * xhat)| = {np.abs((dx * xhat).sum(axis=(0, 2, 3))).max():.0e}"
          f"   (sum |dx * xhat| = {np.abs(dx * xhat).sum():.1f})")
    """),
    md(r"""
    ### The same gradient, one node at a time

    Another way to get $dx$, the way CS231n's assignment does it: cut the forward pass into elementary
    steps ($\mu$, $x-\mu$, $\sigma^2$, `invstd`, $\hat{x}$) and backpropagate through each step in reverse.
    It is longer and it stores more, but every line is a one-step derivative. It must equal the compact
    formula:
    """),
    code("""
    eps = 1e-5
    axes = dict(axis=(0, 2, 3), keepdims=True)
    gamma = weight[None, :, None, None]
    # forward, node by node
    mu = x.mean(**axes)
    xc = x - mu
    var = (xc ** 2).mean(**axes)
    istd = 1.0 / np.sqrt(var + eps)
    xh = xc * istd
    # backward, node by node, in reverse
    dxh = dy * gamma                                  # y = gamma * xh + beta
    distd = (dxh * xc).sum(**axes)                    # xh = xc * istd
    dxc = dxh * istd
    dvar = distd * -0.5 * (var + eps) ** -1.5         # istd = (var + eps)^(-1/2)
    dxc += dvar * 2.0 * xc / m                        # var = mean(xc^2)
    dmu = -dxc.sum(**axes)                            # xc = x - mu
    dx_staged = dxc + dmu / m                         # mu = mean(x)

    print(f"node-by-node dx against the compact formula: relative error {rel_error(dx_staged, dx):.1e}")
    assert rel_error(dx_staged, dx) < 1e-12
    """),
    md(r"""
    ## 3. Check: central finite differences

    Perturb every entry of `x`, `weight` and `bias` by $\pm h$ and difference the loss $L = \sum y\cdot dy$.
    Perturbing one $x_k$ moves the batch mean and variance too, so this checks the whole Jacobian of step 2.
    (The forward pass inside the loss gets `None` for the running statistics, so they are not updated
    hundreds of times.)
    """),
    code(NUMERICAL_GRADIENT),
    code("""
    def loss(upstream):
        out, _ = R.batchnorm_train_forward(x, weight, bias, None, None)
        return np.sum(out * upstream)


    for name, array, analytic in (("x", x, dx), ("weight", weight, dweight), ("bias", bias, dbias)):
        numeric = numerical_gradient(lambda: loss(dy), array)
        error = rel_error(analytic, numeric)
        print(f"d{name:<6}: {array.size:3d} entries, relative error against finite differences {error:.1e}")
        assert error < 1e-7
    """),
    md(r"""
    ## 4. Check: PyTorch's autograd

    `torch.nn.functional.batch_norm` in training mode, in float64, with the same data, parameters and
    upstream gradient. Compare the output, the three gradients and the updated running statistics.
    PyTorch updates `running_var` with the unbiased variance ($\times\, m/(m-1)$), and so does numres.
    """),
    code("""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(weight, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    rm_t, rv_t = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    yt = TF.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))

    pairs = [("y", y, yt), ("dx", dx, xt.grad), ("dweight", dweight, wt.grad), ("dbias", dbias, bt.grad),
             ("running_mean", running_mean, rm_t), ("running_var", running_var, rv_t)]
    for name, ours, theirs in pairs:
        error = rel_error(ours, theirs.detach().numpy())
        print(f"{name:>12}: relative error against PyTorch {error:.1e}")
        assert error < 1e-10
    """),
    md(r"""
    ## 5. Why an all-ones upstream gradient hides bugs

    A tempting test is `dx = bn.backward(np.ones_like(y))`, then compare with finite differences. An
    upstream gradient of all ones is the gradient of $L = \sum y$. For BatchNorm that loss is

    $$\sum y = \sum_c \Big(\gamma_c \sum \hat{x} + m\,\beta_c\Big) = m \sum_c \beta_c,$$

    because $\hat{x}$ sums to zero in every channel. **$L$ does not depend on $x$ at all.** So the true
    $dx$ is exactly zero, and so is $d\gamma = \sum \hat{x}$. A test with all ones asks the backward pass to
    produce zeros, and any formula whose extra terms vanish for a constant $g$ produces them too.
    """),
    code("""
    ones = np.ones_like(y)
    x_other = rng.standard_normal(x.shape)
    print(f"sum(BN(x)) = {np.sum(R.batchnorm_train_forward(x, weight, bias, None, None)[0]):.10f}")
    print(f"sum(BN(x_other)) = {np.sum(R.batchnorm_train_forward(x_other, weight, bias, None, None)[0]):.10f}")
    print(f"m * sum(bias)    = {m * bias.sum():.10f}")
    dx_ones, dweight_ones, _ = R.batchnorm_backward(ones, cache)
    print(f"with all ones, max|dx| = {np.abs(dx_ones).max():.1e}, max|dweight| = {np.abs(dweight_ones).max():.1e}")
    """),
    md(r"""
    Now three broken backward passes, each a mistake that is easy to make:

    * **`forgets_variance`** treats $\sigma$ as a constant and keeps only the mean's term:
      $dx = \texttt{invstd}\,(d\hat{x} - \frac1m\sum d\hat{x})$. The $\hat{x}\,\frac1m\sum d\hat{x}\,\hat{x}$ term is missing.
    * **`forgets_invstd`** computes the weight gradient from $x - \mu$ instead of $\hat{x}$:
      $d\gamma = \sum g\,(x - \mu)$.
    * **`eval_formula`** treats both $\mu$ and $\sigma$ as constants: $dx = \gamma\,\texttt{invstd}\,g$. That
      is the evaluation-mode gradient, used by mistake in training mode. Both mean terms are missing.

    Each is judged the way a unit test would judge it: `np.allclose(analytic, numeric, rtol=1e-5, atol=1e-6)`
    against finite differences, for $dx$ and $d\gamma$, with an all-ones upstream gradient and with a random one.
    """),
    code("""
    def correct(g, cache):
        return R.batchnorm_backward(g, cache)[:2]


    def forgets_variance(g, cache):
        xhat, invstd, weight = cache[:3]
        dxhat = g * weight[None, :, None, None]
        dx = invstd[None, :, None, None] * (dxhat - dxhat.mean(axis=(0, 2, 3), keepdims=True))
        return dx, (g * xhat).sum(axis=(0, 2, 3))


    def forgets_invstd(g, cache):
        dx, _, _ = R.batchnorm_backward(g, cache)
        return dx, (g * (x - x.mean(axis=(0, 2, 3), keepdims=True))).sum(axis=(0, 2, 3))


    def eval_formula(g, cache):
        xhat, invstd, weight = cache[:3]
        dx = g * (weight * invstd)[None, :, None, None]
        return dx, (g * xhat).sum(axis=(0, 2, 3))


    def agrees(backward, upstream):
        \"\"\"Does this backward pass the unit test, for this upstream gradient?\"\"\"
        _, cache = R.batchnorm_train_forward(x, weight, bias, None, None)
        dx, dweight = backward(upstream, cache)
        numeric_dx = numerical_gradient(lambda: loss(upstream), x)
        numeric_dweight = numerical_gradient(lambda: loss(upstream), weight)
        return (np.allclose(dx, numeric_dx, rtol=1e-5, atol=1e-6)
                and np.allclose(dweight, numeric_dweight, rtol=1e-5, atol=1e-6))


    verdicts = {}
    print(f"{'backward':<18}{'upstream all ones':>20}{'upstream random':>18}")
    for backward in (correct, forgets_variance, forgets_invstd, eval_formula):
        verdicts[backward.__name__] = (agrees(backward, ones), agrees(backward, dy))
        print(f"{backward.__name__:<18}" + "".join(f"{'passes' if ok else 'FAILS':>{w}}"
                                                   for ok, w in zip(verdicts[backward.__name__], (20, 18))))
    """),
    md(r"""
    With all ones, two of the three broken versions pass. What each of them gets wrong is proportional to
    $\sum g\,\hat{x}$: the missing term $\hat{x}\,\frac{\gamma}{m}\sum g\,\hat{x}$ in `forgets_variance`, and
    $\sum g\,(x - \mu) - \sum g\,\hat{x} = (\sqrt{\sigma^2 + \epsilon} - 1)\sum g\,\hat{x}$ in `forgets_invstd`.
    That sum is zero in every channel when $g$ is constant. Only the crudest bug, `eval_formula`, is caught, because it gives a non-zero $dx$ where the
    truth is zero. A random upstream gradient catches all three.
    """),
    code("""
    assert verdicts["correct"] == (True, True)
    assert verdicts["forgets_variance"] == (True, False)      # hidden by all ones
    assert verdicts["forgets_invstd"] == (True, False)        # hidden by all ones
    assert verdicts["eval_formula"] == (False, False)
    print("all ones hid 2 of 3 broken backward passes; a random upstream gradient caught all 3")
    """),
    md(r"""
    This is why numres's tests (see "Testing conventions" in `DESIGN.md`) always draw the upstream
    gradient at random, and the BatchNorm weight and bias too: the default $\gamma = 1$, $\beta = 0$ hides
    other mistakes in the same way.

    ## Summary

    * $dx = \gamma\,\texttt{invstd}\,(g - d\beta/m - \hat{x}\,d\gamma/m)$: $d\hat{x}$ without its mean and its
      component along $\hat{x}$.
    * It agrees with the node-by-node backward pass, with finite differences (about 1e-9) and with
      PyTorch (rounding error), running statistics included.
    * With an all-ones upstream gradient the true $dx$ is zero, and broken formulas pass.

    The engine ([`numres/functional/batchnorm.py`](../numres/functional/batchnorm.py)) computes the same
    gradient written in terms of $x$, without storing $\hat{x}$, in tiles on all cores. Next:
    [03, a Bottleneck's backward and the gradient flow of deep nets](03_bottleneck_gradient_flow.ipynb).
    """),
    code("""
    print("all checks passed")
    """),
]


# ------------------------------------------------------------------------------------------------
# 03: a Bottleneck's backward, then plain56 against resnet56
# ------------------------------------------------------------------------------------------------

BOTTLENECK = [
    md(r"""
    # One Bottleneck's backward pass, gradient by gradient, then whole networks

    The Bottleneck is ResNet-50's building block. This notebook runs one forward pass and one backward
    pass through it layer by layer, by hand, with numres's modules. It prints every gradient's shape and
    norm, and shows the "+1" of the shortcut: the gradient that reaches the block's input is the residual
    branch's gradient **plus** the gradient of the identity. Then it measures what that "+1" does over
    56 layers, plain56 against resnet56.

    The block's code: `Bottleneck` in [`numres/models/resnet.py`](../numres/models/resnet.py). The
    [walk-through](../docs/walkthrough.md) follows the same block with a downsampling shortcut.
    """),
    code("""
    import numpy as np
    import matplotlib.pyplot as plt

    import numres as nr

    np.set_printoptions(precision=4, suppress=True)
    rng = np.random.default_rng(0)


    def norm(a):
        return float(np.sqrt(np.sum(np.asarray(a, dtype=np.float64) ** 2)))
    """),
    md(r"""
    ## 1. The block

    A Bottleneck with 32 input channels and `planes = 8`: 1x1 down to 8 channels, 3x3, 1x1 back up to
    $8 \times 4 = 32$. The channel counts match, so the shortcut is the identity:

    ```
            x (2, 32, 7, 7) ---------------------------.
              conv1 1x1 32->8, bn1, ReLU               |
              conv2 3x3  8->8, bn2, ReLU               |  identity
              conv3 1x1  8->32, bn3                    |
              |                                        |
              +  <-------------------------------------'     z = F(x) + x
              ReLU                                           y = relu(z)
    ```

    Float64, training mode (batch statistics). The BatchNorm weights and biases are drawn at random, not
    left at 1 and 0, so that no check passes by luck.
    """),
    code("""
    nr.manual_seed(0)
    block = nr.Bottleneck(32, 8, dtype="float64").train()
    for bn in (block.bn1, block.bn2, block.bn3):
        bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.weight.data.shape)
        bn.bias.data[...] = rng.uniform(-0.5, 0.5, bn.bias.data.shape)
    x = rng.standard_normal((2, 32, 7, 7))
    print(block)
    """),
    md(r"""
    ## 2. Forward, one layer at a time

    These lines are `Bottleneck.forward`, written out. Each module keeps in its cache what its backward
    pass will need. (`bn(a, relu=True)` is BatchNorm followed by a ReLU, fused into one module call.)
    """),
    code("""
    a1 = block.conv1(x)
    h1 = block.bn1(a1, relu=True)
    a2 = block.conv2(h1)
    h2 = block.bn2(a2, relu=True)
    a3 = block.conv3(h2)
    f = block.bn3(a3)                  # F(x), the residual branch
    z = f + x                          # the shortcut: + x
    y = np.maximum(z, 0)

    print(f"{'step':<22}{'output shape':>16}{'norm':>10}")
    for name, value in (("input x", x), ("conv1 1x1 32->8", a1), ("bn1 + ReLU", h1), ("conv2 3x3", a2),
                        ("bn2 + ReLU", h2), ("conv3 1x1 8->32", a3), ("bn3 = F(x)", f), ("z = F(x) + x", z),
                        ("y = relu(z)", y)):
        print(f"{name:<22}{str(value.shape):>16}{norm(value):10.3f}")
    """),
    md(r"""
    ## 3. Backward, one gradient at a time

    Take a random upstream gradient $r = \partial L/\partial y$, so $L = \sum y \cdot r$. Then run the forward
    pass in reverse:

    1. **The final ReLU**: $dz = r \cdot [y > 0]$.
    2. **The sum** $z = F(x) + x$: the derivative of a sum with respect to each term is 1, so $dz$ goes
       unchanged into *both* the residual branch ($df = dz$) and the identity.
    3. **The branch**: `bn3`, `conv3`, `bn2` (with its ReLU's mask), `conv2`, `bn1`, `conv1`. Each module's
       `backward` takes the gradient of its output, returns the gradient of its input, and adds its
       parameters' gradients into `p.grad`.
    4. **The fork at x**: $x$ fed both the branch and the identity, so its gradient is the sum of the two.
    """),
    code("""
    r = rng.standard_normal(y.shape)
    dz = r * (y > 0)                                          # 1. the final ReLU
    print(f"{'backward step':<16}{'grad arriving':>16}{'norm':>9}{'grad leaving':>16}{'norm':>9}{'|d weight|':>12}")
    grad = dz                                                 # 2. df = dz
    for name in ("bn3", "conv3", "bn2", "conv2", "bn1", "conv1"):  # 3. the branch, in reverse
        layer = getattr(block, name)
        leaving = layer.backward(grad)
        print(f"{name:<16}{str(grad.shape):>16}{norm(grad):9.3f}{str(leaving.shape):>16}{norm(leaving):9.3f}"
              f"{norm(layer.weight.grad):12.3f}")
        grad = leaving
    dx_branch = grad
    dx_identity = dz                                          # the identity's Jacobian is I
    dx = dx_branch + dx_identity                              # 4. the fork at x
    print(f"\\n|dz| = {norm(dz):.3f} (ReLU passed {np.mean(y > 0):.0%} of the entries)")
    print(f"|dx through the branch| = {norm(dx_branch):.3f}   |dx through the identity| = {norm(dx_identity):.3f}"
          f"   |dx| = {norm(dx):.3f}")
    """),
    md(r"""
    ## 4. The "+1"

    Before the final ReLU the block computes $z = F(x) + x$, so its Jacobian is

    $$\frac{\partial z}{\partial x} = F'(x) + I, \qquad dx = F'(x)^{\mathsf T} dz + dz.$$

    The second term is a copy of $dz$ that passed through no layer at all: however small or large the
    branch's $F'(x)$ is, the block's input receives the gradient of its output. A plain block (no shortcut)
    would give only the first term.

    `block.backward` must give exactly what we assembled by hand. Compare the input gradient and every
    parameter gradient, then confirm the whole block with `nr.gradcheck` (finite differences on a random
    sample of entries):
    """),
    code("""
    hand_grads = {name: p.grad.copy() for name, p in block.named_parameters()}
    block.zero_grad()
    y_block = block(x)
    dx_block = block.backward(r)

    print(f"max |y (block) - y (by hand)|   = {np.abs(y_block - y).max():.1e}")
    print(f"max |dx (block) - (dx_branch + dz)| = {np.abs(dx_block - dx).max():.1e}")
    worst = max(np.abs(p.grad - hand_grads[name]).max() for name, p in block.named_parameters())
    print(f"max difference over the {len(hand_grads)} parameter gradients = {worst:.1e}")
    assert np.abs(y_block - y).max() < 1e-12 and np.abs(dx_block - dx).max() < 1e-12 and worst < 1e-12

    result = nr.gradcheck(block, x, max_entries=20)
    print(result)
    assert result.passed()
    """),
    md(r"""
    One way to see the "+1" on its own: switch the branch off. torchvision's `zero_init_residual=True`
    sets each block's last BatchNorm weight ($\gamma$ of `bn3`) to zero. Then $F(x) = \beta_3$ is constant,
    $F'(x) = 0$, and the block's input gradient is *exactly* the identity's share, $dx = dz$. In a ResNet
    initialised like this, every block with an identity shortcut starts out as $\mathrm{relu}(x + \beta_3)$,
    and hands the gradient of its output to its input through nothing but the ReLU's mask.
    """),
    code("""
    block.bn3.weight.data[...] = 0.0
    y0 = block(x)
    dz0 = r * (y0 > 0)
    dx0 = block.backward(r)
    print(f"gamma_3 = 0:  |dx| = {norm(dx0):.4f},  |dz| = {norm(dz0):.4f},  max|dx - dz| = {np.abs(dx0 - dz0).max():.1e}")
    assert np.abs(dx0 - dz0).max() < 1e-12
    """),
    md(r"""
    ## 5. Whole networks: plain56 against resnet56

    For a stack of layers $f = f_L \circ \dots \circ f_1$, the gradient reaching layer $k$ is a product of
    Jacobians,

    $$\frac{\partial L}{\partial x_k} = J_{k+1}^{\mathsf T} \cdots J_L^{\mathsf T}\, \frac{\partial L}{\partial x_L},$$

    so its norm can shrink or grow **geometrically** with depth. In a ResNet each factor is $I + F_k'$,
    not $F_k'$. Multiplied out, the product is a sum over paths, and one of those paths is the identity
    all the way down.

    `nr.study.gradflow_experiment` builds the CIFAR nets of He et al. (2015), plain56 and resnet56, for
    the 8x8 digits that ship with numres. It puts backward hooks on every convolution and every block,
    and runs one forward and backward pass at initialisation: the same seed, the same batch, training
    mode, float32. `numres study gradflow` is the same experiment on the command line.
    """),
    code("""
    flows = nr.study.gradflow_experiment(depth=56, batch_size=64, seed=0)
    for name, flow in flows.items():
        s = nr.study.flow_summary(flow)
        print(f"{name:>9}: {len(flow)} layers, {len(flow.blocks)} blocks, loss {s['loss']:.3f}")
        print(f"{'':>11}|dL/dx| at the first block {s['first_block_grad_norm']:.3g}, at the last "
              f"{s['last_block_grad_norm']:.3g}: x{s['blocks_first_over_last']:.3g} over the net, "
              f"x{s['per_block_factor']:.3f} per block")
    """),
    code("""
    %matplotlib inline
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), dpi=80)
    for (name, flow), style in zip(flows.items(), ("o-", "s-")):
        left.semilogy(np.arange(1, len(flow) + 1), flow.column("input_grad_norm"), style, markersize=3, label=name)
        right.semilogy(np.arange(1, len(flow.blocks) + 1), list(flow.blocks.values()), style, markersize=4,
                       label=name)
    left.set(title="each layer's input gradient |dL/d input|", xlabel="layer (1 = first conv, last = fc)")
    right.set(title="gradient at each block's input (shortcut included)", xlabel="block (forward order)")
    for axis in (left, right):
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    figure.tight_layout()
    plt.show()
    """),
    md(r"""
    **What the numbers show.** With BatchNorm, the plain net's gradient does not vanish towards the input.
    It **grows**, by about the same factor at every block, over three orders of magnitude from the
    classifier down to the first block. An SGD step that suits the last layers is then far too large
    for the first ones. In resnet56 the gradient changes much less per block, because each block's
    Jacobian is $I + F'(x)$ rather than a bare $F'(x)$. The left panel zigzags for resnet56 because a
    convolution's input gradient inside a block is only the branch's share. The right panel shows the
    whole gradient at each block's input, shortcut included.
    """),
    code("""
    plain, residual = (nr.study.flow_summary(flows[name]) for name in ("plain56", "resnet56"))
    print(f"growth from the last block to the first: plain56 x{plain['blocks_first_over_last']:.0f}, "
          f"resnet56 x{residual['blocks_first_over_last']:.0f}")
    assert plain["blocks_first_over_last"] > 10 * residual["blocks_first_over_last"]
    assert plain["per_block_factor"] > residual["per_block_factor"]
    print("all checks passed")
    """),
    md(r"""
    ## Summary

    * A Bottleneck's backward pass is its forward pass in reverse. Each module returns the gradient of
      its input and accumulates its parameters' gradients. At the fork, the input gradient is
      **branch + identity**.
    * Assembled by hand, the gradients equal `block.backward`. `nr.gradcheck` confirms them with finite
      differences.
    * Over 56 layers the "+1" is the difference between a gradient that is multiplied by a factor of
      about 1.3 at every block (plain56) and one that stays within a factor of about 1.1 (resnet56).

    For the training curves that follow from this (the degradation problem), see `numres study degradation`
    and the [walk-through](../docs/walkthrough.md).
    """),
]


# ------------------------------------------------------------------------------------------------
# 04: a ResNet-18 training step on the textbook against the engine
# ------------------------------------------------------------------------------------------------

REFERENCE_MODE = [
    md(r"""
    # A ResNet-18 training step: the textbook against the engine

    numres has two tiers with the same function names and signatures. The textbook,
    [`numres.reference`](../numres/reference/__init__.py), is plain NumPy with derivations in the
    docstrings. The engine, `numres.functional`, uses im2col and GEMM, channels-last memory, cache-sized
    tiles on all cores, and BatchNorm fused with ReLU. Inside `with nr.reference_mode():` every layer of
    any model runs on the textbook, forward and backward, including the residual joins.

    This notebook runs one training step of ResNet-18 both ways, from the same weights, and compares the
    logits, every parameter gradient and the BatchNorm running statistics. Then it times the two.
    **The timings depend on the machine that ran this notebook, and on its load, and change from run to
    run.** The other outputs do not.
    """),
    code("""
    import copy
    import time

    import numpy as np

    import numres as nr

    rng = np.random.default_rng(0)
    """, REL_ERROR),
    md(r"""
    One model, and a deep copy of it for the textbook. The BatchNorm weights and biases are drawn at
    random rather than left at 1 and 0 ([notebook 02](02_batchnorm_backward.ipynb) shows what the
    defaults can hide).
    """),
    code("""
    nr.manual_seed(0)
    engine_model = nr.resnet18(num_classes=10, dtype="float64").train()
    for bn in engine_model.modules():
        if isinstance(bn, nr.nn.BatchNorm2d):
            bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.num_features)
            bn.bias.data[...] = rng.uniform(-0.5, 0.5, bn.num_features)
    textbook_model = copy.deepcopy(engine_model)           # the same weights
    x = rng.standard_normal((4, 3, 32, 32))
    target = rng.integers(0, 10, size=4)
    criterion = nr.nn.CrossEntropyLoss(dtype="float64")


    def train_step(model):
        \"\"\"Forward, loss and backward; returns the logits and the loss.\"\"\"
        logits = model(x)
        loss = criterion(logits, target)
        model.backward(criterion.backward())
        return logits, float(loss)


    logits_engine, loss_engine = train_step(engine_model)
    with nr.reference_mode():
        logits_textbook, loss_textbook = train_step(textbook_model)
    """),
    md(r"""
    Compare every array: the logits, the gradient of each of the 62 parameters and the 40 updated running
    statistics. In float64 the two tiers agree to rounding error, within the test suite's limit of $10^{-10}$.
    """),
    code("""
    errors = {"logits": rel_error(logits_textbook, logits_engine)}
    for (name, p), q in zip(engine_model.named_parameters(), textbook_model.parameters()):
        errors[name + ".grad"] = rel_error(q.grad, p.grad)
    engine_buffers, textbook_buffers = engine_model.state_dict(), textbook_model.state_dict()
    for name in engine_buffers:
        if name.endswith(("running_mean", "running_var")):
            errors[name] = rel_error(textbook_buffers[name], engine_buffers[name])

    worst = max(errors, key=errors.get)
    print(f"loss: engine {loss_engine:.12f}, textbook {loss_textbook:.12f}")
    print(f"{len(errors)} arrays compared; worst relative error {errors[worst]:.1e} ({worst})")
    assert errors[worst] < 1e-10
    """),
    md(r"""
    ## Timing

    The best of three training steps for each, on one core: one BLAS thread and one numres thread for
    both tiers. That way the times compare the two algorithms, not thread counts. On a shared machine
    it also keeps BLAS threads from fighting over busy cores, which can slow a large GEMM several times
    over. This is machine-dependent output: the settings in force, the BLAS library, then the times.
    """),
    code("""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
        one_blas_thread = threadpool_limits(1, user_api="blas")
    except ImportError:                                   # pip install threadpoolctl to pin BLAS to one thread
        print("threadpoolctl is not installed: BLAS keeps its own thread count")
        one_blas_thread = contextlib.nullcontext()


    def best_of(model, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            train_step(model)
            times.append(time.perf_counter() - start)
        return min(times)


    with one_blas_thread, nr.using_config(num_threads=1):
        nr.config.show()
        seconds_engine = best_of(engine_model)
        with nr.reference_mode():
            seconds_textbook = best_of(textbook_model)
    print("\\none train step, ResNet-18, batch 4, 32x32, float64, one core (best of 3):")
    print(f"  engine   {seconds_engine * 1000:8.0f} ms")
    print(f"  textbook {seconds_textbook * 1000:8.0f} ms   (textbook / engine = {seconds_textbook / seconds_engine:.2f})")
    """),
    md(r"""
    The two tiers compute the same math; the engine only changes the order of the sums and where the
    numbers sit in memory. How much faster that makes it depends on the size of the layer and on the
    machine, and at this toy size (batch 4, 32x32) fixed overheads weigh heavily.
    `benchmarks/ladder.py` takes one realistic ResNet-50 layer from the textbook to the engine, one
    optimisation at a time, and measures each step.
    """),
]


NOTEBOOKS = {
    "01_conv_backward.ipynb": CONV,
    "02_batchnorm_backward.ipynb": BATCHNORM,
    "03_bottleneck_gradient_flow.ipynb": BOTTLENECK,
    "04_reference_mode_resnet18.ipynb": REFERENCE_MODE,
}


def build(name: str):
    """The notebook ``name`` as an nbformat node, without outputs; cell ids are fixed (``cell-01``...)."""
    import nbformat
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook.metadata["language_info"] = {"name": "python"}
    for index, (kind, source) in enumerate(NOTEBOOKS[name], start=1):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell["id"] = f"cell-{index:02d}"
        notebook.cells.append(cell)
    return notebook


def execute(notebook, cwd: str, timeout: int = 300):
    """Run every cell in a fresh python3 kernel with ``cwd`` as the working directory; raises on a cell error."""
    from nbclient import NotebookClient
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": cwd}})
    client.execute()
    _merge_streams(notebook)
    return notebook


def _merge_streams(notebook) -> None:
    """Join each cell's consecutive stdout (or stderr) outputs into one: how the kernel splits a cell's
    printing into messages depends on timing, and the written file should not."""
    for cell in notebook.cells:
        merged = []
        for output in cell.get("outputs", []):
            if (output.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1]["name"] == output["name"]):
                merged[-1]["text"] += output["text"]
            else:
                merged.append(output)
        if "outputs" in cell:
            cell["outputs"] = merged


def main(argv=None) -> int:
    import nbformat
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="build only the notebooks whose file name contains one of these")
    parser.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    parser.add_argument("--out", default=HERE, help="folder to write into (default: this one)")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(part in n for part in args.only)]
    if not names:
        print(f"no notebook matches {args.only}; the notebooks are {', '.join(NOTEBOOKS)}", file=sys.stderr)
        return 2
    for name in names:
        notebook = build(name)
        if not args.no_execute:
            start = time.perf_counter()
            execute(notebook, HERE)
            print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
        nbformat.write(notebook, os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
