"""The circuit-analysis job on any task: `run_task(model, load_task(...))`, as `tl-patch analyze` runs it.

The job measures the clean and corrupted logit differences (the answer over the first wrong
answer, by their first tokens, at each prompt's end), patches every head and the residual
stream, attention and MLP outputs at each labelled position, path-patches every head to the
logits, screens every MLP neuron by attribution patching and patches the strongest exactly,
and scores every edge, evaluates circuits exactly and picks one; `write_report` writes the
HTML report, results.json and results.csv, and the circuit and every edge's score in EAP-IG's
graph JSON. `tl-patch ioi` (`transformer_lens_patching.ioi`)
is this job on IOI prompts, with two more path-patching steps.
"""

from ._tasks.job.analysis import Analysis as Analysis
from ._tasks.job.analysis import JobSettings as JobSettings
from ._tasks.job.report import write_json as write_json
from ._tasks.job.report import write_report as write_report
from ._tasks.task.analysis import STEP_KEYS as STEP_KEYS
from ._tasks.task.analysis import TaskSettings as TaskSettings
from ._tasks.task.analysis import plan_task as plan_task
from ._tasks.task.analysis import run_task as run_task

__all__ = [
    "STEP_KEYS",
    "Analysis",
    "JobSettings",
    "TaskSettings",
    "plan_task",
    "run_task",
    "write_json",
    "write_report",
]
