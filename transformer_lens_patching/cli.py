"""What `tl-patch ioi` and `tl-patch analyze` run, once `tl_patch` has read and checked their arguments.

The `tl-patch` command (also `python -m transformer_lens_patching`) is `tl_patch.main`, which
calls `run(args)` once its arguments are good; this module imports nothing of `tl_patch`.
`run(args)` loads the model and runs the analysis (`Job`: the IOI job, or the job on a task
file), saving `results.json` after every step, and writes the report at the end, or of the
steps finished when a step fails or the run is interrupted (Ctrl-C).
"""

import argparse
import contextlib
import functools
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _tl
from ._core.distributed import launched_group
from ._embedded import EMBEDDED, describe_smollm2, load_smollm2, loading_line
from ._tasks.ioi.analysis import IOISettings, planned_ioi_steps, run_ioi
from ._tasks.job.analysis import Analysis, listed
from ._tasks.job.report import CIRCUIT, CSV, EDGE_SCORES, JSON, REPORT, write_json, write_report
from ._tasks.task.analysis import TaskSettings, planned_task_steps, rows_of, run_task
from ._tasks.task.loader import load_task
from .errors import PatchingError

LOADING_ERRORS = (OSError, ValueError, ImportError)
"""What a model that cannot be loaded raises: a missing file or hub entry (OSError), a name
no loader knows or a folder it cannot read (ValueError), a missing package (ImportError).
Anything else is a bug, and its traceback is shown."""
INTERRUPTED = 130
"""The exit status after Ctrl-C, as shells report a process ended by SIGINT."""


def load_model(name: str, device: str):
    """The model `--model` names: the embedded SmolLM2-135M, a local Hugging Face folder, or
    a TransformerLens model name loaded from the Hugging Face hub."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if name == EMBEDDED:
        print(loading_line())
        return load_smollm2(device)
    try:
        if Path(name).expanduser().is_dir():
            from transformers import AutoTokenizer

            folder = str(Path(name).expanduser())
            return _tl.boot_hf_folder(folder, AutoTokenizer.from_pretrained(folder), device)
        return _tl.load_pretrained(name, device)
    except LOADING_ERRORS as error:
        raise PatchingError(_load_failure(name, error)) from error


def model_source(name: str) -> str:
    """Where the weights of the model `--model` names come from, in words."""
    if name == EMBEDDED:
        return describe_smollm2()
    if Path(name).expanduser().is_dir():
        return f"the Hugging Face model in the folder {Path(name).expanduser().resolve()}"
    return f"TransformerLens' pretrained {name!r}, from the Hugging Face hub or its local cache"


def _load_failure(name: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hub_words = ("offline", "connect", "resolve", "network", "LocalEntryNotFound", "not a local folder", "hub")
    advice = (
        f"Use the embedded model (--model {EMBEDDED}), or a local folder holding a Hugging Face model and its "
        "tokenizer (--model /path/to/folder)."
    )
    if offline or any(word.lower() in text.lower() for word in hub_words):
        cause = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        return f"Cannot load model {name!r}: {cause}, and it is not in the local cache ({text}). {advice}"
    return f"Cannot load model {name!r} ({text}). {advice}"


def settings_of(args: argparse.Namespace) -> IOISettings | TaskSettings:
    """The analysis settings the arguments give (`IOISettings` for `ioi`, `TaskSettings` for `analyze`)."""
    shared = {
        "top_k": args.top_k,
        "min_effect": args.min_effect,
        "batch_size": args.batch_size,
        "top_neurons": args.top_neurons,
        "circuit_candidates": args.circuit_candidates,
        "circuit_faithfulness": args.circuit_faithfulness,
    }
    if args.command == "analyze":
        return TaskSettings(n_prompts=args.n_prompts, prepend_bos=args.prepend_bos, **shared)
    return IOISettings(
        n_prompts=args.n_prompts,
        seed=args.seed,
        prompt_type=args.prompt_type,
        prepend_bos=args.prepend_bos,
        corruption=args.corruption,
        **shared,
    )


@dataclass(frozen=True)
class Job:
    """What a command analyses: its prompts in words, its plans on a model, and its run."""

    prompts: str
    """The prompts in words, for the line after the model loads ("8 prompts")."""
    planned: Callable[[object], list]
    """(label, plan or why skipped) of each step on a model: what `--dry-run` prints."""
    run: Callable[..., Analysis]
    """`run_ioi` or `run_task` with the settings (and task) given: called with the model and keywords."""


def job_of(args: argparse.Namespace) -> Job:
    """The job the arguments ask for; a task file is read (and every bad row reported) here,
    before the model loads."""
    settings = settings_of(args)
    if args.command == "analyze":
        loaded = load_task(args.task, counterfactual=args.counterfactual, label_prefix=args.label_prefix)
        task = rows_of(loaded, settings)
        return Job(
            f"task {task.name}: {len(task)} prompts",
            lambda model: planned_task_steps(model, task, settings),
            functools.partial(run_task, task=task, settings=settings),
        )
    return Job(
        f"{settings.n_prompts} prompts",
        lambda model: planned_ioi_steps(model, settings),
        functools.partial(run_ioi, settings=settings),
    )


@contextlib.contextmanager
def _warnings_as_notes():
    """Warnings shown as one line each ("tl-patch: note: ..."), without the source line."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"tl-patch: note: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run(args: argparse.Namespace) -> int:
    """Run `tl-patch ioi` or `tl-patch analyze` with checked arguments; returns the exit status (2 with a one-line
    message on bad input, 130 when interrupted). Under `torchrun`, every rank takes its share
    of each step's work and rank 0 alone prints and writes the report."""
    began = time.perf_counter()
    with launched_group(args.device) as (ranks, device), _warnings_as_notes():
        writer = ranks is None or ranks.rank == 0
        with open(os.devnull, "w") as silent, contextlib.redirect_stdout(sys.stdout if writer else silent):
            try:
                job = job_of(args)
                if not args.dry_run and importlib.util.find_spec("plotly") is None:
                    raise PatchingError(
                        "The report's figures need plotly: pip install 'transformer_lens_patching[plot]'."
                    )
                model = load_model(args.model, device)
                print(
                    f"{args.model}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads; "
                    f"{job.prompts}" + ("" if ranks is None else f"; {ranks.world_size} processes")
                )
                if args.dry_run:
                    for label, plan_or_skip in job.planned(model):
                        print(f"\n{label}: {plan_or_skip}")
                    return 0
                return _analyse(model, job, args, began, writer)
            except PatchingError as error:
                print(f"tl-patch: error: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("tl-patch: interrupted.", file=sys.stderr)
                return INTERRUPTED


def _analyse(model, job: Job, args: argparse.Namespace, began: float, writer: bool = True) -> int:
    """Run the analysis, saving results.json from the start and after every step; on failure or
    Ctrl-C, write the report of the steps finished, say what is missing, and end as the
    failure would. The report files of an earlier run in the folder are removed first, so
    every file there belongs to this run. A process that is not the `writer` (a rank other
    than 0) runs its share and writes nothing."""
    if not writer:
        job.run(model, model_name=args.model, progress=False, model_source=model_source(args.model))
        return 0
    folder = Path(args.out)
    for name in (REPORT, JSON, CSV, CIRCUIT, EDGE_SCORES):
        (folder / name).unlink(missing_ok=True)
    finished: list[Analysis] = []

    def save(analysis: Analysis) -> None:
        finished[:] = [analysis]
        write_json(analysis, folder)

    try:
        analysis = job.run(
            model,
            model_name=args.model,
            progress=not args.quiet,
            model_source=model_source(args.model),
            on_step=save,
        )
    except BaseException:
        _keep_what_finished(finished, folder)
        raise
    paths = write_report(analysis, folder)
    print(
        f"Wrote {listed([str(path) for path in paths.values()])} in {time.perf_counter() - began:.0f} s; "
        f"the patching steps took {sum(step.seconds for step in analysis.steps):.0f} s "
        f"(estimated {analysis.estimated_seconds:.0f} s)."
    )
    return 0


def _keep_what_finished(finished: list[Analysis], folder: Path) -> None:
    """After a failure or Ctrl-C: the report of the steps finished, and a line saying what is missing."""
    if not finished:
        print("tl-patch: stopped before the first step finished; nothing was written.", file=sys.stderr)
        return
    analysis = finished[0]
    try:
        paths = write_report(analysis, folder)
    except (OSError, KeyboardInterrupt) as error:
        print(
            f"tl-patch: stopped, and the report of the steps finished could not be written ({error!r}); "
            f"{folder / JSON} holds them.",
            file=sys.stderr,
        )
        return
    print(
        f"tl-patch: stopped before {', '.join(analysis.missing_steps)}; the steps finished are in "
        f"{paths['html']} and {paths['json']}.",
        file=sys.stderr,
    )
