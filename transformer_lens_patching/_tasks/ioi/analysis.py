"""The IOI analysis of the IOI paper and the prior art's notebook, on any model: the job of any
task (`_tasks.job`) on IOI prompts, plus its IOI steps.

`run_ioi(model, settings)` measures the clean and corrupted logit differences, patches
every head and the residual stream, attention and MLP outputs at each word (denoising),
path-patches every head to the logits (noising), and then follows the circuit back: into
the queries of the heads that step found (the name movers), and into the values of the heads
that feed those queries (the S-inhibition heads). Heads are chosen from the results, never
from a list. It screens every MLP neuron with attribution patching and patches the strongest
exactly (`confirm`): exact sweeps of every neuron would take thousands of times longer. Last,
it scores every edge, evaluates circuits of growing size exactly and picks one. The steps are
the table `IOI_STEPS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import transformer_lens_patching as tlp

from ... import _tl
from ..job.analysis import Analysis, JobSettings, patching_plans, planned_steps, run_job
from ..job.prompts import JobPrompts
from ..job.steps import ACT_HEADS, ATTR_NEURONS, CIRCUIT, by_position, into_heads, path_to_logits
from .dataset import IOIDataset

WORDS = ("S1", "S1+1", "IO", "punct", "S2", "end")
"""The word positions of the by-word step."""
IOI_STEPS = (
    ACT_HEADS,
    by_position(
        "act_words",
        "word",
        "one word of every prompt (S1, the token after it, IO, the punctuation ending the first clause, S2 and "
        "the end)",
    ),
    path_to_logits({"name movers (lower the logit diff)": -1, "negative name movers (raise it)": +1}),
    into_heads("path_queries", "q", "the name movers' queries", "S-inhibition heads"),
    into_heads("path_values", "v", "the S-inhibition heads' values", "heads writing into them"),
    ATTR_NEURONS,
    CIRCUIT,
)
"""The IOI analysis: every step, in the order they run."""
STEP_KEYS = tuple(step.key for step in IOI_STEPS)
"""The steps of the analysis that patch, in the order they run (after the logit differences)."""


@dataclass(frozen=True)
class IOISettings(JobSettings):
    """What `run_ioi` runs on: the prompts, and what every step runs with (`top_k`, `min_effect`,
    `fdr`, `batch_size`, `top_neurons`, `circuit_candidates`, `circuit_faithfulness`, as
    documented on the job's settings in the API reference).

    Args:
        n_prompts: Number of IOI prompts (the circuit step scores edges on half of them and measures
            faithfulness on the other half).
        seed: Seed of the dataset.
        prompt_type: "mixed", "ABBA" or "BABA".
        prepend_bos: Start every prompt with BOS.
        corruption: How the corrupted prompts are made from the clean ones (an
            `IOIDataset.flipped` rule); the default replaces every name by a random one
            (the IOI paper's ABC dataset).
    """

    n_prompts: int = 8
    seed: int = 0
    prompt_type: str = "mixed"
    prepend_bos: bool = False
    corruption: str = "ABB->XYZ, BAB->XYZ"


@dataclass
class IOIAnalysis(Analysis):
    """Everything `run_ioi` measured, ready for a report; while it runs, the steps done so far.
    `dataset` and `corrupted` are the IOI prompts the job's `prompts` were made from."""

    dataset: IOIDataset | None = None
    corrupted: IOIDataset | None = None


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


def ioi_prompts(dataset: IOIDataset, corrupted: IOIDataset) -> JobPrompts:
    """The job's prompts of an IOI dataset and its corrupted copy: answers IO over S, read at the
    end, the by-word step at `WORDS`."""
    return JobPrompts(
        task="IOI",
        clean=dataset.toks,
        corrupted=corrupted.toks,
        answers=dataset.answers,
        choices=dataset.answers,
        end=dataset.word_idx["end"],
        positions={word: dataset.word_idx[word] for word in WORDS},
        clean_texts=tuple(dataset.sentences),
        corrupted_texts=tuple(corrupted.sentences),
        answer_texts=tuple(prompt.io for prompt in dataset.prompts),
        wrong_texts=tuple(prompt.s for prompt in dataset.prompts),
        difference="IO - S",
        texts_end_with_answer=True,
        answer_key="io",
        wrong_key="s",
    )


def planned_ioi_steps(model, settings: IOISettings = IOISettings()) -> list[tuple[str, tlp.PatchPlan | str]]:
    """What `tl-patch ioi --dry-run` prints: (label, plan) of each patching call, as `plan_ioi`
    gives them, and (key, why) of each step that would be skipped on `model`."""
    return planned_steps(model, ioi_prompts(*_datasets(model, settings)), IOI_STEPS, settings)


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
    return patching_plans(planned_ioi_steps(model, settings))


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

    `log` receives a header line before each step ("step 2/8: activation patching of ..."),
    the estimated time of the whole run (from the plans) and a line of findings after each
    step; progress bars are labelled with their step. `on_step` receives the analysis once the
    logit differences are known and after each step, e.g. to save what is finished; if a step
    fails, what it received last holds every step before.

    >>> analysis = run_ioi(load_smollm2(), IOISettings(n_prompts=8))  # doctest: +SKIP
    >>> [str(h) for h in analysis.step("path_logits").top["name movers (lower the logit diff)"]]  # doctest: +SKIP
    """
    dataset, corrupted = _datasets(model, settings)
    return run_job(
        model,
        ioi_prompts(dataset, corrupted),
        IOI_STEPS,
        settings,
        model_name=model_name,
        progress=progress,
        log=log,
        model_source=model_source,
        on_step=on_step,
        make=functools.partial(IOIAnalysis, dataset=dataset, corrupted=corrupted),
    )
