"""The documents' links into the code lead somewhere real.

Every relative link in the README and docs/*.md must name an existing file, and a link whose text
names a function (`` `reference.conv2d_backward` ``, `` `functional.add` ``, `` `Bottleneck.backward` ``)
must point at a file that defines it: the walk-through promises the reader one click from each
equation to the code that computes it.
"""
from __future__ import annotations

import ast
import contextlib
import io
import textwrap
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _links(path):
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    for label, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                            # a URL or an anchor on the same page
        yield label, os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))


def _defined_names(path):
    """Top-level functions and classes of a Python file, and ``Class.method`` for their methods."""
    with open(path, encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


@pytest.mark.parametrize("document", DOCUMENTS, ids=[os.path.relpath(d, ROOT) for d in DOCUMENTS])
def test_every_relative_link_exists(document):
    missing = [target for _, target in _links(document) if not os.path.exists(target)]
    assert not missing, f"{os.path.relpath(document, ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[os.path.relpath(d, ROOT) for d in DOCUMENTS])
def test_links_that_name_a_function_point_at_its_definition(document):
    wrong = []
    for label, target in _links(document):
        named = re.fullmatch(r"`(?:reference\.|functional\.)?([A-Za-z_][\w.]*)`", label)
        if not named or named.group(1).endswith(".py") or not target.endswith(".py") or not os.path.exists(target):
            continue
        if named.group(1) not in _defined_names(target):
            wrong.append(f"{label} -> {os.path.relpath(target, ROOT)}")
    assert not wrong, f"{os.path.relpath(document, ROOT)}: these links name code their file does not define: {wrong}"


def test_the_walkthrough_names_both_tiers_for_each_backward():
    with open(os.path.join(ROOT, "docs", "walkthrough.md"), encoding="utf-8") as stream:
        text = stream.read()
    for function in ("conv2d_backward", "batchnorm_backward", "relu_backward"):
        assert f"[`reference.{function}`](../numres/reference/" in text
        assert f"[`functional.{function}`](../numres/functional/" in text


ENGINE_MODULES = ["activation", "batchnorm", "linear", "loss", "pooling", "conv", "winograd", "fused"]


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_each_engine_module_names_the_textbook_it_accelerates(name):
    """DESIGN.md: the engine's docstrings name the reference function they accelerate."""
    import importlib
    module = importlib.import_module(f"numres.functional.{name}")
    mentioned = re.findall(r"numres\.reference\.(\w+)", module.__doc__)
    assert mentioned, f"numres.functional.{name}'s docstring names no reference module or function"
    import numres.reference
    for target in mentioned:
        assert hasattr(numres.reference, target) or importlib.util.find_spec(f"numres.reference.{target}"), target


def test_the_learners_page_code_runs():
    """docs/learn.md's Python blocks run as written, in order, and its gradcheck example passes."""
    with open(os.path.join(ROOT, "docs", "learn.md"), encoding="utf-8") as stream:
        text = stream.read()
    blocks = [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)]
    assert len(blocks) >= 3
    namespace = {}
    import numpy as np
    import numres as nr
    namespace.update(np=np, nr=nr)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        for block in blocks:
            exec(compile(block.replace("with nr.using_config(reference_mode=True, num_threads=1):\n    ...",
                                       "with nr.using_config(reference_mode=True, num_threads=1):\n    pass"),
                         "docs/learn.md", "exec"), namespace)
    assert "PASS: worst relative error" in output.getvalue()
    assert namespace["dx"].shape == (2, 3, 32, 32) and not nr.config.reference_mode


@pytest.mark.slow
def test_the_readme_quick_start_runs():
    """The README's Quick start and its own-Module example run as written; the gradcheck prints a PASS."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        blocks = re.findall(r"```python\n(.*?)```", stream.read(), flags=re.S)
    chosen = [b for b in blocks if "nr.manual_seed(0)" in b or "class TwoHeads" in b]
    assert len(chosen) == 2
    namespace, output = {}, io.StringIO()
    with contextlib.redirect_stdout(output):
        for block in chosen:
            exec(compile(block, "README.md", "exec"), namespace)
    printed = output.getvalue()
    assert "PASS: worst relative error" in printed
    assert namespace["logits_textbook"].shape == namespace["logits"].shape
