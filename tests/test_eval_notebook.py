"""notebooks/quickstart.ipynb: committed executed (small, no machine paths), and it runs top to bottom without
warnings (real SmolLM2, QUICK sizes)."""
import json
import os
import re

import pytest

pytestmark = pytest.mark.e2e  # the notebook, end to end: make test-slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
MACHINE_PATH = re.compile(r"/(home|root|tmp|Users|work)/|site-packages|[A-Za-z]:\\\\")


def _outputs(cells) -> list:
    return [output for cell in cells if cell["cell_type"] == "code" for output in cell.get("outputs", [])]


def _stderr(cells) -> str:
    return "".join(output.get("text", "") for output in _outputs(cells) if output.get("name") == "stderr")


def test_the_committed_notebook_holds_its_outputs():
    with open(NOTEBOOK) as f:
        cells = json.load(f)["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    unrun = [i for i, cell in enumerate(code) if not cell["outputs"] or cell["execution_count"] is None]
    assert not unrun, f"code cells {unrun} have no outputs: execute the notebook and commit it with them"
    text = json.dumps(_outputs(cells))
    assert "tokens/s" in text and "perplexity" in text and "image/png" in text
    assert not MACHINE_PATH.search(text), f"a machine-specific path in the outputs: {MACHINE_PATH.search(text)}"
    assert _stderr(cells) == "", "warnings in the committed outputs"
    assert os.path.getsize(NOTEBOOK) < 150_000, "the notebook grew past 150 kB"


@pytest.mark.slow
def test_quickstart_notebook_runs_without_warnings(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(output.get("text", "") for output in _outputs(notebook.cells))
    assert "tokens/s" in outputs and "perplexity" in outputs
    assert "Warning" not in _stderr(notebook.cells), _stderr(notebook.cells)
