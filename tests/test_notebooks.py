"""The notebooks in notebooks/ run, pass their own checks, and match their generator.

Each notebook holds real ``assert`` statements (relative errors below 1e-10 against PyTorch,
gradcheck verdicts, the all-ones demonstration), so executing it is a test.  Here every
committed notebook is executed afresh with nbclient, in a temporary copy so the committed
file (and its outputs) is never rewritten; any cell error fails the test, and the outputs
must show the notebook's key verdicts.  The committed files must also be what
``notebooks/make_notebooks.py`` builds, already executed, with no error in their outputs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT = 120          # seconds per cell; each notebook runs in well under a minute

# Text each notebook's outputs must contain once it has run: its verdicts.
VERDICTS = {
    "01_conv_backward.ipynb": ["PASS: worst relative error", "worst relative error against PyTorch",
                               "gradcheck needs a float64 module", "all checks passed"],
    "02_batchnorm_backward.ipynb": ["all ones hid 2 of 3 broken backward passes", "all checks passed"],
    "03_bottleneck_gradient_flow.ipynb": ["PASS: worst relative error", "max |dx (block) - (dx_branch + dz)|",
                                          "all checks passed"],
    "04_reference_mode_resnet18.ipynb": ["arrays compared; worst relative error", "textbook / engine"],
}


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(NOTEBOOK_DIR, "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_outputs(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
            elif output.get("output_type") == "error":
                parts.append(f"{output['ename']}: {output['evalue']}")
    return "\n".join(parts)


def _errors(notebook) -> list:
    return [f"{output['ename']}: {output['evalue']}" for cell in notebook.cells
            for output in cell.get("outputs", []) if output.get("output_type") == "error"]


def test_the_generator_and_the_committed_notebooks_agree():
    generator = _generator()
    assert set(generator.NOTEBOOKS) == set(VERDICTS)
    committed = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))
    assert committed == sorted(generator.NOTEBOOKS), "regenerate with: python notebooks/make_notebooks.py"
    for name in generator.NOTEBOOKS:
        built = generator.build(name)
        on_disk = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
        nbformat.validate(on_disk)
        assert [(c.cell_type, c.source) for c in on_disk.cells] == [(c.cell_type, c.source) for c in built.cells], \
            f"{name} differs from make_notebooks.py; regenerate with: python notebooks/make_notebooks.py {name[:2]}"


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_committed_notebook_has_its_outputs(name):
    """Committed executed, in order, without errors, so it reads well on a code-hosting site."""
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1)), \
        f"{name} is committed without (complete) outputs"
    assert not _errors(notebook)
    text = _text_outputs(notebook)
    for verdict in VERDICTS[name]:
        assert verdict in text, f"{name}'s committed outputs lack {verdict!r}"


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_notebook_executes(name, tmp_path, monkeypatch):
    """Run a copy of the notebook in a fresh python3 kernel; every cell, and so every assert in it, must pass."""
    copy = tmp_path / name
    shutil.copyfile(os.path.join(NOTEBOOK_DIR, name), copy)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}: a cell failed:\n{error}")
    assert not _errors(notebook)
    text = _text_outputs(notebook)
    for verdict in VERDICTS[name]:
        assert verdict in text, f"{name}: no {verdict!r} in the outputs"
