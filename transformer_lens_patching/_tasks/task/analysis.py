"""The circuit-analysis job on a task file (`tl-patch analyze --task FILE`): the steps every task
shares (`TASK_STEPS`) on the task's prompt pairs, its answers read at each prompt's end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformer_lens_patching as tlp

from ...errors import PatchingError
from ..job.analysis import Analysis, JobSettings, patching_plans, planned_steps, run_job
from ..job.prompts import JobPrompts
from ..job.steps import TASK_STEPS
from .loader import END, Task, TaskTokens

STEP_KEYS = tuple(step.key for step in TASK_STEPS)
"""The steps of the job on a task, in the order they run (after the logit differences)."""


@dataclass(frozen=True)
class TaskSettings(JobSettings):
    """What `run_task` runs on: which rows of the task, and what every step runs with (`top_k`,
    `min_effect`, `fdr`, `batch_size`, `top_neurons`, `circuit_candidates`, `circuit_faithfulness`:
    see `JobSettings`).

    Args:
        n_prompts: The task's first `n_prompts` rows (None: all of them).
        prepend_bos: Start every prompt with BOS.
    """

    n_prompts: int | None = None
    prepend_bos: bool = True


def task_prompts(task: Task, tokens: TaskTokens) -> JobPrompts:
    """The job's prompts of a task tokenized for a model. The by-position step patches at the task's
    labelled positions and `end`; where the task labels none, at every position counted back from
    each prompt's end (`end-3`, ..., `end`), as far back as its shortest prompt reaches, so that
    right-padded prompts of different lengths line up where their answers are read."""
    positions = dict(tokens.positions)
    if list(positions) == [END]:
        shortest = int(tokens.end.min())
        positions = {(f"{END}-{back}" if back else END): tokens.end - back for back in range(shortest, -1, -1)}
    return JobPrompts(
        task=task.name,
        clean=tokens.clean,
        corrupted=tokens.corrupted,
        answers=tokens.answers,
        choices=tokens.choices,
        end=tokens.end,
        positions=positions,
        clean_texts=tuple(row.clean for row in task.rows),
        corrupted_texts=tuple(row.corrupted for row in task.rows),
        answer_texts=tuple(row.answers[0] for row in task.rows),
        wrong_texts=tuple(row.wrong[0] for row in task.rows),
    )


def rows_of(task: Task, settings: TaskSettings) -> Task:
    """The task's first `settings.n_prompts` rows."""
    if settings.n_prompts is None:
        return task
    if settings.n_prompts > len(task):
        raise PatchingError(
            f"{settings.n_prompts} prompts asked for (--n-prompts, TaskSettings.n_prompts), but the task "
            f"{task.name!r} has {len(task)} rows; ask for {len(task)} or fewer."
        )
    return task[: settings.n_prompts]


def prompts_of(model, task: Task, settings: TaskSettings = TaskSettings()) -> JobPrompts:
    """The job's prompts of `task`'s rows that `settings` takes, tokenized for `model`."""
    rows = rows_of(task, settings)
    return task_prompts(rows, rows.tokens(model, prepend_bos=settings.prepend_bos))


def planned_task_steps(model, task: Task, settings: TaskSettings = TaskSettings()) -> list[tuple[str, object]]:
    """What `tl-patch analyze --dry-run` prints: (label, plan) of each patching call, with the
    later steps at their most work, and (key, why) of each step that would be skipped on `model`."""
    return planned_steps(model, prompts_of(model, task, settings), TASK_STEPS, settings)


def plan_task(model, task: Task, settings: TaskSettings = TaskSettings()) -> list[tuple[str, tlp.PatchPlan]]:
    """The plan of each patching call `run_task` makes, with nothing run.

    >>> for step, plan in plan_task(model, load_task("greater_than")):  # doctest: +SKIP
    ...     print(step, plan)
    """
    return patching_plans(planned_task_steps(model, task, settings))


def run_task(
    model,
    task: Task,
    settings: TaskSettings = TaskSettings(),
    model_name: str = "",
    progress: bool = True,
    log: Callable = print,
    *,
    model_source: str = "",
    on_step: Callable[[Analysis], None] | None = None,
) -> Analysis:
    """Run the circuit-analysis job on `task`: the logit differences (answer over the first wrong
    answer, by their first tokens, at each prompt's end), activation patching of every head and
    of the residual stream, attention and MLP outputs at each labelled position, path patching of
    every head to the logits, attribution patching of every MLP neuron with the strongest patched
    exactly, and every edge scored, circuits evaluated exactly and one picked. `log` and `on_step`
    are as for `run_ioi`; `write_report` writes the result.

    >>> analysis = run_task(load_smollm2(), load_task("greater_than"))  # doctest: +SKIP
    >>> analysis.step("path_logits").top  # doctest: +SKIP
    """
    return run_job(
        model,
        prompts_of(model, task, settings),
        TASK_STEPS,
        settings,
        model_name=model_name,
        progress=progress,
        log=log,
        model_source=model_source,
        on_step=on_step,
    )
