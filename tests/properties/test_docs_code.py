"""Every Python block of README.md and docs/**/*.md runs as written, on the embedded model.

The blocks of one page run in order in one namespace, as a reader would paste them. A
block right after the line `<!-- not run: <why> -->` is not run (e.g. it needs the model
hub). `load_smollm2()` returns the session's SmolLM2 instead of loading it again, and
figures are not shown. The pages run once, on TransformerLens 2: the code is the same on
both generations, and the TransformerLens 4 suite already runs the demos and the main job.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers import TL_MAJOR
from tests.properties.docs_pages import PAGES, ROOT

BLOCK = re.compile(r"^(<!-- not run: [^\n]*-->\n)?```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line, code) of each block of `page` that runs."""
    text = page.read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(2)) for match in BLOCK.finditer(text) if not match.group(1)
    ]


def test_every_page_with_code_is_found():
    with_code = {page.name for page in PAGES if python_blocks(page)}
    assert {"README.md", "quickstart.md"} <= with_code


@pytest.mark.skipif(TL_MAJOR >= 4, reason="the pages run once, in the TransformerLens 2 environment")
@pytest.mark.skipif(bool(os.environ.get("TLP_FAST")), reason="TLP_FAST set: SmolLM2 skipped")
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda page: page.name)
def test_python_blocks_run(page, smollm2_model, monkeypatch, tmp_path):
    import plotly.graph_objects as go

    import transformer_lens_patching

    monkeypatch.setattr(transformer_lens_patching, "load_smollm2", lambda *args, **kwargs: smollm2_model)
    monkeypatch.setattr(go.Figure, "show", lambda self, *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code in python_blocks(page):
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line}, fails: {error!r}") from error
