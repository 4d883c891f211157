"""What `tl-patch ioi` runs, once `tl_patch` has read and checked its arguments.

The `tl-patch` command (also `python -m transformer_lens_patching`) is `tl_patch.main`, which
calls `run(args)` once its arguments are good; this module imports nothing of `tl_patch`.
`run(args)` loads the model and runs the analysis, saving `results.json` after every step,
and writes the report at the end, or of the steps finished when a step fails or the run is
interrupted (Ctrl-C).
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

from . import _tl
from ._core.distributed import launched_group
from ._embedded import EMBEDDED, describe_smollm2, load_smollm2, loading_line
from ._tasks.ioi.analysis import planned_steps
from ._tasks.ioi.report import CSV, JSON, REPORT
from .errors import PatchingError
from .ioi import IOIAnalysis, IOISettings, run_ioi, write_json, write_report

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


def settings_of(args: argparse.Namespace) -> IOISettings:
    """The analysis settings the arguments give."""
    return IOISettings(
        n_prompts=args.n_prompts,
        seed=args.seed,
        prompt_type=args.prompt_type,
        prepend_bos=args.prepend_bos,
        corruption=args.corruption,
        top_k=args.top_k,
        min_effect=args.min_effect,
        batch_size=args.batch_size,
        top_neurons=args.top_neurons,
        circuit_candidates=args.circuit_candidates,
        circuit_faithfulness=args.circuit_faithfulness,
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
    """Run `tl-patch ioi` with checked arguments; returns the exit status (2 with a one-line
    message on bad input, 130 when interrupted). Under `torchrun`, every rank takes its share
    of each step's work and rank 0 alone prints and writes the report."""
    began = time.perf_counter()
    with launched_group(args.device) as (ranks, device), _warnings_as_notes():
        writer = ranks is None or ranks.rank == 0
        with open(os.devnull, "w") as silent, contextlib.redirect_stdout(sys.stdout if writer else silent):
            try:
                settings = settings_of(args)
                if not args.dry_run and importlib.util.find_spec("plotly") is None:
                    raise PatchingError(
                        "The report's figures need plotly: pip install 'transformer_lens_patching[plot]'."
                    )
                model = load_model(args.model, device)
                print(
                    f"{args.model}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads; "
                    f"{settings.n_prompts} prompts" + ("" if ranks is None else f"; {ranks.world_size} processes")
                )
                if args.dry_run:
                    for label, plan_or_skip in planned_steps(model, settings):
                        print(f"\n{label}: {plan_or_skip}")
                    return 0
                return _analyse(model, settings, args, began, writer)
            except PatchingError as error:
                print(f"tl-patch: error: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("tl-patch: interrupted.", file=sys.stderr)
                return INTERRUPTED


def _analyse(model, settings: IOISettings, args: argparse.Namespace, began: float, writer: bool = True) -> int:
    """Run the analysis, saving results.json from the start and after every step; on failure or
    Ctrl-C, write the report of the steps finished, say what is missing, and end as the
    failure would. The report files of an earlier run in the folder are removed first, so
    every file there belongs to this run. A process that is not the `writer` (a rank other
    than 0) runs its share and writes nothing."""
    if not writer:
        run_ioi(model, settings, model_name=args.model, progress=False, model_source=model_source(args.model))
        return 0
    folder = Path(args.out)
    for name in (REPORT, JSON, CSV):
        (folder / name).unlink(missing_ok=True)
    finished: list[IOIAnalysis] = []

    def save(analysis: IOIAnalysis) -> None:
        finished[:] = [analysis]
        write_json(analysis, folder)

    try:
        analysis = run_ioi(
            model,
            settings,
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
        f"Wrote {paths['html']}, {paths['json']} and {paths['csv']} in {time.perf_counter() - began:.0f} s; "
        f"the patching steps took {sum(step.seconds for step in analysis.steps):.0f} s "
        f"(estimated {analysis.estimated_seconds:.0f} s)."
    )
    return 0


def _keep_what_finished(finished: list[IOIAnalysis], folder: Path) -> None:
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
