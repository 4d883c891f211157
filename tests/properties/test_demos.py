"""The notebooks in demos/: stored without outputs, and each runs top to bottom without an error.

Running them takes minutes (they patch the real SmolLM2-135M), so they run once, in the
TransformerLens 4 environment, which has nbclient and ipykernel (requirements/docs.txt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import TL_MAJOR

DEMOS = Path(__file__).resolve().parents[2] / "demos"
NOTEBOOKS = sorted(DEMOS.glob("*.ipynb"))
CELL_TIMEOUT_S = 900


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {DEMOS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_stored_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    with_outputs = [index for index, cell in enumerate(cells) if cell.get("outputs") or cell.get("execution_count")]
    assert not with_outputs, f"{path.name}: cells {with_outputs} have outputs; clear them before committing"


@pytest.mark.skipif(TL_MAJOR < 4, reason="the notebooks run once, in the TransformerLens 4 environment")
@pytest.mark.skipif(bool(os.environ.get("TLP_FAST")), reason="TLP_FAST set: SmolLM2 skipped")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, monkeypatch):
    """On each notebook's default model, the embedded SmolLM2. The TransformerLens-format demo reads
    TLP_DEMO_MODEL (gpt2: GPT-2 small from the hub) and TLP_INSTALL_FROM (what to pip install) from
    the environment, which the kernel inherits: both are removed, so it loads SmolLM2 and, with the
    package importable here, installs nothing (tests/properties/test_demo_install.py checks its installs)."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("TLP_DEMO_MODEL", raising=False)
    monkeypatch.delenv("TLP_INSTALL_FROM", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(DEMOS)}}
    )
    client.execute()
