"""The install cell of demos/Patching_Plugin_Demo.ipynb, against a local build of the package.

The package is not on PyPI, so the cell installs it from `TLP_INSTALL_FROM` (a path, a wheel or a
git+https URL) or from the clone the notebook sits in. Here the cell's own code, read from the
notebook, runs in a fresh virtual environment that sees the test environment's packages (torch,
TransformerLens, ...) but not this checkout's editable install, with pip offline (no index, no
dependencies, no build isolation); `import transformer_lens_patching` must then come from the new
install, not from this checkout. The install does not depend on TransformerLens' version, so
this runs in the TransformerLens 4 environment only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import TL_MAJOR

pytestmark = pytest.mark.skipif(
    TL_MAJOR < 4, reason="the install is checked once, in the TransformerLens 4 environment"
)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "demos" / "Patching_Plugin_Demo.ipynb"
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "tl_patch.py", "transformer_lens_patching")
TIMEOUT_S = 120
WHERE = "import transformer_lens_patching; print(transformer_lens_patching.__file__)"


def install_code() -> str:
    """The notebook's code up to its install: the cell that sets MODEL, then the install cell."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    cells = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    model_cell = next(source for source in cells if "TLP_DEMO_MODEL" in source)
    install_cell = next(source for source in cells if "TLP_INSTALL_FROM" in source)
    magics = [line for line in install_cell.splitlines() if line.lstrip().startswith(("%", "!"))]
    assert not magics, f"the install cell should be plain Python (it runs outside IPython here): {magics}"
    return model_cell + "\n" + install_cell


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the repository's package sources, with the notebook in demos/ (built there, not here)."""
    folder = tmp_path_factory.mktemp("clone") / "transformer_lens_patching-clone"
    folder.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=ignore)
        else:
            shutil.copy2(source, folder / name)
    (folder / "demos").mkdir()
    shutil.copy2(NOTEBOOK, folder / "demos" / NOTEBOOK.name)
    return folder


@pytest.fixture(scope="module")
def wheel(clone, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*command, "-w", str(folder), str(clone)], check=True, timeout=TIMEOUT_S, env=_pip_env())
    (built,) = folder.glob("transformer_lens_patching-*.whl")
    return built


def _pip_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TLP_INSTALL_FROM")}
    env.update(
        PIP_NO_INDEX="1",
        PIP_NO_DEPS="1",
        PIP_NO_BUILD_ISOLATION="0",  # pip's double negative: "0" turns build isolation off
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TLP_DEMO_MODEL="gpt2",  # nothing is loaded; only the package itself is in question
    )
    env.update(extra)
    return env


@pytest.fixture
def venv(tmp_path) -> Path:
    """A fresh virtual environment's python, which sees this environment's site-packages as plain
    folders: their dependencies import, but the .pth hook of this checkout's editable install does
    not run, so transformer_lens_patching does not import until the cell installs it.
    (`--system-site-packages` alone reaches the base interpreter's packages, not this venv's.)"""
    folder = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
        check=True,
        timeout=TIMEOUT_S,
    )
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "_test_environment.pth").write_text("".join(f"{path}\n" for path in ours))
    return python


def _run(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=_pip_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _installed_at(python: Path, cwd: Path) -> Path:
    result = _run(python, WHERE, cwd)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1]).resolve()


def test_not_importable_before(venv, tmp_path):
    result = _run(venv, WHERE, tmp_path)
    assert result.returncode != 0 and "No module named 'transformer_lens_patching'" in result.stderr


def test_install_from_a_wheel(venv, wheel, tmp_path):
    """TLP_INSTALL_FROM names the wheel; then, with the package importable, the cell installs nothing."""
    result = _run(venv, install_code(), tmp_path, TLP_INSTALL_FROM=str(wheel))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"pip install {wheel}" in result.stdout
    location = _installed_at(venv, tmp_path)
    assert location.is_relative_to(venv.parent.parent.resolve()), location
    assert not location.is_relative_to(ROOT), location

    again = _run(venv, install_code(), tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pip install" not in again.stdout


def test_install_from_the_clone(venv, clone):
    """Run from the clone's demos/ folder, as Jupyter does, with no TLP_INSTALL_FROM: pip installs the clone."""
    result = _run(venv, install_code(), clone / "demos")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"pip install {clone.resolve()}" in result.stdout
    location = _installed_at(venv, clone / "demos")
    assert location.is_relative_to(venv.parent.parent.resolve()), location
    assert not location.is_relative_to(ROOT), location


def test_outside_a_clone_it_says_what_to_set(venv, tmp_path):
    result = _run(venv, install_code(), tmp_path)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr and "TLP_INSTALL_FROM" in result.stderr
