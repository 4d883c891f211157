"""The IOI analysis of the IOI paper and the prior art's notebook, on any model, as data.

`run_ioi(model, settings)` measures the clean and corrupted logit differences, patches
every head and every residual-stream position (denoising), path-patches every head to
the logits (noising), and then follows the circuit back: into the queries of the heads
that step found (the name movers), and into the values of the heads that feed those
queries (the S-inhibition heads). Heads are chosen from the results, never from a list.
It screens every MLP neuron with attribution patching and patches the strongest exactly
(`confirm`): exact sweeps of every neuron would take thousands of times longer. Last, it
scores every edge, evaluates circuits of growing size exactly and picks one
(`circuit_step`). The steps are the table `steps.STEPS`.
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
from ...metrics import LogitDiff, calibrate, denoising_metric, noising_metric
from .dataset import IOIDataset
from .records import Step
from .step import Context, IOIStep, Receivers, Skipped
from .steps import STEP_KEYS, STEPS
from .uncertainty import CI_LEVEL, mean_uncertainty, uncertainty_of

STEP_COUNT = 1 + len(STEP_KEYS)
"""Steps as the progress headers count them: the logit differences, then `STEP_KEYS`."""


@dataclass(frozen=True)
class IOISettings:
    """What `run_ioi` runs on.

    Args:
        n_prompts: Number of IOI prompts (the circuit step scores edges on half of them and measures
            faithfulness on the other half).
        seed: Seed of the dataset.
        prompt_type: "mixed", "ABBA" or "BABA".
        prepend_bos: Start every prompt with BOS.
        corruption: How the corrupted prompts are made from the clean ones (an
            `IOIDataset.flipped` rule); the default replaces every name by a random one
            (the IOI paper's ABC dataset).
        top_k: The most heads taken from each step into the next.
        min_effect: The smallest effect a head needs to be listed and taken into the next
            step, as a fraction of the clean - corrupted logit difference (the scale of every
            step's values): a floor on the size of the effects given a role.
        fdr: The false discovery rate at which heads are named: a head is listed and taken into
            the next step only if its effect is significant (a sign-flip permutation test over
            the prompts, exact up to 12 prompts) after Benjamini-Hochberg control over all the
            heads of its step, as well as at least `min_effect` in size. `tl-patch ioi` uses 0.05.
        batch_size: Variants per forward pass (None: automatic).
        top_neurons: The MLP neurons the neuron step patches exactly: those whose effect
            attribution patching estimates largest in size.
        circuit_candidates: The edges the circuit step scores exactly: the strongest by EAP-IG.
        circuit_faithfulness: The faithfulness the circuit step's circuit must reach: it is the
            smallest of MIB's circuit sizes that does, on the best ranking.
    """

    n_prompts: int = 8
    seed: int = 0
    prompt_type: str = "mixed"
    prepend_bos: bool = False
    corruption: str = "ABB->XYZ, BAB->XYZ"
    top_k: int = 3
    min_effect: float = 0.05
    fdr: float = 0.05
    batch_size: int | None = None
    top_neurons: int = 20
    circuit_candidates: int = 50
    circuit_faithfulness: float = 0.8


@dataclass
class IOIAnalysis:
    """Everything `run_ioi` measured, ready for a report; while it runs, the steps done so far."""

    settings: IOISettings
    model_name: str
    dataset: IOIDataset
    corrupted: IOIDataset
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    steps: list[Step]
    seconds: float
    model_source: str = ""
    """Where the model's weights came from (e.g. the embedded SmolLM2 is a dequantised 4-bit GGUF)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The versions of the library, TransformerLens, torch and Python that ran the analysis."""
    estimated_seconds: float | None = None
    """The time the plans predicted for the patching steps (at most: later steps at their upper bound)."""

    def step(self, key: str) -> Step:
        """The step called `key`."""
        for step in self.steps:
            if step.key == key:
                return step
        raise PatchingError(f"No step {key!r}; steps: {[s.key for s in self.steps]}.")

    @property
    def missing_steps(self) -> list[str]:
        """The steps of `STEP_KEYS` not run (yet): those after an interruption or a failure."""
        done = {step.key for step in self.steps}
        return [key for key in STEP_KEYS if key not in done]


def _datasets(model, settings: IOISettings) -> tuple[IOIDataset, IOIDataset]:
    """The clean IOI prompts and their corrupted copies."""
    dataset = IOIDataset(
        settings.prompt_type,
        settings.n_prompts,
        tokenizer=model,
        seed=settings.seed,
        prepend_bos=settings.prepend_bos,
        device=_tl.model_device(model),
    )
    return dataset, dataset.flipped(settings.corruption)


def _planning_context(model, settings: IOISettings) -> Context:
    """The steps' context for planning alone: nothing is measured, so the logit difference stands
    in for the metrics normalised by the measured ones (the plans' work is the same)."""
    dataset, corrupted = _datasets(model, settings)
    logit_diff = LogitDiff(dataset.answers, dataset.word_idx["end"])
    return Context(model, settings, dataset, corrupted, logit_diff, restored=logit_diff, damaged=logit_diff)


def _plans_at_most(ctx: Context) -> list[tuple[IOIStep, dict[str, tlp.PatchPlan] | Skipped]]:
    """Each step's plans with its receivers at their upper bound (`top_k` heads in the last
    layer), or why it is skipped."""
    planned = []
    receivers: Receivers = ctx.upper_bound_receivers()
    for step in STEPS:
        try:
            plans = step.planned(ctx, receivers)
        except Skipped as skip:
            planned.append((step, skip))
            receivers = None
        else:
            planned.append((step, plans))
            receivers = ctx.upper_bound_receivers()
    return planned


def planned_steps(model, settings: IOISettings = IOISettings()) -> list[tuple[str, tlp.PatchPlan | str]]:
    """What `tl-patch ioi --dry-run` prints: (label, plan) of each patching call, as `plan_ioi`
    gives them, and (key, why) of each step that would be skipped on `model`."""
    entries: list[tuple[str, tlp.PatchPlan | str]] = []
    for step, plans in _plans_at_most(_planning_context(model, settings)):
        if isinstance(plans, Skipped):
            entries.append((step.key, f"Skipped: {plans}"))
        else:
            entries += [(f"{label}{step.bound}", plan) for label, plan in plans.items()]
    return entries


def plan_ioi(model, settings: IOISettings = IOISettings()) -> list[tuple[str, tlp.PatchPlan]]:
    """The plan of each patching call `run_ioi` makes, with nothing run (as `tl-patch ioi --dry-run` prints).

    The later path-patching steps receive at the heads the earlier ones find; they are
    planned here with `top_k` receivers in the last layer, the most work they can take. The
    neuron step's exact patching is planned with `top_neurons` neurons of the first layer,
    likewise its most work; its attribution screen (one forward and one backward pass) has
    no plan. A step that would be skipped on `model` has no plans.

    >>> for step, plan in plan_ioi(model):  # doctest: +SKIP
    ...     print(step, plan)
    """
    return [(label, plan) for label, plan in planned_steps(model, settings) if isinstance(plan, tlp.PatchPlan)]


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


def run_ioi(
    model,
    settings: IOISettings = IOISettings(),
    model_name: str = "",
    progress: bool = True,
    log: Callable = print,
    *,
    model_source: str = "",
    on_step: Callable[[IOIAnalysis], None] | None = None,
) -> IOIAnalysis:
    """Run the IOI analysis on `model`.

    `log` receives a header line before each step ("step 2/7: activation patching of ..."),
    the estimated time of the whole run (from the plans) and a line of findings after each
    step; progress bars are labelled with their step. `on_step` receives the analysis once the
    logit differences are known and after each step, e.g. to save what is finished; if a step
    fails, what it received last holds every step before.

    >>> analysis = run_ioi(load_smollm2(), IOISettings(n_prompts=8))  # doctest: +SKIP
    >>> [str(h) for h in analysis.step("path_logits").top["name movers (lower the logit diff)"]]  # doctest: +SKIP
    """
    start = time.perf_counter()
    dataset, corrupted = _datasets(model, settings)
    log(f"step 1/{STEP_COUNT}: logit differences of {dataset.N} clean and {dataset.N} corrupted prompts")
    logit_diff = LogitDiff(dataset.answers, dataset.word_idx["end"])
    clean, corrupted_run = calibrate(model, logit_diff, dataset.toks, corrupted.toks)
    clean_ld, corrupted_ld = clean.per_prompt.as_tensor(), corrupted_run.per_prompt.as_tensor()
    log(f"  Logit difference (IO - S at the end): clean {_with_error(clean_ld)}, corrupted {_with_error(corrupted_ld)}")
    ctx = Context(
        model,
        settings,
        dataset,
        corrupted,
        logit_diff,
        restored=denoising_metric(logit_diff, clean, corrupted_run),
        damaged=noising_metric(logit_diff, clean, corrupted_run),
    )
    analysis = IOIAnalysis(
        settings,
        model_name,
        dataset,
        corrupted,
        clean_ld.cpu(),
        corrupted_ld.cpu(),
        [],
        0.0,
        model_source=model_source,
        versions=versions(),
    )
    analysis.estimated_seconds = _estimate(ctx, log)
    if on_step is not None:
        on_step(analysis)
    receivers: Receivers = []
    for number, step in enumerate(STEPS, start=2):
        label = f"step {number}/{STEP_COUNT}"
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


def _run_step(step: IOIStep, ctx: Context, receivers: Receivers, bars: bool | str) -> Step:
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


def _estimate(ctx: Context, log: Callable) -> float:
    """The patching steps' time: the plans' work in layer evaluations, and the work no plan holds
    (the screens), times one layer's measured time (the later path steps and the neurons' exact
    patching at their upper bound); logged, and returned in seconds."""
    planned = [(step, plans) for step, plans in _plans_at_most(ctx) if not isinstance(plans, Skipped)]
    plans = [plan for _, step_plans in planned for plan in step_plans.values()]
    screens = round(sum(step.unplanned_passes(ctx) for step, _ in planned) * ctx.shape.n_layers)
    work = sum(plan.layer_evaluations for plan in plans) + screens
    stacked = max(plan.variants_per_pass for plan in plans)
    per_layer = _tl.time_layers(ctx.model, ctx.dataset.toks, stacked)
    seconds = work * per_layer
    log(
        f"  Estimated time of the patching, steps 2-{STEP_COUNT}: "
        f"about {_duration(seconds)} ({work:,} layer evaluations, "
        f"{per_layer * 1000:.2f} ms each as measured with {stacked} variants stacked; the path steps back from the "
        "name movers and the neurons' exact patching at their largest)"
    )
    return seconds


def _duration(seconds: float) -> str:
    """'40 s', '7 min', '1 h 20 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
