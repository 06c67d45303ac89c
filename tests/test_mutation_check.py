"""The mutation check (scripts/mutation_check.py): its mutator, and a handful of real mutants that the suite
must kill.

The whole check (hundreds of mutants, tens of minutes) runs as a script and its latest result is committed in
benchmarks/results/mutation.md; here the mutator's rules are unit-tested on a small function, and five of
the issue's named mistakes are applied to the real backward functions and must each be killed by the
suite: a missing ReLU mask, BatchNorm's dropped mean term, a transposed Linear weight, an off-by-one in
col2im's padding crop and max pooling's first-maximum tie-break.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mutation_check as mc  # noqa: E402

SAMPLE = '''
def thing_backward(dy, cache):
    """Docstring: not mutated."""
    x, w, y = cache
    if x.shape[0] == 0:
        raise ValueError(f"empty {x.shape[0] + 1}")
    g = dy * (y > 0)
    mean = g.sum(axis=(0, 2, 3)) / g.shape[0]
    frame = x[:, 1:3]
    frame[...] = 0
    frame += g[:, 1:3] - mean[0]
    winner = (g == y) & ~(g < 0)
    dx = -g @ w.T + x.transpose(0, 2, 1) @ w
    return dx, frame.sum(axis=1) * 2.0
'''


def _kinds(mutants):
    return {m.kind for m in mutants}


def test_every_listed_kind_is_produced_and_documented():
    mutants = mc.generate_mutants(SAMPLE, "thing_backward")
    assert _kinds(mutants) == set(mc.KINDS)
    for kind in mc.KINDS:
        assert f"\n{kind} " in mc.__doc__, f"the mutation list in the docstring lacks {kind!r}"


def test_the_named_mistakes_are_among_the_mutants():
    changes = {(m.kind, m.original, m.mutated) for m in mc.generate_mutants(SAMPLE, "thing_backward")}
    assert ("scale", "dx", "(dx) * 1.001") in changes                                # gradient * 1.001
    assert ("scale", "frame.sum(axis=1) * 2.0", "(frame.sum(axis=1) * 2.0) * 1.001") in changes
    assert ("mask", "y > 0", "True") in changes                                      # missing mask
    assert ("drop-term", "g[:, 1:3] - mean[0]", "g[:, 1:3]") in changes             # dropped mean term
    assert ("transpose", "w.T", "w") in changes                                      # transposed weight
    assert ("transpose", "x.transpose(0, 2, 1)", "x.transpose(0, 1, 2)") in changes
    assert ("slice", "1:3", "1 + 1:3") in changes or ("slice", "1:3", "2:3") in changes   # off-by-one
    assert ("bool", "(g == y) & ~(g < 0)", "g == y") in changes                      # a dropped tie-break
    assert ("axis", "axis=(0, 2, 3)", "axis=(1, 2, 3)") in changes                   # wrong axis
    assert ("axis", "axis=1", "axis=2") in changes
    assert ("delete", "frame[...] = 0", "(statement removed)") in changes
    assert ("index", "mean[0]", "mean[1]") in changes
    assert any(kind == "constant" and old == "2.0" and new.startswith("2.002") for kind, old, new in changes)


def test_docstrings_raise_and_fstrings_are_left_alone():
    for m in mc.generate_mutants(SAMPLE, "thing_backward"):
        assert "Docstring" not in m.original
        assert "empty" not in m.original, m
        assert m.line != 6, m                                  # the raise statement's line


def test_a_no_op_or_a_repeated_mutant_is_not_generated():
    source = "def f_backward(a, b):\n    return a.transpose(1, 1) * (b * b)\n"
    mutants = mc.generate_mutants(source, "f_backward")
    texts = [m.source for m in mutants]
    assert len(texts) == len(set(texts))
    original = ast.unparse(ast.parse(source).body[0])
    assert original not in texts
    # Swapping the two equal axes changes nothing: no transpose mutant at all.
    assert not [m for m in mutants if m.kind == "transpose"]
    # b * b -> b (drop left) and -> b (drop right) are one mutant.
    assert len([m for m in mutants if m.kind == "drop-term" and m.original == "b * b"]) == 1


def test_documented_equivalents_are_not_counted(monkeypatch):
    source = "def f_backward(a):\n    zeros = a * 0\n    return zeros\n"
    mutants = mc.generate_mutants(source, "f_backward")
    scale = next(m for m in mutants if m.kind == "scale")
    monkeypatch.setattr(mc, "EQUIVALENT_RULES", mc.EQUIVALENT_RULES + [
        ("<string>", "f_backward", "scale", scale.original, scale.mutated, "return zeros",
         "zeros times 1.001 are zeros")])
    mutants = mc.generate_mutants(source, "f_backward")
    assert [m.equivalent for m in mutants if m.kind == "scale"] == ["zeros times 1.001 are zeros"]
    rows = [{"kind": m.kind, "status": "equivalent" if m.equivalent else "killed", "how": "assertion"}
            for m in mutants]
    summary = mc.summarise(rows)
    assert summary["equivalent"] == 1 and summary["counted"] == len(mutants) - 1 and summary["kill_rate"] == 1.0


def test_every_functional_target_exists_and_has_mutants():
    table = mc.targets("numres/functional")
    found = {function for functions in table.values() for function in functions}
    assert found == set(mc.SELECTIONS), f"missing: {set(mc.SELECTIONS) - found}"
    for path, functions in table.items():
        for function in functions:
            assert mc.generate_mutants(open(os.path.join(ROOT, path)).read(), function, path), function


PICKS = [
    "relu_backward:mask",                                        # a missing ReLU mask
    "batchnorm_backward:drop-term:-a * dbias / count - b",        # BatchNorm's dropped mean term
    "linear_backward:transpose:dy @ weight",                      # a transposed weight
    "col2im:slice:padding[0]",                                    # an off-by-one in the padding crop
    "maxpool2d_backward:bool:& unclaimed",                         # the first-maximum tie-break dropped
]


def test_named_mistakes_are_killed_by_the_suite(tmp_path):
    """The real thing on five mutants: a copy of the repository, forked pytest runs, each killer confirmed
    on the original code."""
    out = tmp_path / "result.json"
    args = [sys.executable, os.path.join(ROOT, "scripts", "mutation_check.py"), "--json", str(out),
            "--timeout", "120", "--jobs", "2"]
    for pick in PICKS:
        args += ["--match", pick]
    subprocess.run(args, cwd=ROOT, check=True, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["mutants"]
    assert len(rows) == len(PICKS)
    survivors = [f"{r['function']}: {r['original']} -> {r['mutated']}" for r in rows if r["status"] != "killed"]
    assert not survivors, f"mutants not killed: {survivors}"
    assert result["summary"]["kill_rate"] == 1.0
