"""Indirect object identification (IOI): prompts, the circuit analysis and its report.

`IOIDataset` draws seeded IOI prompts (the IOI paper's templates and names) with the
position of each word; `flipped` makes corrupted copies. `run_ioi` runs the analysis of
the IOI paper on any model and `write_report` writes it as HTML, JSON and CSV. The word
lists (`NAMES`, `PLACES`, `OBJECTS`, the templates) are those of the prior art's
`ioi_dataset` module, so `from ioi_dataset import IOIDataset, NAMES` becomes
`from transformer_lens_patching.ioi import IOIDataset, NAMES`.
"""

from ._tasks.ioi.analysis import STEP_KEYS as STEP_KEYS
from ._tasks.ioi.analysis import IOIAnalysis as IOIAnalysis
from ._tasks.ioi.analysis import IOISettings as IOISettings
from ._tasks.ioi.analysis import plan_ioi as plan_ioi
from ._tasks.ioi.analysis import run_ioi as run_ioi
from ._tasks.ioi.dataset import FLIPS as FLIPS
from ._tasks.ioi.dataset import IOIDataset as IOIDataset
from ._tasks.ioi.dataset import IOIPrompt as IOIPrompt
from ._tasks.ioi.dataset import example_prompts as example_prompts
from ._tasks.ioi.words import ABBA_TEMPLATES as ABBA_TEMPLATES
from ._tasks.ioi.words import ABC_TEMPLATES as ABC_TEMPLATES
from ._tasks.ioi.words import BABA_TEMPLATES as BABA_TEMPLATES
from ._tasks.ioi.words import BAC_TEMPLATES as BAC_TEMPLATES
from ._tasks.ioi.words import NAMES as NAMES
from ._tasks.ioi.words import OBJECTS as OBJECTS
from ._tasks.ioi.words import PLACES as PLACES
from ._tasks.job.records import Step as Step
from ._tasks.job.records import TopHead as TopHead
from ._tasks.job.records import top_heads as top_heads
from ._tasks.job.report import write_json as write_json
from ._tasks.job.report import write_report as write_report

__all__ = [
    "ABBA_TEMPLATES",
    "ABC_TEMPLATES",
    "BABA_TEMPLATES",
    "BAC_TEMPLATES",
    "FLIPS",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "STEP_KEYS",
    "IOIAnalysis",
    "IOIDataset",
    "IOIPrompt",
    "IOISettings",
    "Step",
    "TopHead",
    "example_prompts",
    "plan_ioi",
    "run_ioi",
    "top_heads",
    "write_json",
    "write_report",
]
