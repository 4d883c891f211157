"""MkDocs hook: the notebooks in demos/ become the pages demos/<name>.ipynb of the site.

The notebooks are kept once, in demos/, where tests/properties/test_demos.py executes them; the docs
render the same files through mkdocs-jupyter. The hook runs before mkdocs-jupyter's
`on_files`, which then converts them like notebooks under docs/.
"""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


@event_priority(100)
def on_files(files, config):
    for notebook in sorted((ROOT / "demos").glob("*.ipynb")):
        files.append(File(f"demos/{notebook.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
