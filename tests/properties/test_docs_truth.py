"""What the pages say about lists and defaults is what the code has.

The pages are README.md, every page under docs/ (docs/**/*.md) and the markdown cells of the
notebooks in demos/; the defaults stated in the package's docstrings are checked too. Each test
reads the value from the code (`PatchingMixin`, `DEFAULT_MAX_MEMORY`, `CUDA_FREE_FRACTION`,
`CPU_PROMPTS_PER_PASS`, `DEFAULT_RANK_TIMEOUT`, `IG_STEPS`, the `tl-patch` parser, `STEP_KEYS`)
and fails where a page says something else, so a page cannot drift from the code unnoticed.
Lists that grow (the plugin's methods) are either complete or marked as examples with a link
to the complete one, and never counted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.properties.docs_pages import FENCE, PAGES, ROOT, relative

NOTEBOOKS = sorted((ROOT / "demos").glob("*.ipynb"))
SOURCES = [ROOT / "tl_patch.py", *sorted((ROOT / "transformer_lens_patching").rglob("*.py"))]
ITEM = re.compile(r"^\s*(?:[-*]|\d+\.) |^\s*\|")


@dataclass(frozen=True)
class Passage:
    """A paragraph, list item or table row of a page, without code blocks."""

    where: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}"


def markdown_of(path: Path) -> str:
    """The markdown of a page, or of a notebook's markdown cells (one after another)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def passages(text: str, where: str) -> list[Passage]:
    """The paragraphs, list items and table rows of `text`, code blocks left out (blanked, so
    that line numbers stay those of the file)."""
    text = FENCE.sub(lambda match: "\n" * match.group().count("\n"), text)
    found: list[Passage] = []
    lines: list[str] = []
    start = 0

    def close():
        if lines:
            found.append(Passage(where, start, " ".join(line.strip() for line in lines)))
            lines.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or ITEM.match(line):
            close()
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
            if line.lstrip().startswith("|"):
                close()
    close()
    return found


def page_passages(paths=PAGES) -> list[Passage]:
    return [passage for path in paths for passage in passages(markdown_of(path), relative(path))]


# The plugin's methods

NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
COUNT_OF_METHODS = re.compile(rf"\b(\d+|{'|'.join(NUMBER_WORDS)})\s+(?:[\w-]+\s+)?methods\b", re.I)
EXAMPLES = re.compile(r"\be\.g\.|\bsuch as\b|\bfor example\b|\bamong them\b")
FULL_LIST = re.compile(r"\]\([^)]*(?:api/plugin\.md|plugin\.py)[^)]*\)")


def plugin_methods() -> set[str]:
    from transformer_lens_patching.plugin import PatchingMixin

    return {name for name in vars(PatchingMixin) if not name.startswith("_")}


def named_methods(text: str, methods: set[str]) -> set[str]:
    """The plugin methods `text` names in backticks: `act_patch`, `model.act_patch(...)`."""
    return {name for name in re.findall(r"`(?:model\.)?(\w+)(?:\(.*?\))?`", text) if name in methods}


def about_the_plugin(passage: Passage) -> bool:
    return bool(re.search(r"plugin|PatchingMixin", passage.text, re.I))


def plugin_list_problem(passage: Passage, methods: set[str]) -> str | None:
    """Why `passage` misstates the plugin's methods, or None: a count of methods, or a list of
    three or more that is neither complete nor marked as examples with a link to the full list."""
    if not about_the_plugin(passage):
        return None
    count = COUNT_OF_METHODS.search(passage.text)
    if count:
        return f"says {count.group()!r}: name no count (PatchingMixin has {len(methods)} methods today)"
    named = named_methods(passage.text, methods)
    if len(named) < 3 or named == methods:
        return None
    if EXAMPLES.search(passage.text) and FULL_LIST.search(passage.text):
        return None
    return (
        f"lists {sorted(named)} but not {sorted(methods - named)}: list every method of PatchingMixin, "
        "or mark the names as examples (e.g.) and link to the full list (api/plugin.md or plugin.py)"
    )


def test_no_page_lists_some_of_the_plugins_methods_as_all_of_them():
    methods = plugin_methods()
    problems = [
        f"{passage}: {why}"
        for passage in page_passages([*PAGES, *NOTEBOOKS])
        if (why := plugin_list_problem(passage, methods))
    ]
    assert not problems, "pages misstate the plugin's methods:\n" + "\n".join(problems)


def test_the_plugin_check_catches_a_short_list_and_a_count():
    methods = plugin_methods()
    five = Passage(
        "x", 1, "The plugin adds `act_patch`, `path_patch`, `attr_patch`, `plan_act_patch`, `plan_path_patch`."
    )
    assert "lists" in plugin_list_problem(five, methods)
    counted = Passage("x", 1, "It is a TransformerLens plugin. Importing it gives every model four methods:")
    assert "four methods" in plugin_list_problem(counted, methods)
    examples = Passage(
        "x", 1, "The plugin adds methods, e.g. `act_patch`, `path_patch` and `confirm` ([all](api/plugin.md))."
    )
    assert plugin_list_problem(examples, methods) is None
    every = Passage("x", 1, "The plugin adds " + ", ".join(f"`{name}`" for name in sorted(methods)) + ".")
    assert plugin_list_problem(every, methods) is None


def test_the_pages_that_link_the_full_list_list_every_method():
    """The links for "all of them" lead to plugin.py, whose module docstring api/plugin.md renders:
    that docstring names every method, and each method is the function of the same name."""
    import transformer_lens_patching
    from transformer_lens_patching import plugin

    methods = plugin_methods()
    assert named_methods(plugin.__doc__, methods) == methods, (
        f"transformer_lens_patching/plugin.py's docstring (rendered on docs/api/plugin.md) leaves out "
        f"{sorted(methods - named_methods(plugin.__doc__, methods))}"
    )
    assert "::: transformer_lens_patching.plugin" in (ROOT / "docs/api/plugin.md").read_text()
    for name in methods:
        method = getattr(plugin.PatchingMixin, name)
        function = getattr(transformer_lens_patching, name, None)
        assert function is not None and method.__wrapped__ is function, (
            f"PatchingMixin.{name} is not the public function transformer_lens_patching.{name} with the model first"
        )


# The memory budget

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|KB|MB|GB)\b")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
FRACTIONS = {"half": 1 / 2, "a third": 1 / 3, "two thirds": 2 / 3, "a quarter": 1 / 4, "three quarters": 3 / 4}


def device_of(clause: str) -> str | None:
    """Which default a clause is about: "accelerator" (MPS and others), "cpu", "cuda" or None."""
    if re.search(r"\bMPS\b|accelerator", clause):
        return "accelerator"
    if re.search(r"\bCPUs?\b", clause, re.I):
        return "cpu"
    if re.search(r"\bGPUs?\b|\bCUDA\b", clause):
        return "cuda"
    return None


def fraction_in(clause: str) -> float | None:
    percent = re.search(r"(\d+(?:\.\d+)?)\s*%", clause)
    if percent:
        return float(percent.group(1)) / 100
    return next((value for words, value in FRACTIONS.items() if re.search(rf"\b{words}\b", clause)), None)


def sentences(text: str) -> list[str]:
    """`text` cut at each "; " and at each ". " before a capital, outside parentheses."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        ends = char == ";" or (char == "." and re.match(r"\s+[A-Z`]", text[index + 1 :]))
        if depth <= 0 and ends:
            pieces.append(text[start : index + 1])
            start = index + 1
    return [*pieces, text[start:]]


def budget_claims(passage: Passage):
    """(device, clause) of each clause naming a device in the sentences about the default memory
    budget: those that say "default" and `max_memory` or "budget"."""
    claims = []
    for sentence in sentences(passage.text):
        if re.search(r"default", sentence, re.I) and re.search(r"max_memory|budget", sentence):
            clauses = re.split(r"[,;:()]", sentence)
            claims += [(device, clause.strip()) for clause in clauses if (device := device_of(clause))]
    return claims


def budget_problem(device: str, clause: str) -> str | None:
    from transformer_lens_patching._core.memory import CUDA_FREE_FRACTION, DEFAULT_MAX_MEMORY

    sizes = [float(number) * UNITS[unit] for number, unit in SIZE.findall(clause)]
    if device == "cuda":
        if sizes:
            return (
                f"gives CUDA's default budget as a fixed size; it is {CUDA_FREE_FRACTION} of the GPU's free "
                "memory (CUDA_FREE_FRACTION)"
            )
        if "free memory" in clause and fraction_in(clause) not in (None, CUDA_FREE_FRACTION):
            return f"gives CUDA's default share of free memory as {fraction_in(clause)}, not {CUDA_FREE_FRACTION}"
        return None
    if any(size != DEFAULT_MAX_MEMORY[device] for size in sizes):
        return f"the {device} default is {DEFAULT_MAX_MEMORY[device] >> 20} MiB (DEFAULT_MAX_MEMORY[{device!r}])"
    return None


def all_budget_claims():
    sources = [passage for path in SOURCES for passage in passages(path.read_text(), relative(path))]
    return [
        (passage, device, clause)
        for passage in [*page_passages(), *sources]
        for device, clause in budget_claims(passage)
    ]


def test_the_default_memory_budgets_are_the_codes():
    problems = [
        f"{passage}: {clause!r} {why}"
        for passage, device, clause in all_budget_claims()
        if (why := budget_problem(device, clause))
    ]
    assert not problems, "the default memory budget is misstated:\n" + "\n".join(problems)


def test_the_budget_check_reads_the_pages_that_state_the_budget():
    """The check above is not vacuous: the pages known to state the default budgets are read,
    and a stale sentence fails it."""
    claims = all_budget_claims()
    cuda = {passage.where for passage, device, clause in claims if device == "cuda" and fraction_in(clause)}
    assert {"README.md", "docs/concepts.md", "docs/benchmarks.md"} <= cuda, cuda
    stale = Passage("x", 1, "within `max_memory` bytes of activations (default 256 MiB on CPU, 2 GiB on a GPU)")
    assert [budget_problem(device, clause) is None for device, clause in budget_claims(stale)] == [True, False]
    wrong_cpu = Passage(
        "x", 1, "The default budget is 512 MiB on the CPU and a third of the GPU's free memory on CUDA."
    )
    assert all(budget_problem(device, clause) for device, clause in budget_claims(wrong_cpu))


def test_the_cpu_prompt_cap_is_the_codes():
    from transformer_lens_patching._core.memory import CPU_PROMPTS_PER_PASS

    stated = [
        (passage, int(number))
        for passage in page_passages()
        for number in re.findall(r"at most (\d+) (?:stacked )?prompts per pass", passage.text)
    ]
    assert stated, "no page states the CPU's cap on prompts per pass any more: drop this test"
    wrong = [f"{passage}: {number}" for passage, number in stated if number != CPU_PROMPTS_PER_PASS]
    assert not wrong, f"CPU_PROMPTS_PER_PASS is {CPU_PROMPTS_PER_PASS}, the pages say: {wrong}"


def test_the_default_rank_timeout_is_the_codes():
    from transformer_lens_patching._core.distributed import DEFAULT_RANK_TIMEOUT

    stated = [
        (passage, float(seconds))
        for passage in page_passages()
        if re.search(r"rank timeout|set_rank_timeout", passage.text)
        for seconds in re.findall(r"(\d+(?:\.\d+)?) s\)? by default", passage.text)
    ]
    assert {passage.where for passage, _ in stated} >= {"README.md", "docs/scale.md"}, stated
    wrong = [f"{passage}: {seconds:g} s" for passage, seconds in stated if seconds != DEFAULT_RANK_TIMEOUT]
    assert not wrong, f"DEFAULT_RANK_TIMEOUT is {DEFAULT_RANK_TIMEOUT:g} s; the pages say {wrong}"


# Integrated gradients' steps


def test_the_default_ig_steps_are_stated_as_the_code_has_them():
    from transformer_lens_patching import attr_edges, attr_patch, attr_path_patch
    from transformer_lens_patching._methods.common import IG_STEPS, checked_steps

    assert checked_steps("ig", None) == IG_STEPS
    for function in (attr_patch, attr_edges, attr_path_patch):
        assert inspect.signature(function).parameters["steps"].default is None, function.__name__
        stated = re.search(r"steps: .*?\(default ([^)]*)\)", function.__doc__, re.S)
        assert stated, f"{function.__name__}'s docstring does not state the default of `steps`"
        assert stated.group(1) in (str(IG_STEPS), "`IG_STEPS`"), (
            f"{function.__name__}'s docstring says steps defaults to {stated.group(1)}; it is IG_STEPS = {IG_STEPS}"
        )
    stated = re.compile(
        r"`steps`[^.;]*?\bdefault(?:s to)? (\d+)|\bdefault (\d+) (?:IG )?steps|`steps=(\d+)` by default"
        r"|\bdefault `steps=(\d+)`|integrated gradients; (\d+) by default"
    )
    for sentence in (
        "the mean gradient at `steps` points (default 7)",
        "EAP-IG with `steps=7` by default",
        "gradients; default `steps=7`)",
        "(integrated gradients; 7 by default)",
    ):
        assert stated.search(sentence), f"the pattern misses {sentence!r}"
    found = [(passage, match) for passage in page_passages() for match in stated.finditer(passage.text)]
    wrong = [
        f"{passage}: {match.group()!r}"
        for passage, match in found
        if int(next(group for group in match.groups() if group)) != IG_STEPS
    ]
    assert not wrong, f"IG_STEPS is {IG_STEPS}; pages say otherwise: {wrong}"
    pages = {passage.where for passage, _ in found}
    assert {"README.md", "docs/tasks/screen-and-confirm.md"} <= pages, f"statements found only on {sorted(pages)}"


def test_the_ioi_circuit_steps_ig_steps_are_the_jobs():
    from transformer_lens_patching._tasks.job import circuit_step

    stated = re.findall(r"EAP-IG \((?:[^()]|\([^()]*\))*?(\d+) steps\)", (ROOT / "docs/cli.md").read_text())
    assert stated, "docs/cli.md no longer says how many steps EAP-IG takes in the circuit step"
    assert {int(number) for number in stated} == {circuit_step.IG_STEPS}, (
        f"docs/cli.md says EAP-IG takes {stated} steps; the circuit step's IG_STEPS is {circuit_step.IG_STEPS}"
    )


# tl-patch ioi: its options, their defaults and its steps


def command_options(command: str = "ioi") -> dict[str, argparse.Action]:
    """The options of `tl-patch COMMAND`, by name."""
    import tl_patch

    top = tl_patch.parser()
    (commands,) = [action for action in top._actions if isinstance(action, argparse._SubParsersAction)]
    return {
        option: action
        for action in commands.choices[command]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def documented_default(action: argparse.Action) -> str:
    """How the options table of docs/cli.md writes `action`'s default."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None:
        return "automatic"
    if isinstance(action.default, str):
        return f"`{action.default}`"
    return str(action.default)


def cli_table() -> dict[str, tuple[int, str]]:
    """{option: (line, default)} of docs/cli.md's options table."""
    rows = {}
    for number, line in enumerate((ROOT / "docs/cli.md").read_text().splitlines(), 1):
        row = re.match(r"\|\s*`(--[\w-]+)`\s*\|\s*([^|]*?)\s*\|", line)
        if row:
            rows[row.group(1)] = (number, row.group(2))
    return rows


def test_every_option_is_in_the_cli_page_with_its_default():
    options, table = command_options("ioi"), cli_table()
    assert set(table) == set(options), (
        f"docs/cli.md's table lacks {sorted(set(options) - set(table))} and lists options tl-patch ioi does not "
        f"have: {sorted(set(table) - set(options))}"
    )
    wrong = [
        f"docs/cli.md:{line}: {option} says {default!r}, the parser's default is "
        f"{documented_default(options[option])!r}"
        for option, (line, default) in table.items()
        if default != documented_default(options[option])
    ]
    assert not wrong, "\n".join(wrong)


def test_every_option_the_pages_name_exists_with_the_default_they_give():
    """`--option` in the prose of the pages that describe tl-patch (docs/cli.md, the README's
    IOI section and every passage naming tl-patch) is an option of `tl-patch ioi` or `tl-patch
    analyze`, and a default written next to it ("`--top-k`, default 3", "`--top-k` (default 3)")
    is its own (`ioi`'s, for the options both commands have)."""
    options = {**command_options("analyze"), **command_options("ioi")}
    cli_pages = {"docs/cli.md"}
    problems = []
    for passage in page_passages():
        if passage.where not in cli_pages and not re.search(r"tl-patch|make ioi|--model smollm2", passage.text):
            continue
        for option in re.findall(r"`(--[\w-]+)", passage.text):
            if option not in options:
                problems.append(f"{passage}: {option} is not an option of tl-patch ioi or analyze")
        for option, default in re.findall(r"`(--[\w-]+)`,? \(?default:? ([^,;)]+?)[,;)]", passage.text):
            if option in options and default.strip("` ") != documented_default(options[option]).strip("`"):
                problems.append(f"{passage}: {option} defaults to {options[option].default!r}, not {default!r}")
    assert not problems, "\n".join(problems)


def cli_step_list() -> list[tuple[int, str]]:
    """(number, text) of each item of docs/cli.md's numbered list of steps."""
    text = (ROOT / "docs/cli.md").read_text()
    section = text[text.index("The steps, each announced") :]
    section = section[: section.index("\n\n", section.index("\n1. "))]
    return [(int(number), item) for number, item in re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", section, re.S | re.M)]


def test_the_cli_pages_steps_are_the_jobs():
    from transformer_lens_patching._tasks.ioi.analysis import STEP_KEYS

    step_count = 1 + len(STEP_KEYS)  # the logit differences, then the patching steps

    steps = cli_step_list()
    assert [number for number, _ in steps] == list(range(1, step_count + 1)), (
        f"docs/cli.md numbers {len(steps)} steps; the job has {step_count} (the logit differences, then {STEP_KEYS})"
    )
    keys = [re.match(r"`(\w+)`:", item) for _, item in steps[1:]]
    assert [key and key.group(1) for key in keys] == list(STEP_KEYS), (
        f"docs/cli.md's steps 2 to {step_count} must start with the keys {list(STEP_KEYS)} in the job's order"
    )
    text = (ROOT / "docs/cli.md").read_text()
    totals = {int(total) for total in re.findall(r"\bstep \d+/(\d+)", text)}
    assert totals == {step_count}, f"docs/cli.md writes step headers out of {totals}; the job counts {step_count}"


README_STEP_WORDS = {
    "act_heads": "every head's output",
    "act_words": "at each word",
    "path_logits": "to the logits",
    "path_queries": "into their queries",
    "path_values": "into the values",
    "attr_neurons": "every MLP neuron",
    "circuit": "the circuit",
}
"""How the README's IOI workflow paragraph names each step of the job."""


def test_the_readmes_ioi_paragraph_names_the_steps_in_order():
    from transformer_lens_patching._tasks.ioi.analysis import STEP_KEYS

    assert set(README_STEP_WORDS) == set(STEP_KEYS), f"the job's steps are {STEP_KEYS}: update README_STEP_WORDS"
    (paragraph,) = [
        p.text for p in passages((ROOT / "README.md").read_text(), "README.md") if p.text.startswith("`make ioi` runs")
    ]
    found = {key: paragraph.find(words) for key, words in README_STEP_WORDS.items()}
    missing = [key for key, place in found.items() if place < 0]
    assert not missing, f"README.md's IOI workflow paragraph leaves out the steps {missing}"
    order = sorted(found, key=found.get)
    assert order == list(STEP_KEYS), f"README.md's IOI workflow paragraph gives the steps as {order}, not {STEP_KEYS}"
    last = re.search(r"\blast\b", paragraph)
    assert last is None or last.start() > found[STEP_KEYS[-2]], (
        f"README.md's IOI workflow paragraph calls a step before {STEP_KEYS[-1]!r} the last"
    )
