"""The package's layout: imports point one way, the public surface is one list (what `__all__`
says, what the API pages document, what users can import), the core needs no plotting."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import transformer_lens_patching as tlp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "transformer_lens_patching"
PUBLIC_SUBMODULES = ("plots", "ioi", "analysis")
"""Submodules whose own `__all__` is public too."""
PUBLIC_MODULES = {"__init__", "__main__", "errors", "results", "metrics", "plots", "plugin", "ioi", "analysis", "cli"}
"""Modules without a leading underscore; an API page may document one as a whole (its docstring)."""

LAYERS = {
    "_tl": {"errors", "_tl"},
    "_stats": {"errors", "_stats"},
    "results": {"errors", "_stats", "results"},
    "_core": {"errors", "_tl", "_stats", "results", "_core"},
    "metrics": {"errors", "_tl", "_stats", "results", "_core", "metrics"},
    "_methods": {"errors", "_tl", "_stats", "results", "_core", "metrics", "_methods"},
}
"""What each part may import from the package (everything else: upper layers only)."""


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of the package (`_core`, `metrics`, ...) that a module imports."""
    parts = set()
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [
                alias.name.split(".") for alias in node.names if alias.name.startswith("transformer_lens_patching.")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [alias.name] for alias in node.names] if not node.module else [target]
            elif node.module and node.module.startswith("transformer_lens_patching"):
                names = [node.module.split(".")]
            else:
                continue
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


TASK_IMPORTS = {"errors", "results", "metrics", "plots", "_tl", "_tasks"}
"""What the tasks may import from the package besides its top level: the public modules, and `_tl`
(the one way into TransformerLens). The IOI app is the proof that the public API is enough."""


def test_tasks_are_built_on_the_public_api():
    private = [
        f"{path.relative_to(ROOT)} imports {imported}"
        for path in sorted((PACKAGE / "_tasks").rglob("*.py"))
        for imported in imported_parts(path) - TASK_IMPORTS
    ]
    assert not private, private


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
        "from tests.oracles import models\n"
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


def test_no_module_imports_another_module_s_private_names():
    """A leading underscore means "this module's own": modules share only names without one
    (private modules such as `_tl` and `_core` are imported as a whole or by their public names)."""
    borrowed = []
    for path in PACKAGE.rglob("*.py"):
        package = module_name(path).split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("transformer_lens_patching"):
                target = node.module.split(".")
            else:
                continue
            folder = ROOT.joinpath(*target)
            for alias in node.names:
                is_module = (folder / alias.name).is_dir() or (folder / f"{alias.name}.py").exists()
                if alias.name.startswith("_") and not is_module:
                    borrowed.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    assert not borrowed, borrowed


PLANS_OF = {
    "act_patch": "plan_act_patch",
    "path_patch": "plan_path_patch",
    "evaluate_circuit": "plan_circuit_evaluation",
}
"""Each function that runs a plan, and the public function that makes the plan."""
RUN_ONLY = {"verbose", "progress"}
"""Arguments about showing a run, which plans do not take."""


def test_each_plan_function_takes_exactly_its_method_s_arguments():
    """`plan_X(...)` takes what `X(...)` takes, in the same order, with the same kinds, defaults
    and annotations, but for the run-only arguments (`verbose`, `progress`)."""
    for name, plan_name in PLANS_OF.items():
        run = inspect.signature(getattr(tlp, name)).parameters
        plan = inspect.signature(getattr(tlp, plan_name)).parameters
        expected = [(p.name, p.kind, p.default, p.annotation) for p in run.values() if p.name not in RUN_ONLY]
        assert [(p.name, p.kind, p.default, p.annotation) for p in plan.values()] == expected, plan_name
    planned = {name for name in tlp.__all__ if name.startswith("plan_")}
    assert planned == set(PLANS_OF.values()), "a new plan_ function needs its entry in PLANS_OF"


NEW_ORDER = ("model", "orig_input", "patching_metric", "new_input", "new_cache")
"""The public argument order of every function added after the prior art's two (docs/architecture.md):
the model, what it works on (right after the model), the orig input, the metric, then where values come from."""
PRIOR_ART = {"act_patch", "plan_act_patch", "path_patch", "plan_path_patch"}
PATH_FAMILY = {"attr_path_patch", "confirm_paths"}
"""Estimates and confirmations of path_patch, which take path_patch's order so that calls convert."""


def test_new_functions_take_the_public_argument_order():
    """Every public function that takes a model and an orig input follows one order (what it works
    on right after the model, a sweep's nodes where `act_patch` has them); `max_memory` and
    `progress` everywhere, keyword-only, as `batch_size` wherever it is taken."""
    for name in tlp.__all__:
        function = getattr(tlp, name)
        if not inspect.isfunction(function) or name in PRIOR_ART:
            continue
        parameters = inspect.signature(function).parameters
        if "orig_input" not in parameters:
            continue
        positional = [p.name for p in parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if name not in PATH_FAMILY:
            what = [p for p in positional if p not in NEW_ORDER and p != "patching_nodes"]
            assert [p for p in positional if p in NEW_ORDER] == list(NEW_ORDER), (name, positional)
            assert positional[0] == "model" and what in ([], [positional[1]]), (name, positional)
            if "patching_nodes" in positional:
                assert positional.index("patching_nodes") == positional.index("orig_input") + 1, (name, positional)
        for option in ("batch_size", "max_memory", "progress"):
            if option in parameters:
                assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
        assert "max_memory" in parameters, f"{name} takes no max_memory"
        if not name.startswith("plan_"):
            assert "progress" in parameters, f"{name} takes no progress"


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
    marker = "# fmt" + ": skip"  # spelled in two parts, so that this file does not contain it
    assert not [path for path in sources if marker in path.read_text()]
