"""The `tl-patch` command line: `tl-patch ioi` runs the IOI analysis into a report.

    tl-patch ioi --out ioi-report          # the embedded SmolLM2-135M, offline
    tl-patch ioi --model gpt2 --n-prompts 50 --device cuda
    tl-patch ioi --dry-run                 # the plan of each step, nothing run
    python -m transformer_lens_patching ioi --help
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from . import _tl
from .errors import PatchingError
from .ioi import IOISettings, plan_ioi, run_ioi

EMBEDDED = "smollm2"
LOADING_ERRORS = (OSError, ValueError, ImportError)
"""What a model that cannot be loaded raises: a missing file or hub entry (OSError), a name
no loader knows or a folder it cannot read (ValueError), a missing package (ImportError).
Anything else is a bug, and its traceback is shown."""


def load_model(name: str, device: str):
    """The model `--model` names: the embedded SmolLM2-135M, a local Hugging Face folder, or
    a TransformerLens model name loaded from the Hugging Face hub."""
    if name == EMBEDDED:
        from ._embedded import load_smollm2

        return load_smollm2(device)
    try:
        if Path(name).is_dir():
            from transformers import AutoTokenizer

            return _tl.boot_hf_folder(name, AutoTokenizer.from_pretrained(name), device)
        return _tl.load_pretrained(name, device)
    except LOADING_ERRORS as error:
        raise PatchingError(_load_failure(name, error)) from error


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-patch", description="Activation and path patching on TransformerLens models.")
    commands = parser.add_subparsers(dest="command", required=True)
    ioi = commands.add_parser("ioi", help="run the IOI circuit analysis and write an HTML report")
    defaults = IOISettings()
    ioi.add_argument("--model", default=EMBEDDED, help=f"{EMBEDDED} (embedded, offline; default), a TransformerLens "
                     "model name such as gpt2 (needs the hub or its cache), or a local Hugging Face folder")  # fmt: skip
    ioi.add_argument("--n-prompts", type=int, default=defaults.n_prompts, help="IOI prompts (default %(default)s)")
    ioi.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed (default %(default)s)")
    ioi.add_argument("--out", default="ioi-report", help="output folder (default %(default)s)")
    ioi.add_argument("--device", default="cpu", help="cpu, cuda, ... (default %(default)s)")
    ioi.add_argument("--top-k", type=int, default=defaults.top_k, help="heads carried into each next step")
    ioi.add_argument("--prompt-type", default=defaults.prompt_type, choices=("mixed", "ABBA", "BABA"))
    ioi.add_argument("--prepend-bos", action="store_true", help="start every prompt with BOS")
    ioi.add_argument("--corruption", default=defaults.corruption, help="how corrupted prompts are made (default "
                     "%(default)r: every name random; e.g. 'ABB->ABC, BAB->BAC' replaces only the second subject)")
    ioi.add_argument("--batch-size", type=int, default=None, help="patched variants per forward pass (default: automatic)")
    ioi.add_argument("--quiet", action="store_true", help="no progress bars")
    ioi.add_argument("--dry-run", action="store_true", help="print the plan of each patching step and exit: what it "
                     "patches, how many variants and forward passes, which layers each pass runs")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `tl-patch`; returns the exit status (2 with a one-line message on bad input)."""
    args = _parser().parse_args(argv)
    began = time.perf_counter()
    try:
        settings = IOISettings(
            n_prompts=args.n_prompts, seed=args.seed, prompt_type=args.prompt_type, prepend_bos=args.prepend_bos,
            corruption=args.corruption,
            top_k=args.top_k, batch_size=args.batch_size,
        )  # fmt: skip
        if settings.n_prompts < 1 or settings.top_k < 1:
            raise PatchingError("--n-prompts and --top-k must be at least 1.")
        if not args.dry_run and importlib.util.find_spec("plotly") is None:
            raise PatchingError("The report's figures need plotly: pip install 'transformer_lens_patching[plot]'.")
        model = load_model(args.model, args.device)
        print(f"{args.model}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads; {settings.n_prompts} prompts")
        if args.dry_run:
            for step, plan in plan_ioi(model, settings):
                print(f"\n{step}: {plan}")
            return 0
        analysis = run_ioi(model, settings, model_name=args.model, progress=not args.quiet)
        from .ioi import write_report

        paths = write_report(analysis, args.out)
    except PatchingError as error:
        print(f"tl-patch: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {paths['html']}, {paths['json']} and {paths['csv']} in {time.perf_counter() - began:.0f} s.")
    return 0
