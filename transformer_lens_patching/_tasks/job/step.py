"""One step of the circuit-analysis job: what it works on, what it is, what it computes.

A `JobStep` is declared once (`steps`, and the IOI job's own in `_tasks.ioi.analysis`) and read
three ways: `run_job` plans, computes, picks and records it; `planned_steps`, `--dry-run` and the
time estimate plan it with its receivers at their upper bound. A step that cannot run on a model
says so when it plans: `Skipped` from the step itself, or the library's refusal (a
`PatchingError`) of a step that is `refusable`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import transformer_lens_patching as tlp

from ... import _tl
from ...errors import PatchingError
from ...metrics import LogitDiff
from ...results import PatchResult
from .circuit_step import CircuitFinding
from .prompts import JobPrompts
from .records import TopHead, Uncertainty, not_significant, top_heads

if TYPE_CHECKING:
    from .analysis import JobSettings

Receivers = list[TopHead] | None
"""The heads the step before picked (its first role's), which a path step receives at; None
when the step before has no results (it was skipped)."""


class Skipped(Exception):
    """The step cannot run on this model, or with these receivers; the message says why."""


@dataclass(frozen=True)
class Context:
    """What every step works on: the model, the prompts, the metrics and the settings."""

    model: object
    settings: JobSettings
    prompts: JobPrompts
    logit_diff: LogitDiff
    """The logit difference (answer - wrong) at the end, unnormalised (the circuit step's metric)."""
    restored: Callable
    """The fraction of the clean logit difference a patch restores (denoising)."""
    damaged: Callable
    """The change of the logit difference as a fraction of clean - corrupted (noising)."""

    @cached_property
    def shape(self) -> _tl.ModelShape:
        """The model's sizes."""
        return _tl.model_shape(self.model)

    def heads(self, result: PatchResult, sign: int, uncertainty: Uncertainty | None = None) -> list[TopHead]:
        """The heads of `result` with the largest effect of `sign`, as the settings allow: at most
        `top_k`, each at least `min_effect` in size and, given the result's `uncertainty`, significant."""
        return top_heads(result, self.settings.top_k, sign, self.settings.min_effect, uncertainty)

    def not_significant(self, result: PatchResult, sign: int, uncertainty: Uncertainty | None) -> int:
        """How many heads of `result` reach `min_effect` with `sign` but are not significant."""
        return not_significant(result, sign, self.settings.min_effect, uncertainty)

    def upper_bound_receivers(self) -> list[TopHead]:
        """`top_k` heads in the last layer: the receivers that give a path step the most work."""
        last = self.shape.n_layers - 1
        return [TopHead(last, head, 0.0) for head in range(min(self.settings.top_k, self.shape.n_heads))]


@dataclass(frozen=True)
class Outcome:
    """What a step computed: its results, and what the neuron and circuit steps found."""

    results: dict[str, PatchResult]
    confirmation: tlp.Confirmation | None = None
    circuit: CircuitFinding | None = None


def _computed(ctx: Context, plans: dict[str, tlp.PatchPlan], bars: bool | str) -> Outcome:
    """The step's one plan, run."""
    (plan,) = plans.values()
    return Outcome(plan.compute(progress=bars))


def _no_passes(ctx: Context) -> float:
    """No work outside the plans."""
    return 0


@dataclass(frozen=True)
class JobStep:
    """One step of the analysis, written once: its run, its plans and its prose."""

    key: str
    """The step's name in results.json and the report."""
    title: str
    header: Callable[[Context, Receivers], str]
    """What the step's header line announces, after "step 2/8: "."""
    plan: Callable[[Context, Receivers], dict[str, tlp.PatchPlan]]
    """The step's plans by label; raises `Skipped` where the step cannot run."""
    describe: Callable[[Context, Receivers, Outcome], str]
    """What the step did and what its values mean."""
    compute: Callable[[Context, dict[str, tlp.PatchPlan], bool | str], Outcome] = _computed
    """Runs the step from its plans; the last argument labels the progress bars (False: none)."""
    roles: dict[str, int] = field(default_factory=dict)
    """The heads picked from the `z` result, role -> sign (-1: those lowering the logit
    difference most); the first role's heads are the next step's receivers."""
    refusable: bool = False
    """Whether the library may refuse the step's plans on some models: a `PatchingError` from
    `plan` then skips the step, with the error's message."""
    bound: str = ""
    """What `planned_steps` adds to each label: the plans are of the step's most work."""
    unplanned_passes: Callable[[Context], float] = _no_passes
    """Work no plan holds, in passes of every layer over all the prompts, for the time estimate."""

    def planned(self, ctx: Context, receivers: Receivers) -> dict[str, tlp.PatchPlan]:
        """`plan`, a refusal of a `refusable` step raised as `Skipped`."""
        try:
            return self.plan(ctx, receivers)
        except PatchingError as refusal:
            if not self.refusable:
                raise
            raise Skipped(str(refusal)) from refusal
