"""The circuit-analysis job on any prompts, as data: `run_job(model, prompts, steps, settings)`.

It measures the clean and corrupted logit differences, then runs each step of a table of
`JobStep`s (`steps.TASK_STEPS` for any task; the IOI job adds its own), the heads one step
picks being the next step's receivers. Every step plans first, so `planned_steps` gives the
whole job's plans with nothing run (`--dry-run`), and the time estimate is their work.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import transformer_lens_patching as tlp

from ... import _tl
from ...errors import PatchingError
from ...metrics import calibrate, denoising_metric, noising_metric
from .prompts import JobPrompts
from .records import Step
from .step import Context, JobStep, Receivers, Skipped
from .uncertainty import CI_LEVEL, mean_uncertainty, uncertainty_of


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What every step of the job runs with (keyword arguments only, so that the settings of a job,
    such as `IOISettings`, take their own first).

    Args:
        top_k: The most heads taken from each step into the next.
        min_effect: The smallest effect a head needs to be listed and taken into the next
            step, as a fraction of the clean - corrupted logit difference (the scale of every
            step's values): a floor on the size of the effects given a role.
        fdr: The false discovery rate at which heads are named: a head is listed and taken into
            the next step only if its effect is significant (a sign-flip permutation test over
            the prompts, exact up to 12 prompts) after Benjamini-Hochberg control over all the
            heads of its step, as well as at least `min_effect` in size. `tl-patch` uses 0.05.
        batch_size: Variants per forward pass (None: automatic).
        top_neurons: The MLP neurons the neuron step patches exactly: those whose effect
            attribution patching estimates largest in size.
        circuit_candidates: The edges the circuit step scores exactly: the strongest by EAP-IG.
        circuit_faithfulness: The faithfulness the circuit step's circuit must reach: it is the
            smallest of MIB's circuit sizes that does, on the best ranking.
    """

    top_k: int = 3
    min_effect: float = 0.05
    fdr: float = 0.05
    batch_size: int | None = None
    top_neurons: int = 20
    circuit_candidates: int = 50
    circuit_faithfulness: float = 0.8


@dataclass
class Analysis:
    """Everything `run_job` measured, ready for a report; while it runs, the steps done so far."""

    settings: JobSettings
    model_name: str
    prompts: JobPrompts
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    steps: list[Step]
    seconds: float
    step_keys: tuple[str, ...] = ()
    """The steps the job runs after the logit differences, in order."""
    model_source: str = ""
    """Where the model's weights came from (e.g. the embedded SmolLM2 is a dequantised 4-bit GGUF)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The versions of the library, TransformerLens, torch and Python that ran the analysis."""
    estimated_seconds: float | None = None
    """The time the plans predicted for the patching steps (at most: later steps at their upper bound)."""
    d_model: int | None = None
    """The model's `d_model`, which the EAP-IG files of the circuit record."""
    clean_accuracy: float | None = None
    """The fraction of clean prompts whose answer's first token scores above every wrong answer's."""
    corrupted_accuracy: float | None = None
    """The same fraction on the corrupted prompts (still scored by the clean prompts' answers)."""

    def step(self, key: str) -> Step:
        """The step called `key`."""
        for step in self.steps:
            if step.key == key:
                return step
        raise PatchingError(f"No step {key!r}; steps: {[s.key for s in self.steps]}.")

    @property
    def missing_steps(self) -> list[str]:
        """The steps of `step_keys` not run (yet): those after an interruption or a failure."""
        done = {step.key for step in self.steps}
        return [key for key in self.step_keys if key not in done]


def _planning_context(model, prompts: JobPrompts, settings: JobSettings) -> Context:
    """The steps' context for planning alone: nothing is measured, so the logit difference stands
    in for the metrics normalised by the measured ones (the plans' work is the same)."""
    logit_diff = prompts.logit_diff()
    return Context(model, settings, prompts, logit_diff, restored=logit_diff, damaged=logit_diff)


def _plans_at_most(
    ctx: Context, steps: tuple[JobStep, ...]
) -> list[tuple[JobStep, dict[str, tlp.PatchPlan] | Skipped]]:
    """Each step's plans with its receivers at their upper bound (`top_k` heads in the last
    layer), or why it is skipped."""
    planned = []
    receivers: Receivers = ctx.upper_bound_receivers()
    for step in steps:
        try:
            plans = step.planned(ctx, receivers)
        except Skipped as skip:
            planned.append((step, skip))
            receivers = None
        else:
            planned.append((step, plans))
            receivers = ctx.upper_bound_receivers()
    return planned


def planned_steps(
    model, prompts: JobPrompts, steps: tuple[JobStep, ...], settings: JobSettings
) -> list[tuple[str, tlp.PatchPlan | str]]:
    """What `--dry-run` prints: (label, plan) of each patching call, with the later path steps'
    receivers at their upper bound (`top_k` heads in the last layer, the most work they can take)
    and the neuron step's exact patching at its most work, and (key, why) of each step that would
    be skipped on `model`. The screens (one forward and one backward pass each) have no plan."""
    entries: list[tuple[str, tlp.PatchPlan | str]] = []
    for step, plans in _plans_at_most(_planning_context(model, prompts, settings), steps):
        if isinstance(plans, Skipped):
            entries.append((step.key, f"Skipped: {plans}"))
        else:
            entries += [(f"{label}{step.bound}", plan) for label, plan in plans.items()]
    return entries


def patching_plans(entries: list[tuple[str, tlp.PatchPlan | str]]) -> list[tuple[str, tlp.PatchPlan]]:
    """The (label, plan) entries of `planned_steps`, without the steps it says are skipped."""
    return [(label, plan) for label, plan in entries if isinstance(plan, tlp.PatchPlan)]


def versions() -> dict[str, str]:
    """The versions of what runs the analysis: this library, TransformerLens, torch and Python."""
    try:
        library = importlib.metadata.version("transformer_lens_patching")
    except importlib.metadata.PackageNotFoundError:
        library = "not installed"
    return {
        "transformer_lens_patching": library,
        "transformer_lens": _tl.TL_VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_job(
    model,
    prompts: JobPrompts,
    steps: tuple[JobStep, ...],
    settings: JobSettings,
    *,
    model_name: str = "",
    progress: bool = True,
    log: Callable = print,
    model_source: str = "",
    on_step: Callable[[Analysis], None] | None = None,
    make: Callable[..., Analysis] = Analysis,
) -> Analysis:
    """Run the job's `steps` on `prompts`; `make` builds the analysis from `Analysis`'s fields
    (the IOI job's adds its datasets).

    `log` receives a header line before each step ("step 2/6: activation patching of ..."),
    the estimated time of the whole run (from the plans) and a line of findings after each
    step; progress bars are labelled with their step. `on_step` receives the analysis once the
    logit differences are known and after each step, e.g. to save what is finished; if a step
    fails, what it received last holds every step before.
    """
    start = time.perf_counter()
    count = 1 + len(steps)
    log(f"step 1/{count}: logit differences of {prompts.n} clean and {prompts.n} corrupted prompts")
    logit_diff = prompts.logit_diff()
    clean, corrupted_run = calibrate(model, logit_diff, prompts.clean, prompts.corrupted)
    clean_ld, corrupted_ld = clean.per_prompt.as_tensor(), corrupted_run.per_prompt.as_tensor()
    log(
        f"  Logit difference ({prompts.difference} at the end): clean {_with_error(clean_ld)}, "
        f"corrupted {_with_error(corrupted_ld)}"
    )
    clean_accuracy, corrupted_accuracy = (
        float(value) for value in calibrate(model, prompts.accuracy(), prompts.clean, prompts.corrupted)
    )
    log(
        f"  Accuracy (the answer above every wrong answer at the end): clean {clean_accuracy:.0%}, "
        f"corrupted {corrupted_accuracy:.0%} of {prompts.n} prompts"
    )
    ctx = Context(
        model,
        settings,
        prompts,
        logit_diff,
        restored=denoising_metric(logit_diff, clean, corrupted_run),
        damaged=noising_metric(logit_diff, clean, corrupted_run),
    )
    analysis = make(
        settings=settings,
        model_name=model_name,
        prompts=prompts,
        clean_logit_diff=clean_ld.cpu(),
        corrupted_logit_diff=corrupted_ld.cpu(),
        steps=[],
        seconds=0.0,
        step_keys=tuple(step.key for step in steps),
        model_source=model_source,
        versions=versions(),
        d_model=ctx.shape.d_model,
        clean_accuracy=clean_accuracy,
        corrupted_accuracy=corrupted_accuracy,
    )
    analysis.estimated_seconds = _estimate(ctx, steps, log)
    if on_step is not None:
        on_step(analysis)
    receivers: Receivers = []
    for number, step in enumerate(steps, start=2):
        label = f"step {number}/{count}"
        log(f"{label}: {step.header(ctx, receivers)}")
        began = time.perf_counter()
        record = _run_step(step, ctx, receivers, label if progress else False)
        record.seconds = time.perf_counter() - began
        analysis.steps.append(record)
        analysis.seconds = time.perf_counter() - start
        log(_finding_line(record))
        if on_step is not None:
            on_step(analysis)
        receivers = next(iter(record.top.values()), []) if record.results else None
    return analysis


def _run_step(step: JobStep, ctx: Context, receivers: Receivers, bars: bool | str) -> Step:
    """Plan, compute and pick: the step's record, or a record of why it is skipped."""
    try:
        plans = step.planned(ctx, receivers)
    except Skipped as skip:
        return Step(step.key, step.title, f"Skipped: {skip}", {})
    outcome = step.compute(ctx, plans, bars)
    uncertainty = {
        name: error for name, result in outcome.results.items() if (error := uncertainty_of(result, ctx.settings.fdr))
    }
    z = outcome.results.get("z")
    return Step(
        step.key,
        step.title,
        step.describe(ctx, receivers, outcome),
        outcome.results,
        {role: ctx.heads(z, sign, uncertainty.get("z")) for role, sign in step.roles.items()},
        confirmation=outcome.confirmation,
        circuit=outcome.circuit,
        uncertainty=uncertainty,
        not_significant={role: ctx.not_significant(z, sign, uncertainty.get("z")) for role, sign in step.roles.items()},
    )


def _with_error(per_prompt: torch.Tensor) -> str:
    """'4.507 ± 0.564 (95% CI 3.402 to 5.611)': a mean over prompts, its standard error and
    interval (the mean alone for one prompt)."""
    error = mean_uncertainty(per_prompt)
    if error.stderr is None:
        return f"{per_prompt.mean():.3f}"
    return f"{per_prompt.mean():.3f} ± {error.stderr:.3f} ({CI_LEVEL:.0%} CI {error.ci_low:.3f} to {error.ci_high:.3f})"


def _finding_line(step: Step) -> str:
    """The line logged after a step: its title, time and findings, or its description where it
    has no results (skipped, or the circuit step)."""
    if not step.results:
        return f"  {step.description}"
    parts = [
        f"{name}: {', '.join(map(str, heads)) or 'none'}"
        + (
            f" ({count}{' more' if heads else ''} reached the size floor but not significance)"
            if (count := step.not_significant[name])
            else ""
        )
        for name, heads in step.top.items()
    ]
    if step.confirmation is not None:
        parts.append(_confirmation_line(step.confirmation))
    return f"  {step.title} ({step.seconds:.0f} s)" + (": " + "; ".join(parts) if parts else "")


def _confirmation_line(confirmation: tlp.Confirmation) -> str:
    """'strongest exactly: L3 N1234 (+4.0%), ...; Spearman 0.85 between estimate and exact, top-10 overlap 8 of 10'."""
    strongest = sorted(confirmation.cells, key=lambda cell: -abs(cell.exact_change))[:3]
    cells = ", ".join(f"L{c.coords['layer']} N{c.coords['neuron']} ({c.exact_change:+.1%})" for c in strongest)
    return (
        f"strongest exactly: {cells}; Spearman {confirmation.spearman:.2f} between estimate and exact, "
        f"top-{confirmation.overlap_size} overlap {confirmation.top_k_overlap} of {confirmation.overlap_size}"
    )


def _estimate(ctx: Context, steps: tuple[JobStep, ...], log: Callable) -> float:
    """The patching steps' time: the plans' work in layer evaluations, and the work no plan holds
    (the screens), times one layer's measured time (the steps with a `bound` at their most work);
    logged, and returned in seconds."""
    planned = [(step, plans) for step, plans in _plans_at_most(ctx, steps) if not isinstance(plans, Skipped)]
    plans = [plan for _, step_plans in planned for plan in step_plans.values()]
    screens = round(sum(step.unplanned_passes(ctx) for step, _ in planned) * ctx.shape.n_layers)
    work = sum(plan.layer_evaluations for plan in plans) + screens
    stacked = max(plan.variants_per_pass for plan in plans)
    per_layer = _tl.time_layers(ctx.model, ctx.prompts.clean, stacked)
    seconds = work * per_layer
    bounded = [step.key for step, _ in planned if step.bound]
    log(
        f"  Estimated time of the patching, steps 2-{1 + len(steps)}: "
        f"about {_duration(seconds)} ({work:,} layer evaluations, "
        f"{per_layer * 1000:.2f} ms each as measured with {stacked} variants stacked"
        + (f"; {listed(bounded)} at {'their' if len(bounded) > 1 else 'its'} most work)" if bounded else ")")
    )
    return seconds


def listed(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _duration(seconds: float) -> str:
    """'40 s', '7 min', '1 h 20 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
