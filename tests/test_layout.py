"""The package's layout: imports point one way, the public surface is one list (what `__all__`
says, what the API pages document, what users can import), the core needs no plotting."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import transformer_lens_patching as tlp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "transformer_lens_patching"
PUBLIC_SUBMODULES = ("plots", "ioi")
"""Submodules whose own `__all__` is public too."""
PUBLIC_MODULES = {"__init__", "__main__", "errors", "results", "metrics", "plots", "plugin", "ioi", "cli"}
"""Modules without a leading underscore; an API page may document one as a whole (its docstring)."""

LAYERS = {
    "_tl": {"errors", "_tl"},
    "_core": {"errors", "_tl", "results", "_core"},
    "metrics": {"errors", "_tl", "results", "_core", "metrics"},
    "_methods": {"errors", "_tl", "results", "_core", "metrics", "_methods"},
}
"""What each part may import from the package (everything else: upper layers only)."""


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of the package (`_core`, `metrics`, ...) that a module imports."""
    parts = set()
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [alias.name] for alias in node.names] if not node.module else [target]
            elif node.module and node.module.startswith("transformer_lens_patching"):
                names = [node.module.split(".")]
            else:
                continue
            for name in names:
                if len(name) > 1:
                    parts.add(name[1])
    return parts


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_imports_point_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        allowed = LAYERS.get(part)
        if allowed is None:
            continue
        for imported in imported_parts(path) - allowed:
            wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_transformer_lens_is_imported_only_in_tl():
    importing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else ([alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            )
            if any(m == "transformer_lens" or m.startswith("transformer_lens.") for m in modules):
                if part_of(path) != "_tl":
                    importing.append(str(path.relative_to(ROOT)))
    assert not importing, f"TransformerLens imported outside _tl/: {importing}"


def test_hook_names_are_built_only_by_the_component_table():
    """No f-string "blocks.{layer}..." outside the table (and the TransformerLens module)."""
    built = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "components.py" or part_of(path) == "_tl":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and isinstance(v.value, str) and "blocks." in v.value for v in node.values
            ):
                built.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not built, f"hook names built outside the component table: {built}"


def public_names() -> set[str]:
    """`transformer_lens_patching.<name>` for every name of `__all__` and of the public submodules' `__all__`."""
    import importlib

    names = {f"transformer_lens_patching.{name}" for name in tlp.__all__}
    for sub in PUBLIC_SUBMODULES:
        module = importlib.import_module(f"transformer_lens_patching.{sub}")
        for name in module.__all__:
            value = getattr(module, name)
            if getattr(tlp, name, None) is not value:
                names.add(f"transformer_lens_patching.{sub}.{name}")
    return names


def documented_names() -> set[str]:
    """Every `::: name` of the API pages."""
    names = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        names |= set(re.findall(r"^::: (\S+)", page.read_text(), re.M))
    return names


def test_the_api_pages_document_exactly_the_public_names():
    public, documented = public_names(), documented_names()
    modules = {f"transformer_lens_patching.{name}" for name in PUBLIC_MODULES}
    assert sorted(documented - public - modules) == [], "documented but not public"
    assert sorted(public - documented) == [], "public but not documented"


def test_every_public_name_imports_and_private_modules_are_marked():
    for name in tlp.__all__:
        assert getattr(tlp, name) is not None, name
    unmarked = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if part_of(path) not in PUBLIC_MODULES and not part_of(path).startswith("_")
    ]
    assert not unmarked, f"implementation modules without a leading underscore: {unmarked}"


def test_the_core_works_without_plotly():
    """plotly is the [plot] extra: the package imports and patches without it; plots says what to install."""
    script = (
        "import sys; sys.modules['plotly'] = None\n"
        "import torch\n"
        "import transformer_lens_patching as tlp\n"
        "from tests import models\n"
        "model = models.gpt2_like(n_layers=2)\n"
        "tokens = torch.randint(100, 2000, (2, 5))\n"
        "print(float(tlp.act_patch(model, tokens, tlp.Node('z', 0, head=1), lambda l: l[:, -1, 0].mean(), "
        "new_cache='zero')))\n"
        "try:\n"
        "    from transformer_lens_patching import plots\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    value, message = done.stdout.strip().splitlines()[-2:]
    float(value)
    assert "pip install 'transformer_lens_patching[plot]'" in message


def test_the_license_file_is_the_one_the_metadata_names():
    import configparser

    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    assert metadata["metadata"]["license"] == "MIT" and metadata["metadata"]["license_files"] == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def test_the_readme_says_how_to_cite_and_what_to_do_when_stuck():
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert {"Troubleshooting", "Citing"} <= set(headings)
    citing = readme.split("## Citing")[1]
    assert "@software{transformer_lens_patching" in citing and "Indirect Object Identification" in citing
    assert "random weights" in readme.split("## Speed")[1].split("\n## ")[0], "the speed claim says what was measured"


LINTED = ["transformer_lens_patching", "tests", "benchmarks", "scripts", "demos", "tl_patch.py"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *LINTED], cwd=ROOT, capture_output=True, text=True)


def test_the_code_is_formatted_and_lint_clean():
    """`ruff format` leaves every file as it is and `ruff check` (pyproject.toml's rules) finds nothing;
    ruff is installed with the documentation tools, in the TransformerLens 4 environment only."""
    pytest.importorskip("ruff", reason="ruff is installed in the TransformerLens 4 environment only")
    formatted = _ruff("format", "--check")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    linted = _ruff("check")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    sources = [ROOT / "tl_patch.py", *(path for part in LINTED[:-2] for path in (ROOT / part).rglob("*.py"))]
    assert not [path for path in sources if "# fmt: skip" in path.read_text()]
