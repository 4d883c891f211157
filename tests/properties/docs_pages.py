"""The documentation pages the docs tests read: README.md and every page under docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", re.S | re.M)
"""A fenced code block, from its opening to its closing line."""


def relative(path: Path) -> str:
    """`path` relative to the repository root, as messages name it."""
    return str(path.relative_to(ROOT))
