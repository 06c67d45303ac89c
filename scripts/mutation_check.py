#!/usr/bin/env python
"""Mutation check of numres's backward functions: how many small, realistic mistakes do the tests catch?

Each *mutant* is one small change to one backward function (of ``numres/functional/`` by default, or of
any ``--package-dir`` such as ``numres/reference``).  For each mutant the relevant fast tests run; the
mutant is *killed* when a test fails, and *survives* when they all pass.  The kill rate is
``killed / (killed + survived)``; every survivor is listed with its file, function, line and change.

Mutation list (the AST rules; each applies at every matching place inside the function, nested
functions and lambdas included, docstrings, ``raise`` and ``assert`` statements and f-strings excluded):

=============  ======================================================================================
kind           change
=============  ======================================================================================
scale          a returned or yielded gradient times 1.001 (each entry of a returned tuple; each argument
               when the function returns through a helper defined inside it); ``None`` stays ``None``, and a
               tuple returned by a call is scaled entry by entry
arith          ``+`` <-> ``-``, ``*`` <-> ``/`` (also in ``+=``, ``-=``, ``*=``, ``/=``)
drop-term      ``a + b`` -> ``a`` or ``b``; ``a - b`` -> ``a`` (a dropped term, e.g. BatchNorm's mean term);
               ``a * b`` -> ``a`` or ``b`` (a dropped factor); ``a / b`` -> ``a`` (a dropped normalisation)
delete         a statement removed: an augmented assignment (``out += c``), an assignment into an array
               (``frame[...] = 0``) or a bare call (``xp.multiply(..., out=out)``)
unary          ``-a`` -> ``a``; ``~a`` -> ``a``
compare        ``>`` <-> ``>=``, ``<`` <-> ``<=``, ``==`` <-> ``!=``
mask           a comparison (not an ``if`` test) -> ``True``: a missing mask, e.g. ReLU's ``y > 0``
bool           ``a & b`` -> ``a`` or ``b``; ``&`` <-> ``|`` (e.g. max pooling's first-maximum tie-break)
axis           ``axis=k`` -> ``k + 1`` and ``k - 1``; in ``axis=(i, j, ...)`` one entry -> an axis not in it
transpose      ``a.T`` -> ``a``; ``a @ b`` -> ``a @ b.T`` and ``a.T @ b``; ``.transpose(...)`` with two
               neighbouring axes swapped (a transposed weight)
slice          ``a[lo:hi]`` -> ``a[lo + 1:hi]``, ``a[lo:hi + 1]``, ``a[lo:hi - 1]`` (an off-by-one, e.g. in a
               padding crop)
index          ``a[0]`` <-> ``a[1]`` (height and width swapped, e.g. ``padding[0]``)
constant       a number in arithmetic or a comparison: an int ``k`` -> ``k + 1`` and ``k - 1``, a float
               ``c`` -> ``c * 1.001``
=============  ======================================================================================

A mutant whose source equals the original, or equals an earlier mutant, is not generated (a no-op
cannot be killed and is not counted).  A mutant matched by ``EQUIVALENT_RULES`` below (with the reason it
changes nothing observable) is reported as equivalent and left out of the kill rate.

How it runs.  The repository's files (``git ls-files`` plus untracked, not-ignored files) are copied
into a temporary folder, and a worker Python runs there with ``PYTHONPATH`` set to the copy (it checks
that ``numres.__file__`` lies in the copy).  No file is changed, not even in the copy: the worker
imports numres, torch and pytest once, then for each mutant forks a child that compiles the mutated
function and swaps it into the live function object (``function.__code__``, which every caller and
alias shares) and runs ``pytest -x -q -p no:cacheprovider`` on that function's test selection
(``SELECTIONS``), under a per-mutant timeout (a timeout counts as killed).  The test that kills a
mutant is re-run on the original code; a test that fails there too is deselected for the rest of
the run and the mutant is run again, so a test broken for other reasons kills nothing.
``--isolation process`` instead writes the mutated file into the copy and starts a fresh pytest.

Usage::

    python scripts/mutation_check.py                          # numres/functional, every mutant
    python scripts/mutation_check.py --package-dir numres/reference
    python scripts/mutation_check.py --list                   # the mutants, not run
    python scripts/mutation_check.py --max-mutants 100 --seed 0 --jobs 2
    python scripts/mutation_check.py --match relu_backward:mask --match linear_backward:transpose
    python scripts/mutation_check.py --without tests/test_backward_mutants.py --json before.json
    python scripts/mutation_check.py --report benchmarks/results/mutation --before before.json
"""
from __future__ import annotations

import argparse
import ast
import copy
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 1.001
KINDS = ("scale", "arith", "drop-term", "delete", "unary", "compare", "mask", "bool", "axis", "transpose", "slice",
         "index", "constant")
PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]
MUTANTS_TEST = "tests/test_backward_mutants.py"

# --- which tests guard which function ---------------------------------------------------------------------
# A selection is (test files, -k expression or None).  Files that do not exist are left out, so the
# mutants' own test file joins once it is written.  Each -k is the narrowest that still holds every test
# of that op in those files (checked by the baseline: a selection that collects nothing is an error).

_CONV_FILES = ["tests/test_layers.py", "tests/test_finite_differences.py", "tests/test_conv_pool_samples.py",
               "tests/test_parallel.py"]
_POOL_FILES = _CONV_FILES
_WINOGRAD = (["tests/test_winograd.py"],
             "torch or finite or chunks or straddle or skipped or empty or channels_last or gradcheck or winograd")
# function name -> selection; the function is looked up in every module of numres/functional.
SELECTIONS = {
    "relu_backward": (["tests/test_layers.py", "tests/test_finite_differences.py", "tests/test_bn_loss_samples.py",
                       "tests/test_parallel.py"], "relu or elementwise"),
    "batchnorm_backward": (["tests/test_layers.py", "tests/test_finite_differences.py",
                            "tests/test_bn_loss_samples.py", "tests/test_parallel.py"], "batchnorm"),
    "conv2d_backward": (_CONV_FILES, "conv or frozen or functional or empty or image_split"),
    "col2im": (_CONV_FILES, "conv or frozen or functional or empty or image_split or col2im"),
    "pad2d_backward": (["tests/test_conv_pool_samples.py"], "pad or padding or conv"),
    "_fold_axis": (["tests/test_conv_pool_samples.py"], "pad or padding or conv"),
    "maxpool2d_backward": (_POOL_FILES, "maxpool or image_split"),
    "_maxpool2d_backward_by_indices": (_POOL_FILES, "maxpool or indices or unbatched"),
    "_scatter_taps": (_POOL_FILES, "maxpool or avgpool or indices or image_split"),
    "avgpool2d_backward": (_POOL_FILES, "avgpool and not adaptive"),
    "adaptive_avgpool2d_backward": (_POOL_FILES, "adaptive"),
    "maxunpool2d_backward": (["tests/test_conv_pool_samples.py"], "unpool"),
    "linear_backward": (["tests/test_layers.py", "tests/test_finite_differences.py", "tests/test_bn_loss_samples.py"],
                        "linear"),
    "_cross_entropy_backward": (["tests/test_layers.py", "tests/test_finite_differences.py",
                                 "tests/test_bn_loss_samples.py"], "cross_entropy"),
    "winograd_conv2d_backward": _WINOGRAD,
    "weight_gradient_from": _WINOGRAD,
    "output_tile_gradients": _WINOGRAD,
    "folded_conv_bn_backward": (["tests/test_fusion.py"], "backward or frozen or folded_conv_bn"),
    **{name: (["tests/test_implicit_gemm.py"],
              "not resnet18 and not thread_timeout and not benchmark_mode and not auto_rule and not gpu_path")
       for name in ("implicit_conv2d_backward", "implicit_conv2d_backward_xp", "grid_gradient", "unphase_rows")},
}
# Any other package dir (numres/reference): every top-level ``*_backward`` function, and col2im, against
# its selection here (plus the mutants' own tests that name the function).
# The whole-model test (about 20 s) is left out: each op has its own fast tests in that file.
PACKAGE_TESTS = {"numres/reference": (["tests/test_reference.py"], "not whole_model")}

# --- mutants that change nothing observable ----------------------------------------------------------------
# (file, function, kind, original, mutated) -> why.  ``original``/``mutated`` are the changed node's source.
# Each rule: (file, function, kind, original, mutated, text in the mutated statement's first line) -> why.
_BN = "numres/functional/batchnorm.py", "batchnorm_backward"
_EMPTY_BN = ("empty input (m = 0): dx is an empty array and the parameter gradients are sums over nothing, "
             "zeros; times 1.001 they are the same arrays")
_BIGGER_FRAME = ("the scratch frame gets more rows/columns of padding than it needs: the extra ones stay zero "
                 "and are cropped away with the rest (a memory cost only)")
EQUIVALENT_RULES: list[tuple] = [
    (*_BN, "scale", scaled, f"({scaled}) * 1.001", "return gradients(xp.empty_like(cache.rows), zeros, zeros.copy())",
     _EMPTY_BN)
    for scaled in ("xp.empty_like(cache.rows)", "zeros", "zeros.copy()")
] + [
    ("numres/functional/conv.py", "col2im", "constant", "2", "3", "padded = xp.empty((n, h + 2 * padding[0]",
     _BIGGER_FRAME),
    ("numres/functional/pooling.py", "_scatter_taps", "constant", "2", "3", "padded = xp.empty((n, h + 2 * pad_h",
     _BIGGER_FRAME),
    ("numres/functional/conv.py", "conv2d_backward", "constant", "0", "-1", "if index == 0:",
     "dweight starts as zeros, so adding the first chunk's product to it (index never equals -1) gives what "
     "writing it does (the write only saves the zero fill's pass)"),
]


_WORK_SIZE = ("a work-size estimate: it only decides how many images (or tile rows) one chunk takes, and "
              "every split gives the same sums, up to the order of rounding; the forced tiny chunks of "
              "test_winograd.py check the splitting itself")
_W = "numres/functional/winograd.py"
EQUIVALENT_RULES += [
    (_W, "winograd_conv2d_backward", "drop-term", None, None,
     "step = images_per_chunk(n, a * a * tiles_h * tiles_w * max(c, o), xp)", _WORK_SIZE),
    (_W, "winograd_conv2d_backward", "compare", "n > step", "n >= step", "part = xp.empty_like(du) if n > step",
     "allocates the scratch 'part' also when one chunk holds every image; it is never used then"),
    (_W, "output_tile_gradients", "slice", "1:3", "1:4", "tiles_h, tiles_w = tile_grid(dy_nhwc.shape[1:3], m)",
     "tile_grid reads only the first two sizes it is given, (OH, OW); the third, O, is ignored"),
    (_W, "output_tile_gradients", "drop-term", ("a * a * tiles_w * o", "a * a * tiles_w", "a * a"), None,
     "map_tiles(transform, count * tiles_h, a * a * tiles_w * o, xp, TRANSFORM_TILE_ELEMENTS)", _WORK_SIZE),
]


_I = "numres/functional/implicit_gemm.py"
_ZERO_FIRST = ("the block is zero-filled and every tap then accumulates (beta = 1), which gives what letting the "
               "first tap write it does: an extra pass, not a different sum")
EQUIVALENT_RULES += [
    (_I, "implicit_conv2d_backward", "compare", "spans[0][2] + spans[0][1] > a", "spans[0][2] + spans[0][1] >= a",
     "if not spans or spans[0][2] + spans[0][1] > a", _ZERO_FIRST),
    (_I, "implicit_conv2d_backward", "mask", "spans[0][2] + spans[0][1] > a", "True",
     "if not spans or spans[0][2] + spans[0][1] > a", _ZERO_FIRST),
    (_I, "implicit_conv2d_backward_xp", "slice", ":nq", ":nq + 1", "dx[:, x0::sh, y0::sw][:, :nq, :nu] =",
     "the phase grid covers the whole input, so nq is the length of the strided view dx[:, x0::sh] and a "
     "slice one further ends at the same place"),
]


def equivalent_reason(mutant):
    """The documented reason when a rule matches (None in a rule matches anything; a tuple, any of it)."""
    def fits(rule, value):
        return rule is None or value == rule or (isinstance(rule, tuple) and value in rule)
    for file, function, kind, original, mutated, where, reason in EQUIVALENT_RULES:
        if (file, function) == (mutant.file, mutant.function) and fits(kind, mutant.kind) and \
                fits(original, mutant.original) and fits(mutated, mutant.mutated) and where in mutant.statement:
            return reason
    return ""


# =============================================================================================================
# The mutator
# =============================================================================================================

@dataclass
class Mutant:
    file: str
    function: str
    line: int
    kind: str
    original: str
    mutated: str
    id: str = ""
    source: str = ""            # the whole mutated function, as source
    statement: str = ""         # the first line of the statement that holds the change, before it
    equivalent: str = ""        # the documented reason, when an EQUIVALENT_RULES entry matches

    @property
    def description(self):
        return f"{self.original}  ->  {self.mutated}"


def _parents(tree):
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _excluded(node, parents):
    """Inside a docstring, raise/assert, an f-string or a string constant: not mutated."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, (ast.Raise, ast.Assert, ast.JoinedStr)):
            return True
        node = parent
    return False


def _const(value):
    return ast.Constant(value=value)


def _is_number(node):
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _plus(node, k):
    if _is_number(node):
        return _const(node.value + k)
    return ast.BinOp(left=node, op=ast.Add() if k > 0 else ast.Sub(), right=_const(abs(k)))


_SCALE_TEMPLATE = ("(tuple(None if _mutant_e is None else _mutant_e * {scale} for _mutant_e in _mutant_v) "
                   "if isinstance(_mutant_v := ({expr}), tuple) else "
                   "None if _mutant_v is None else _mutant_v * {scale})")


def _scaled(node):
    """``node * SCALE``; None stays None, and a tuple of gradients (a helper's return) is scaled entry by entry."""
    scaled = ast.parse(_SCALE_TEMPLATE.format(scale=SCALE, expr=ast.unparse(node)), mode="eval").body
    scaled.scaled_from = node
    return scaled


_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_COMPARE = {ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


def _edits(node, parents, local_functions):
    """``(kind, replacement)`` for one node; a replacement is the new node (ast.Pass() deletes a statement)."""
    parent = parents.get(node)
    # scale: returned / yielded gradients
    if isinstance(node, (ast.Return, ast.Yield)) and node.value is not None:
        value = node.value
        if isinstance(value, ast.Tuple):
            for i, element in enumerate(value.elts):
                if not (isinstance(element, ast.Constant) and element.value is None):
                    new = copy.deepcopy(node)
                    new.value.elts[i] = _scaled(element)
                    yield "scale", new
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in local_functions:
            for i, arg in enumerate(value.args):
                new = copy.deepcopy(node)
                new.value.args[i] = _scaled(arg)
                yield "scale", new
        elif not (isinstance(value, ast.Constant) and value.value is None):
            new = copy.deepcopy(node)
            new.value = _scaled(value)
            yield "scale", new
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op in _ARITH:
            yield "arith", ast.BinOp(left=node.left, op=_ARITH[op](), right=node.right)
        if op in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            yield "drop-term", node.left
        if op in (ast.Add, ast.Mult):
            yield "drop-term", node.right
        if op is ast.BitAnd:
            yield "bool", node.left
            yield "bool", node.right
            yield "bool", ast.BinOp(left=node.left, op=ast.BitOr(), right=node.right)
        if op is ast.BitOr:
            yield "bool", ast.BinOp(left=node.left, op=ast.BitAnd(), right=node.right)
        if op is ast.MatMult:
            for side in ("right", "left"):
                operand = getattr(node, side)
                if not (isinstance(operand, ast.Attribute) and operand.attr == "T"):
                    new = copy.deepcopy(node)
                    setattr(new, side, ast.Attribute(value=operand, attr="T", ctx=ast.Load()))
                    yield "transpose", new
    if isinstance(node, ast.AugAssign):
        op = type(node.op)
        if op in _ARITH:
            yield "arith", ast.AugAssign(target=node.target, op=_ARITH[op](), value=node.value)
        if op is ast.BitAnd:
            yield "bool", ast.AugAssign(target=node.target, op=ast.BitOr(), value=node.value)
    # delete: statements that write into arrays
    if isinstance(node, ast.AugAssign) or (
            isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) for t in node.targets)) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        yield "delete", ast.Pass()
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert)) and not _is_number(node.operand):
        yield "unary", node.operand
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        op = type(node.ops[0])
        if op in _COMPARE:
            yield "compare", ast.Compare(left=node.left, ops=[_COMPARE[op]()], comparators=node.comparators)
        if not (isinstance(parent, (ast.If, ast.IfExp, ast.While)) and parent.test is node) and \
                op not in (ast.Is, ast.IsNot, ast.In, ast.NotIn):
            yield "mask", _const(True)
    if isinstance(node, ast.keyword) and node.arg in ("axis", "axes"):
        value = node.value
        if _is_number(value) and isinstance(value.value, int):
            for k in (1, -1):
                yield "axis", ast.keyword(arg=node.arg, value=_const(value.value + k))
        elif isinstance(value, ast.Tuple) and all(_is_number(e) for e in value.elts):
            axes = [e.value for e in value.elts]
            spare = next(a for a in range(len(axes) + 1) if a not in axes)
            for i in range(len(axes)):
                new_axes = list(axes)
                new_axes[i] = spare
                yield "axis", ast.keyword(arg=node.arg, value=ast.Tuple(elts=[_const(a) for a in new_axes],
                                                                         ctx=ast.Load()))
    if isinstance(node, ast.Attribute) and node.attr == "T" and isinstance(node.ctx, ast.Load):
        yield "transpose", node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "transpose" \
            and len(node.args) >= 2 and all(_is_number(a) for a in node.args):
        for i in range(len(node.args) - 1):
            new = copy.deepcopy(node)
            new.args[i], new.args[i + 1] = new.args[i + 1], new.args[i]
            yield "transpose", new
    if isinstance(node, ast.Slice):
        if node.lower is not None:
            yield "slice", ast.Slice(lower=_plus(node.lower, 1), upper=node.upper, step=node.step)
        if node.upper is not None:
            yield "slice", ast.Slice(lower=node.lower, upper=_plus(node.upper, 1), step=node.step)
            yield "slice", ast.Slice(lower=node.lower, upper=_plus(node.upper, -1), step=node.step)
    if isinstance(node, ast.Subscript) and _is_number(node.slice) and node.slice.value in (0, 1) \
            and type(node.slice.value) is int:
        yield "index", ast.Subscript(value=node.value, slice=_const(1 - node.slice.value), ctx=node.ctx)
    if _is_number(node) and isinstance(parent, (ast.BinOp, ast.Compare, ast.AugAssign)) \
            and not (isinstance(parent, ast.AugAssign) and parent.target is node):
        if isinstance(node.value, int):
            yield "constant", _const(node.value + 1)
            yield "constant", _const(node.value - 1)
        else:
            yield "constant", _const(node.value * SCALE)


def _replace(parent, old, new):
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new
                    return
    raise ValueError("node not found in its parent")


def _snippet(node):
    if isinstance(node, ast.Pass):
        return "(statement removed)"
    if isinstance(node, ast.keyword):
        return f"{node.arg}={ast.unparse(node.value)}"
    if isinstance(node, ast.Slice):
        return ":".join(ast.unparse(p) if p is not None else "" for p in (node.lower, node.upper))
    text = ast.unparse(node)
    return " ".join(text.split())


def _function_node(tree, name):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


def _body_nodes(function):
    """Every node of the function's body but its docstring, in a fixed order."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    nodes = []
    for statement in body:
        nodes.extend(ast.walk(statement))
    return nodes


def generate_mutants(source: str, function: str, file: str = "<string>") -> list[Mutant]:
    """Every mutant of ``function`` in the module ``source``, no-ops and duplicates left out."""
    tree = ast.parse(source)
    original = _function_node(tree, function)
    if original is None:
        raise ValueError(f"{file} has no top-level function {function!r}")
    original_text = ast.unparse(original)
    local_functions = {n.name for n in ast.walk(original) if isinstance(n, ast.FunctionDef)} - {function}
    parents = _parents(original)
    nodes = _body_nodes(original)
    seen = {original_text}
    mutants = []
    for index, node in enumerate(nodes):
        if _excluded(node, parents) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        for kind, replacement in _edits(node, parents, local_functions):
            work = copy.deepcopy(original)
            work_nodes = _body_nodes(work)
            target = work_nodes[index]
            work_parents = _parents(work)
            replacement = copy.deepcopy(replacement)
            _replace(work_parents[target], target, replacement)
            ast.fix_missing_locations(work)
            text = ast.unparse(work)
            if text in seen:
                continue
            try:
                compile(ast.Module(body=[work], type_ignores=[]), file, "exec")
            except SyntaxError:
                continue
            seen.add(text)
            statement = node
            while not isinstance(statement, ast.stmt) and statement in parents:
                statement = parents[statement]
            original_text, mutated_text = _snippet(node), _snippet(replacement)
            if kind == "scale":                 # the scaled gradient, not the whole return statement
                scaled = next(n.scaled_from for n in ast.walk(replacement) if hasattr(n, "scaled_from"))
                original_text = _snippet(scaled)
                mutated_text = f"({original_text}) * {SCALE}"
            mutants.append(Mutant(file=file, function=function, line=getattr(node, "lineno", 0) or
                                  getattr(parents.get(node), "lineno", 0), kind=kind,
                                  original=original_text, mutated=mutated_text, source=text,
                                  statement=" ".join(ast.unparse(statement).splitlines()[0].split())))
    for number, mutant in enumerate(mutants):
        mutant.id = f"{file}::{function}#{number}"
        mutant.equivalent = equivalent_reason(mutant)
    return mutants


def targets(package_dir: str, root: str = REPO):
    """``{file: {function: (test files, -k)}}`` for a package dir, relative to ``root``.

    numres/functional: the functions of ``SELECTIONS``, wherever they live.  Any other dir: every
    top-level ``*_backward`` function and col2im, against ``PACKAGE_TESTS`` (tests/test_reference.py).
    """
    package_dir = package_dir.rstrip("/")
    functional = package_dir == "numres/functional"
    selection = PACKAGE_TESTS.get(package_dir, (["tests/test_reference.py"], None))
    found = {}
    for name in sorted(os.listdir(os.path.join(root, package_dir))):
        if not name.endswith(".py"):
            continue
        path = f"{package_dir}/{name}"
        with open(os.path.join(root, path)) as handle:
            tree = ast.parse(handle.read())
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        if functional:
            chosen = {f: SELECTIONS[f] for f in names if f in SELECTIONS}
        else:
            chosen = {f: selection for f in names if f.endswith("_backward") or f == "col2im"}
        if chosen:
            found[path] = chosen
    return found


def all_mutants(package_dir, root=REPO):
    mutants = []
    for path, functions in targets(package_dir, root).items():
        source = open(os.path.join(root, path)).read()
        for function in functions:
            mutants.extend(generate_mutants(source, function, path))
    return mutants


# =============================================================================================================
# The worker: runs inside the copy
# =============================================================================================================

class _Recorder:
    """A pytest plugin noting the first failed test and how it failed."""

    def __init__(self):
        self.failed = None
        self.how = None
        self.collected = 0

    def pytest_plugin_registered(self, plugin):
        """Once the suite's conftest has loaded its Hypothesis profile: :func:`_mutation_profile`."""
        if str(getattr(plugin, "__file__", "")).endswith("conftest.py"):
            _mutation_profile()

    def pytest_collection_modifyitems(self, items):
        self.collected = len(items)

    def pytest_runtest_logreport(self, report):
        if report.failed and self.failed is None:
            self.failed = report.nodeid
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)[-300:]
            self.how = "assertion" if message.startswith("AssertionError") or message.startswith("assert ") \
                else "exception: " + message.split("\n")[0][:160]

    def pytest_collectreport(self, report):
        if report.failed and self.failed is None:
            self.failed = report.nodeid or "<collection>"
            self.how = "exception: collection error"


def _patch(mutant, root):
    """Swap the mutated function's code into the live function object."""
    import importlib
    module_name = mutant.file[:-3].replace("/", ".")
    module = importlib.import_module(module_name)
    function = getattr(module, mutant.function)
    tree = ast.parse(mutant.source)
    code = compile(tree, os.path.join(root, mutant.file), "exec")
    new = next(c for c in code.co_consts if hasattr(c, "co_name") and c.co_name == mutant.function)
    if new.co_freevars != function.__code__.co_freevars:
        raise RuntimeError(f"{mutant.function}: closure changed")
    function.__code__ = new


def _describe_failure(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)[-300:]
    return "assertion" if message.startswith(("AssertionError", "assert ")) \
        else "exception: " + message.split("\n")[0][:160]


def _child_items(mutant, items, root, timeout, result_path):
    """In a forked child: apply the mutant (if any), run the collected ``items`` until one fails, write
    the outcome, exit."""
    try:
        signal.alarm(max(1, int(timeout)))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if mutant is not None:
            _patch(mutant, root)
        from _pytest.runner import runtestprotocol
        outcome = {"rc": 0, "failed": None, "how": None, "collected": len(items)}
        for i, item in enumerate(items):
            reports = runtestprotocol(item, log=False, nextitem=items[i + 1] if i + 1 < len(items) else None)
            failed = next((r for r in reports if r.failed), None)
            if failed is not None:
                outcome.update(rc=1, failed=item.nodeid, how=_describe_failure(failed))
                break
    except BaseException as error:          # noqa: BLE001  (the mutant broke the patch or the runner)
        outcome = {"rc": 3, "failed": "<setup>", "how": f"exception: {type(error).__name__}: {error}"[:200],
                   "collected": 0}
    with open(result_path, "w") as handle:
        json.dump(outcome, handle)
    os._exit(0)


class _Runner:
    """Runs mutants: forked children over collected items (``fork``), or fresh pytest processes over
    pytest arguments (``process``); at most ``jobs`` at a time."""

    def __init__(self, root, jobs, isolation):
        self.root, self.jobs, self.isolation = root, jobs, isolation
        self.scratch = tempfile.mkdtemp(prefix=".mutation-results-", dir=root)     # removed with the copy
        self.count = 0
        self.progress = False

    def run_many(self, tasks):
        """``tasks``: list of (key, mutant or None, items or pytest args, timeout) -> {key: outcome}."""
        if self.isolation == "process":
            outcomes = {}
            for key, mutant, args, timeout in tasks:
                outcomes[key] = self._run_process(mutant, args, timeout)
                self._report(key, outcomes[key], len(outcomes), len(tasks))
            return outcomes
        pending, running, outcomes = list(tasks), {}, {}
        while pending or running:
            while pending and len(running) < self.jobs:
                key, mutant, items, timeout = pending.pop(0)
                self.count += 1
                path = os.path.join(self.scratch, f"{self.count}.json")
                pid = os.fork()
                if pid == 0:
                    _child_items(mutant, items, self.root, timeout, path)
                running[pid] = (key, path, time.perf_counter())
            pid, status = os.wait()
            if pid not in running:
                continue
            key, path, started = running.pop(pid)
            seconds = time.perf_counter() - started
            if os.path.exists(path):
                with open(path) as handle:
                    outcome = json.load(handle)
                os.remove(path)
            elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
                outcome = {"rc": -1, "failed": "<timeout>", "how": "timeout", "collected": 0}
            else:
                outcome = {"rc": -2, "failed": "<crash>", "how": f"child died, status {status}", "collected": 0}
            outcome["seconds"] = round(seconds, 2)
            outcomes[key] = outcome
            self._report(key, outcome, len(outcomes), len(tasks))
        return outcomes

    def _report(self, key, outcome, done, total):
        if self.progress:
            verdict = "survived" if outcome["rc"] == 0 else f"killed ({outcome['how']})"[:90]
            print(f"[{done}/{total}] {key}: {verdict} in {outcome['seconds']:.1f} s", file=sys.stderr, flush=True)

    def _run_process(self, mutant, args, timeout):
        path = os.path.join(self.root, mutant.file) if mutant is not None else None
        saved = open(path).read() if path else None
        started = time.perf_counter()
        try:
            if mutant is not None:
                tree = ast.parse(saved)
                body = [ast.parse(mutant.source).body[0] if isinstance(n, ast.FunctionDef)
                        and n.name == mutant.function else n for n in tree.body]
                with open(path, "w") as handle:
                    handle.write(ast.unparse(ast.Module(body=body, type_ignores=[])) + "\n")
            code = ("import json, sys, pytest\nsys.path.insert(0, %r)\nfrom mutation_check import _Recorder\n"
                    "r = _Recorder(); rc = int(pytest.main(sys.argv[1:], plugins=[r]))\n"
                    "print('@@' + json.dumps({'rc': rc, 'failed': r.failed, 'how': r.how, "
                    "'collected': r.collected}))\n" % os.path.dirname(os.path.abspath(__file__)))
            try:
                done = subprocess.run([sys.executable, "-c", code, *args], cwd=self.root, capture_output=True,
                                      text=True, timeout=timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
                outcome = json.loads(lines[-1][2:]) if lines else {
                    "rc": 3, "failed": "<setup>", "how": "exception: " + done.stderr[-200:], "collected": 0}
            except subprocess.TimeoutExpired:
                outcome = {"rc": -1, "failed": "<timeout>", "how": "timeout", "collected": 0}
        finally:
            if path:
                with open(path, "w") as handle:
                    handle.write(saved)
        outcome["seconds"] = round(time.perf_counter() - started, 2)
        return outcome


def _pytest_args(root, selection, deselected):
    files, expression, own = selection
    args = [f for f in files if os.path.exists(os.path.join(root, f))]
    args += PYTEST_FLAGS + ["--rootdir", root]
    if expression:
        args += ["-k", " or ".join([f"({expression})", *own.values()])]
    for nodeid in sorted(deselected):
        args += ["--deselect", nodeid]
    return args


def _selection_for(mutant, table, root):
    """(files, -k expression, {file: its own -k}): the mutants' own test file is narrowed to the tests that
    name the function."""
    files, expression = table[mutant.file][mutant.function]
    files = [f for f in files if os.path.exists(os.path.join(root, f))]
    own = {}
    if expression and os.path.exists(os.path.join(root, MUTANTS_TEST)) and MUTANTS_TEST not in files:
        files.append(MUTANTS_TEST)
        own[MUTANTS_TEST] = mutant.function.lstrip("_")
    return files, expression, own


def _mutation_profile():
    """The suite's Hypothesis profile without shrinking: a failing example is enough to kill a mutant,
    and shrinking it can take half a minute."""
    from hypothesis import Phase, settings
    settings.register_profile("mutation", parent=settings.default, report_multiple_bugs=False,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutation")


class _Server:
    """A pytest plugin for the worker: pytest collects every selected test file once, then, instead of
    running the tests, :meth:`pytest_runtestloop` runs the mutants, each in a forked child over the
    items its selection picks."""

    def __init__(self, serve):
        self.serve = serve
        self.result = None

    def pytest_plugin_registered(self, plugin):
        if str(getattr(plugin, "__file__", "")).endswith("conftest.py"):
            _mutation_profile()

    def pytest_runtestloop(self, session):
        self.result = self.serve(list(session.items))
        return True


def _pick(items, selection, deselected):
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression
    files, expression, own = selection
    matchers = {f: Expression.compile(own.get(f, expression)) if own.get(f, expression) else None for f in files}
    picked = []
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in matchers and item.nodeid not in deselected and \
                (matchers[path] is None or matchers[path].evaluate(KeywordMatcher.from_item(item))):
            picked.append(item)
    return picked


def worker(options):
    root = os.getcwd()
    import numres
    if not os.path.abspath(numres.__file__).startswith(root + os.sep):
        raise SystemExit(f"numres imports from {numres.__file__}, not from the copy {root}")
    import pytest
    mutants = select_mutants(options, root)
    table = {}
    for package_dir in options.package_dir:
        table.update(targets(package_dir, root))
    selections = {m.id: _selection_for(m, table, root) for m in mutants}
    files = sorted({f for selection in selections.values() for f in selection[0]})

    def serve(items):
        return _serve(options, root, mutants, selections, table, items)

    if options.isolation == "process":
        return serve(None)
    server = _Server(serve)
    pytest.main(files + ["-q", "-p", "no:cacheprovider", "--no-header", "--rootdir", root,
                         "--continue-on-collection-errors"], plugins=[server])
    if server.result is None:
        raise SystemExit("pytest did not reach the test loop (see its output above)")
    return server.result


def _serve(options, root, mutants, selections, table, items):
    """Run every mutant (items: the collected tests, or None to start pytest per mutant)."""
    runner = _Runner(root, options.jobs, options.isolation)
    started = time.perf_counter()
    deselected: set[str] = set()
    confirmed: dict[str, bool] = {}     # killing test -> passes on the original code
    by_id = {item.nodeid: item for item in items} if items is not None else {}
    results = {}
    carried = {}
    if options.rerun_survivors:
        with open(options.rerun_survivors) as handle:
            earlier = {_signature(r): r for r in json.load(handle)["mutants"]}
        for m in mutants:
            row = earlier.get(_signature(asdict(m)))
            if row is not None and row["status"] == "killed":
                carried[m.id] = {key: row[key] for key in ("status", "failed", "how", "rc", "collected", "seconds")
                                 if key in row}
                carried[m.id]["carried_over"] = True
    todo = [m for m in mutants if not m.equivalent and m.id not in carried]
    results.update(carried)
    for m in mutants:
        if m.equivalent:
            results[m.id] = {"status": "equivalent", "reason": m.equivalent}
    selection_errors = {}

    def spec(selection):
        if items is None:
            return _pytest_args(root, selection, deselected)
        return _pick(items, selection, deselected)

    while todo:
        batch = [(m.id, m, spec(selections[m.id]), options.timeout) for m in todo]
        runner.progress = options.progress
        outcomes = runner.run_many(batch)
        runner.progress = False
        retry = []
        for m in todo:
            outcome = outcomes[m.id]
            if outcome["rc"] == 0 and outcome["collected"] == 0 and items is not None:
                selection_errors[m.function] = "the selection holds no test"
                results[m.id] = {"status": "error", **outcome}
            elif outcome["rc"] == 0:
                results[m.id] = {"status": "survived", **outcome}
            elif outcome["rc"] == 5:
                selection_errors[m.function] = "the selection collects no test"
                results[m.id] = {"status": "error", **outcome}
            else:
                results[m.id] = {"status": "killed", **outcome}
        # Confirm each killing test on the original code.
        killers = []
        for m in todo:
            failed = results[m.id].get("failed")
            if results[m.id]["status"] == "killed" and failed and "::" in failed and failed not in confirmed \
                    and failed not in killers:
                killers.append(failed)
        if killers:
            checks = runner.run_many([(nodeid, None, [by_id[nodeid]] if items is not None else
                                       [nodeid] + PYTEST_FLAGS + ["--rootdir", root], options.timeout)
                                      for nodeid in killers])
            for nodeid, outcome in checks.items():
                confirmed[nodeid] = outcome["rc"] == 0
                if not confirmed[nodeid]:
                    deselected.add(nodeid)
        for m in todo:
            failed = results[m.id].get("failed")
            if results[m.id]["status"] == "killed" and failed in deselected:
                retry.append(m)
        todo = retry
    seconds = time.perf_counter() - started
    return mutants, results, sorted(deselected), selection_errors, seconds, table


def _signature(row):
    return row["file"], row["function"], row["kind"], row["original"], row["mutated"], row["line"]


def select_mutants(options, root):
    mutants = []
    for package_dir in options.package_dir:
        mutants.extend(all_mutants(package_dir, root))
    if options.function:
        mutants = [m for m in mutants if m.function in options.function]
    if options.kind:
        mutants = [m for m in mutants if m.kind in options.kind]
    if options.match:
        picked = []
        for pattern in options.match:
            # function:kind[:text in the original or the change]  -> the first such mutant
            parts = pattern.split(":", 2)
            for m in mutants:
                if m.function == parts[0] and (len(parts) < 2 or m.kind == parts[1]) and \
                        (len(parts) < 3 or parts[2] in m.original or parts[2] in m.mutated) and m not in picked:
                    picked.append(m)
                    break
            else:
                raise SystemExit(f"no mutant matches {pattern!r}")
        mutants = picked
    if options.max_mutants and len(mutants) > options.max_mutants:
        chosen = sorted(random.Random(options.seed).sample(range(len(mutants)), options.max_mutants))
        mutants = [mutants[i] for i in chosen]
    return mutants


# =============================================================================================================
# Reports
# =============================================================================================================

def machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} CPUs visible"


def summarise(mutant_rows):
    counted = [r for r in mutant_rows if r["status"] in ("killed", "survived")]
    killed = [r for r in counted if r["status"] == "killed"]
    by_kind = {}
    for r in mutant_rows:
        entry = by_kind.setdefault(r["kind"], {"killed": 0, "survived": 0, "equivalent": 0, "error": 0})
        entry[r["status"]] += 1
    return {
        "mutants": len(mutant_rows),
        "counted": len(counted),
        "killed": len(killed),
        "survived": len(counted) - len(killed),
        "equivalent": sum(r["status"] == "equivalent" for r in mutant_rows),
        "errors": sum(r["status"] == "error" for r in mutant_rows),
        "kill_rate": round(len(killed) / len(counted), 4) if counted else None,
        "killed_by_assertion": sum(r.get("how") == "assertion" for r in killed),
        "killed_by_exception": sum(str(r.get("how", "")).startswith("exception") for r in killed),
        "killed_by_timeout": sum(r.get("how") == "timeout" for r in killed),
        "by_kind": by_kind,
    }


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def build_report(options, mutants, results, deselected, selection_errors, seconds, table):
    rows = []
    for m in mutants:
        row = {k: v for k, v in asdict(m).items() if k != "source"}
        row.update(results.get(m.id, {"status": "not run"}))
        rows.append(row)
    selections = {f"{path}::{fn}": {"tests": sel[0], "k": sel[1]}
                  for path, fns in table.items() for fn, sel in fns.items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "package_dirs": options.package_dir,
        "without": options.without or [],
        "isolation": options.isolation,
        "jobs": options.jobs,
        "timeout_s": options.timeout,
        "sampled": bool(options.max_mutants),
        "notes": options.note or [],
        "seconds": round(seconds, 1),
        "pytest_flags": PYTEST_FLAGS,
        "selections": selections,
        "deselected_broken_tests": deselected,
        "selection_errors": selection_errors,
        "summary": summarise(rows),
        "mutants": rows,
    }


def _where(row):
    statement = row.get("statement", "")
    statement = statement if len(statement) <= 80 else statement[:77] + "..."
    return f" in `{statement}`" if statement and statement != row["original"] else ""


def _key(row):
    return row["file"], row["function"], row["kind"], row["original"], row["mutated"], row.get("statement", "")


def _survivor_lines(rows, after=None):
    lines = []
    verdicts = {_key(r): r for r in after} if after is not None else {}
    for r in rows:
        if r["status"] == "survived":
            line = (f"| `{r['file']}` | `{r['function']}` | {r['line']} | {r['kind']} | "
                    f"`{r['original']}` → `{r['mutated']}`{_where(r)} |")
            if after is not None:
                later = verdicts.get(_key(r))
                if later is None:
                    now = "not generated any more"
                elif later["status"] == "killed":
                    now = f"killed by `{later.get('failed')}`"
                else:
                    now = later["status"]
                line += f" {now} |"
            lines.append(line)
    return lines


def markdown(report, before=None):
    s = report["summary"]
    out = ["# Mutation check of the backward functions", "",
           f"- date: {report['date']}", f"- machine: {report['machine']}", f"- commit: {report['commit']}",
           f"- package dirs: {', '.join(report['package_dirs'])}",
           f"- run: `python scripts/mutation_check.py` ({report['isolation']} isolation, {report['jobs']} job(s), "
           f"{report['timeout_s']} s per mutant, {report['seconds']} s in all)", ""]
    out += ["## How to read this", "",
            "Each mutant is one small change to one backward function (the rules are listed in "
            "`scripts/mutation_check.py`); it is killed when a test of its selection (below) fails, and each "
            "killing test is re-run on the original code to confirm that it passes there.  The kill rate leaves "
            "out the documented equivalent mutants, which change nothing observable.  'Killed by an exception' "
            "means the mistake crashed a test (a shape or type error) rather than giving a wrong number.", ""]
    out += [f"- {note}" for note in report.get("notes", [])]
    if report.get("notes"):
        out.append("")
    if before is not None:
        b = before["summary"]
        out += ["## Kill rate", "", "| | mutants counted | killed | survived | equivalent | kill rate |",
                "|---|---|---|---|---|---|",
                f"| before the new tests ({before['date']}) | {b['counted']} | {b['killed']} | {b['survived']} | "
                f"{b['equivalent']} | {b['kill_rate']:.1%} |",
                f"| after | {s['counted']} | {s['killed']} | {s['survived']} | {s['equivalent']} | "
                f"{s['kill_rate']:.1%} |", ""]
    else:
        out += ["## Kill rate", "", f"{s['killed']} of {s['counted']} mutants killed: **{s['kill_rate']:.1%}** "
                f"({s['equivalent']} equivalent mutants left out, {s['errors']} errors).", ""]
    out += [f"Killed by a failed assertion: {s['killed_by_assertion']}; by an exception (shape, type, ...): "
            f"{s['killed_by_exception']}; by the timeout: {s['killed_by_timeout']}.", "",
            "| kind | killed | survived | equivalent |", "|---|---|---|---|"]
    for kind, e in sorted(s["by_kind"].items()):
        out.append(f"| {kind} | {e['killed']} | {e['survived']} | {e['equivalent']} |")
    out += ["", "## Survivors", ""]
    survivors = _survivor_lines(report["mutants"])
    if survivors:
        out += ["| file | function | line | kind | mutation |", "|---|---|---|---|---|", *survivors]
    else:
        out.append("None.")
    equivalents = [r for r in report["mutants"] if r["status"] == "equivalent"]
    out += ["", "## Equivalent mutants (change nothing observable; not counted)", ""]
    if equivalents:
        out += ["| function | line | kind | mutation | why |", "|---|---|---|---|---|"]
        out += [f"| `{r['function']}` | {r['line']} | {r['kind']} | `{r['original']}` → `{r['mutated']}`"
                f"{_where(r)} | {r['reason']} |" for r in equivalents]
    else:
        out.append("None.")
    if before is not None:
        out += ["", "## Survivors before the new tests, and what became of each", ""]
        lines = _survivor_lines(before["mutants"], report["mutants"])
        out += ["| file | function | line | kind | mutation | now |", "|---|---|---|---|---|---|", *lines] \
            if lines else ["None."]
    if report["deselected_broken_tests"]:
        out += ["", "## Tests deselected because they failed on the original code too", ""]
        out += [f"- `{n}`" for n in report["deselected_broken_tests"]]
    out += ["", "## Test selection per function", "", "| function | tests | -k |", "|---|---|---|"]
    for name, sel in report["selections"].items():
        out.append(f"| `{name}` | {', '.join(sel['tests'])} (+ {MUTANTS_TEST}) | `{sel['k']}` |")
    return "\n".join(out) + "\n"


def _other_run(other):
    """What the report keeps of another run: its summary, survivors and equivalents."""
    kept = {k: other.get(k) for k in ("date", "commit", "package_dirs", "seconds", "summary", "sampled", "notes",
                                      "deselected_broken_tests")}
    rows = other.get("mutants", [])
    kept["functions"] = sorted({r["function"] for r in rows})
    kept["survivors"] = [r for r in rows if r["status"] == "survived"]
    kept["equivalents"] = [r for r in rows if r["status"] == "equivalent"]
    return kept


def _other_section(other):
    s = other["summary"]
    functions = f": {', '.join(other['functions'])}" if other.get("functions") else ""
    out = ["", f"## {', '.join(other['package_dirs'])}{functions} ({other['date']}, commit {other['commit']}, "
           f"{other['seconds']} s{', a seeded sample' if other.get('sampled') else ''})", "",
           f"{s['killed']} of {s['counted']} mutants killed: **{(s['kill_rate'] or 0):.1%}** ({s['equivalent']} "
           f"equivalent, {s['errors']} errors; by assertion {s['killed_by_assertion']}, by exception "
           f"{s['killed_by_exception']}, by timeout {s['killed_by_timeout']}).", ""]
    out += [f"- {note}" for note in other.get("notes") or []] + ([""] if other.get("notes") else [])
    survivors = _survivor_lines(other.get("survivors", []))
    out += ["| file | function | line | kind | mutation |", "|---|---|---|---|---|", *survivors] if survivors \
        else ["No survivors."]
    equivalents = other.get("equivalents", [])
    if equivalents:
        out += ["", "Equivalent (not counted): " + "; ".join(
            f"`{r['function']}` line {r['line']} `{r['original']}` → `{r['mutated']}`: {r['reason']}"
            for r in equivalents)]
    if other.get("deselected_broken_tests"):
        out += ["", "Deselected (failed on the original code too): " +
                ", ".join(f"`{n}`" for n in other["deselected_broken_tests"])]
    return "\n".join(out) + "\n"


# =============================================================================================================
# Entry point
# =============================================================================================================

def copy_repository(destination, without=()):
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):      # not a git checkout: the package, tests and scripts
        listed = ["pyproject.toml"] + [
            os.path.relpath(os.path.join(folder, name), REPO)
            for top in ("numres", "tests", "scripts") for folder, _, names in os.walk(os.path.join(REPO, top))
            if "__pycache__" not in folder for name in names]
    for path in filter(None, listed):
        if path in without:
            continue
        source = os.path.join(REPO, path)
        if not os.path.isfile(source):
            continue
        target = os.path.join(destination, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package-dir", action="append", help="package folder(s) to mutate "
                        "(default numres/functional; repeat for more, e.g. numres/reference)")
    parser.add_argument("--function", action="append", help="only these functions")
    parser.add_argument("--kind", action="append", help="only these mutation kinds")
    parser.add_argument("--match", action="append", help="function:kind[:text] picks the first such mutant")
    parser.add_argument("--max-mutants", type=int, default=0, help="a seeded random sample of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per mutant (a timeout kills it)")
    parser.add_argument("--isolation", choices=("fork", "process"), default="fork")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--report", help="write REPORT.json and REPORT.md")
    parser.add_argument("--before", help="an earlier result (.json) to quote as 'before'")
    parser.add_argument("--note", action="append", help="a line for the report's notes")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite REPORT.md from REPORT.json (with --report; --note replaces the notes)")
    parser.add_argument("--also", action="append", metavar="RESULT.json",
                        help="another run's result (e.g. of numres/reference) to add to the report as a section")
    parser.add_argument("--rerun-survivors", metavar="EARLIER.json",
                        help="run only the mutants that survived in an earlier result (matched by file, function, "
                             "kind and change) and carry the earlier verdicts of the others over: added tests can "
                             "only kill more")
    parser.add_argument("--progress", action="store_true", help="a line per mutant on stderr")
    parser.add_argument("--without", action="append", metavar="PATH",
                        help="leave this file out of the copy (e.g. tests/test_backward_mutants.py, to measure "
                             "the suite before it)")
    parser.add_argument("--keep", action="store_true", help="keep the copy of the repository")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.package_dir = options.package_dir or ["numres/functional"]
    return options


def main(argv=None):
    options = parse(argv)
    if options.worker:                               # inside the copy
        outcome = worker(options)
        with open(options.worker, "w") as handle:
            mutants, results, deselected, errors, seconds, table = outcome
            json.dump({"mutants": [asdict(m) for m in mutants], "results": results, "deselected": deselected,
                       "errors": errors, "seconds": seconds,
                       "table": {p: {f: list(s) for f, s in fs.items()} for p, fs in table.items()}}, handle)
        return 0
    if options.render:
        with open(options.report + ".json") as handle:
            report = json.load(handle)
        if options.note:
            report["notes"] = options.note
        for path in options.also or []:
            with open(path) as handle:
                other = json.load(handle)
            report.setdefault("other_runs", []).append(_other_run(other))
        before = report.get("before")
        if before is not None:
            before = dict(before, mutants=before["survivors"])
        text = markdown(report, before) + "".join(_other_section(o) for o in report.get("other_runs", []))
        with open(options.report + ".json", "w") as handle:
            json.dump(report, handle, indent=1)
        with open(options.report + ".md", "w") as handle:
            handle.write(text)
        return 0
    if options.list:
        for m in select_mutants(options, REPO):
            flag = "  [equivalent]" if m.equivalent else ""
            print(f"{m.id}  line {m.line}  {m.kind:10s} {m.description}{flag}")
        return 0
    copy_dir = tempfile.mkdtemp(prefix="numres-mutation-")
    try:
        copy_repository(copy_dir, set(options.without or ()))
        result_path = os.path.join(copy_dir, ".mutation-result.json")
        env = dict(os.environ, PYTHONPATH=copy_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   NUMRES_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1")
        args = [sys.executable, os.path.join(copy_dir, "scripts", "mutation_check.py"), "--worker", result_path]
        args += sum((["--package-dir", p] for p in options.package_dir), [])
        for flag in ("function", "kind", "match"):
            args += sum(([f"--{flag}", v] for v in getattr(options, flag) or []), [])
        if options.progress:
            args.append("--progress")
        if options.rerun_survivors:
            args += ["--rerun-survivors", os.path.abspath(options.rerun_survivors)]
        args += ["--max-mutants", str(options.max_mutants), "--seed", str(options.seed), "--jobs", str(options.jobs),
                 "--timeout", str(options.timeout), "--isolation", options.isolation]
        subprocess.run(args, cwd=copy_dir, env=env, check=True)
        with open(result_path) as handle:
            raw = json.load(handle)
    finally:
        if options.keep:
            print(f"copy kept in {copy_dir}")
        else:
            shutil.rmtree(copy_dir, ignore_errors=True)
    mutants = [Mutant(**m) for m in raw["mutants"]]
    table = {p: {f: tuple(s) for f, s in fs.items()} for p, fs in raw["table"].items()}
    report = build_report(options, mutants, raw["results"], raw["deselected"], raw["errors"], raw["seconds"], table)
    s = report["summary"]
    print(f"{s['killed']}/{s['counted']} mutants killed ({(s['kill_rate'] or 0):.1%}); {s['survived']} survived, "
          f"{s['equivalent']} equivalent, {s['errors']} errors; {report['seconds']} s")
    for r in report["mutants"]:
        if r["status"] in ("survived", "error"):
            print(f"  {r['status'].upper()}: {r['file']}:{r['line']} {r['function']} [{r['kind']}] "
                  f"{r['original']}  ->  {r['mutated']}")
    if report["deselected_broken_tests"]:
        print("  deselected (fail on the original code too): " + ", ".join(report["deselected_broken_tests"]))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(report, handle, indent=1)
    if options.report:
        before = None
        if options.before:
            with open(options.before) as handle:
                before = json.load(handle)
            report["before"] = {"date": before["date"], "commit": before.get("commit"),
                                "summary": before["summary"],
                                "survivors": [r for r in before["mutants"] if r["status"] == "survived"]}
        others = []
        for path in options.also or []:
            with open(path) as handle:
                others.append(json.load(handle))
        report["other_runs"] = [_other_run(o) for o in others]
        text = markdown(report, before)
        for other in others:
            text += _other_section(other)
        with open(options.report + ".json", "w") as handle:
            json.dump(report, handle, indent=1)
        with open(options.report + ".md", "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
