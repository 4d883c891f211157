"""Tasks as data: a file of clean/corrupted prompt pairs and their answers, read by `load_task`
into a `Task` and tokenized for any model by `Task.tokens`.

A task file is JSON Lines (`.jsonl`: one JSON object per line) or CSV (`.csv`: a header, then one
row per line) with these columns:

- `clean` (text): the prompt whose behaviour is studied.
- `corrupted` (text): the same prompt with the information the answer depends on changed.
- `answer`: the correct continuation of the clean prompt, e.g. `" Mary"` (mind the leading
  space), or a list of acceptable ones (the first is the one logit differences use).
- `wrong`: the continuation the corrupted prompt favours, or a list of wrong answers (the first
  is the one logit differences use; the others are distractors for accuracy).
- `positions` (optional): an object from a label to the text whose LAST token it marks in the
  clean prompt: `{"IO": " Mary", "S2": [" John", 2]}`. A text alone marks its first occurrence;
  `[text, n]` its n-th (`-1`: its last). Every row has the same labels; `end` is reserved.
- `id` (optional): a name for the row in messages.

In CSV, `answer` and `wrong` cells starting with `[` are JSON lists (`["58", "67"]`), a
`positions` cell is a JSON object, and every cell is taken as it is: quote cells with leading
spaces (`" Mary"`). Other columns are ignored. A `.json` file holds a JSON array of such objects
(or JSON Lines, as `datasets.Dataset.to_json` writes them).

Rows in MIB's published schema (`prompt`, a `*_counterfactual` object with its own `prompt`,
answers in `metadata`, `choices` and `answerKey`, or `label`) load too: see `load_task`.

Scoring rules (`Task.tokens`): answers are scored by their FIRST token (score answers of several
tokens with `AnswerLogProb.teacher_forced`); the clean and corrupted prompts of a row must
tokenize to the same length; prompts of different lengths are right-padded with the model's pad
token and read at `end`, each prompt's last real token (a causal model's earlier positions never
see the padding). Every row that breaks a rule is reported, with its line and why, in one error.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ... import _tl
from ...errors import PatchingError
from ...metrics import Accuracy, LogitDiff

SHIPPED_TASKS = ("greater_than", "ioi", "multiple_choice")
"""The tasks shipped with the package (`load_task(name)`), each a JSON Lines file of 24 rows."""
SUFFIXES = (".jsonl", ".json", ".csv")
"""The file types `load_task` reads."""
COLUMNS = ("clean", "corrupted", "answer", "wrong", "positions", "id")
"""The columns of a task file (`positions` and `id` optional)."""
END = "end"
"""The position label every task has: each prompt's last real token, where answers are read."""
MIB_COUNTERFACTUALS = ("s2_io_flip_counterfactual", "symbol_counterfactual", "random_counterfactual")
"""The corrupted prompt MIB's circuit track uses by default: IOI, then MCQA and ARC, then arithmetic."""
LISTED = 10
"""How many failing rows an error lists (then it counts the rest)."""


@dataclass(frozen=True)
class TaskRow:
    """One row of a task file: its prompts and answers as written, and where it is in the file.

    `positions` maps a label to `(text, occurrence)`: the last token of the text's
    `occurrence`-th appearance in the clean prompt (1 the first, -1 the last).
    """

    clean: str
    corrupted: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...]
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    where: str = ""
    """Where the row is in its file, for messages: "line 3" (JSON Lines, CSV) or "item 3" (a JSON array)."""
    id: str | None = None


@dataclass(frozen=True)
class TaskTokens:
    """A task tokenized for one model: token tensors, answer ids and positions, one row per prompt.

    Attributes:
        clean: (batch, pos) clean prompts, right-padded with the model's pad token.
        corrupted: (batch, pos) corrupted prompts, each as long as its clean prompt.
        answers: (batch, 2) first-token ids of the answer and of the first wrong answer: what
            `LogitDiff` takes.
        correct: (batch, k) first-token ids of every acceptable answer (rows with fewer repeat
            their first).
        wrong: (batch, m) first-token ids of every wrong answer (rows with fewer repeat their first).
        end: (batch,) each prompt's last real token: where the answers are read.
        positions: {label: (batch,)} the labelled positions of the clean prompts, and `end`.
    """

    clean: Tensor
    corrupted: Tensor
    answers: Tensor
    correct: Tensor
    wrong: Tensor
    end: Tensor
    positions: dict[str, Tensor]

    @property
    def choices(self) -> Tensor:
        """(batch, 1 + m) the answer's first token, then every wrong answer's: what `Accuracy` takes."""
        return torch.cat([self.correct[:, :1], self.wrong], dim=1)

    def logit_diff(self, per_prompt: bool = False) -> LogitDiff:
        """`LogitDiff` of the answer over the first wrong answer, read at `end`."""
        return LogitDiff(self.answers, positions=self.end, per_prompt=per_prompt)

    def accuracy(self, per_prompt: bool = False) -> Accuracy:
        """`Accuracy` of the answer among it and every wrong answer, read at `end`."""
        return Accuracy(self.choices, positions=self.end, per_prompt=per_prompt)

    def __len__(self) -> int:
        return self.clean.shape[0]


@dataclass(frozen=True)
class Task:
    """Clean/corrupted prompt pairs with their answers, as read from a task file (`load_task`).

    `tokens(model)` tokenizes them for a model. Slicing gives a task of some rows (`task[:8]`).

    >>> task = load_task("ioi")
    >>> len(task), task.labels
    (24, ('IO', 'S1', 'S2'))
    >>> task.rows[0].clean
    'When Linda and Anna went to the store, Anna gave a drink to'
    >>> task.rows[0].answers, task.rows[0].wrong
    ((' Linda',), (' Anna',))
    """

    name: str
    rows: tuple[TaskRow, ...]
    source: str = ""
    """The file the rows were read from."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The position labels of the rows (`end`, which every task has, not included)."""
        return tuple(self.rows[0].positions) if self.rows else ()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice) -> Task:
        if not isinstance(key, slice):
            raise PatchingError(f"Index a Task with a slice (e.g. task[:8]), got {type(key).__name__}.")
        return Task(self.name, self.rows[key], self.source)

    def tokens(self, model, prepend_bos: bool = True) -> TaskTokens:
        """The rows tokenized for `model`: token tensors on its input device, answer ids, positions.

        Answers are scored by their first token. The clean and corrupted prompts of a row must
        tokenize to the same length; rows of different lengths are right-padded with the model's
        pad token and read at `end`, their last real token. A row is refused, with every other
        failing row in one error giving its line and the reason, when its pair differs in length,
        a prompt does not fit the model's context, an answer and a wrong answer start with the same
        token (no logit difference), or a labelled text is not in the clean prompt or does not end
        at a token boundary.

        Args:
            model: A TransformerLens model with a tokenizer.
            prepend_bos: Start every prompt with the beginning-of-sequence token.

        >>> tokens = load_task("ioi").tokens(model)
        >>> tokens.clean.shape == tokens.corrupted.shape, tokens.answers.shape, sorted(tokens.positions)
        (True, torch.Size([24, 2]), ['IO', 'S1', 'S2', 'end'])
        >>> metric = tokens.logit_diff()  # the answer over the first wrong answer, read at `end`
        """
        if not self.rows:
            raise PatchingError(f"The task {self.name!r} has no rows.")
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        encoded, problems = [], []
        for row in self.rows:
            tokens, reasons = _row_tokens(model, row, prepend_bos, n_ctx)
            if reasons:
                problems.append((_named(row), "; ".join(reasons)))
            encoded.append(tokens)
        if problems:
            _refuse(problems, len(self.rows), f"{self._described()} cannot be used with this model")
        return _batch(model, encoded, self.labels)

    def _described(self) -> str:
        return f"{self.name!r} ({self.source})" if self.source and self.source != self.name else repr(self.name)


def shipped_tasks() -> tuple[str, ...]:
    """The names of the tasks shipped with the package, for `load_task(name)`.

    >>> shipped_tasks()
    ('greater_than', 'ioi', 'multiple_choice')
    """
    return SHIPPED_TASKS


def load_task(
    source: str | os.PathLike,
    *,
    counterfactual: str | None = None,
    label_prefix: str = "",
    name: str | None = None,
) -> Task:
    """A task from a file (`.jsonl`, `.json` or `.csv`) or the name of a shipped task.

    Every row is checked (texts present and not empty, answers given, position labels the same
    in every row) and every failing row is reported in one error, with its line and why; the
    checks that need a tokenizer run in `Task.tokens`.

    Rows in MIB's published schema (a `prompt` and no `clean`) are read as its circuit track
    reads them: the clean prompt is `prompt`, the corrupted one the `prompt` of the
    counterfactual object named by `counterfactual` (default: the first of
    `s2_io_flip_counterfactual`, `symbol_counterfactual`, `random_counterfactual` that the rows
    have). The answers are, for IOI rows (with `metadata`), `" " + indirect_object` over
    `" " + subject`; for rows with `choices` and `answerKey` (MCQA, ARC), the correct choice label
    over the counterfactual's correct label, the other labels as distractors; for rows with a
    `label` (arithmetic), the label over the counterfactual's. Labels are used as written, after
    `label_prefix` (MIB's circuit track tokenizes them with nothing before them; give `" "` to
    score `" A"` after a prompt ending in "Answer:").

    Args:
        source: A path, or one of `shipped_tasks()`.
        counterfactual: The MIB counterfactual whose prompt is the corrupted one.
        label_prefix: Text before each MIB choice label or arithmetic label.
        name: The task's name (default: the file's stem or the shipped name).

    >>> task = load_task("greater_than")
    >>> task.rows[0].clean, task.rows[0].answers, task.rows[0].wrong
    ('The war lasted from the year 1745 to the year 17', ('58',), ('30',))
    """
    path, shipped = _resolve(source)
    records = _records(path)
    if not records:
        raise PatchingError(f"{path} has no rows.")
    first = next((value for _, value in records if isinstance(value, Mapping)), None)
    mib = first is not None and "clean" not in first and "prompt" in first
    if not mib and (counterfactual is not None or label_prefix):
        raise PatchingError(
            "counterfactual= and label_prefix= (tl-patch analyze: --counterfactual, --label-prefix) apply to rows in "
            "MIB's schema (a 'prompt' column); "
            f"{path} has rows in this library's format (clean, corrupted, answer, wrong)."
        )
    if mib:
        counterfactual = counterfactual or _default_counterfactual(first, path)
        if not isinstance(first.get(counterfactual), Mapping):
            raise PatchingError(
                f"The rows of {path} have no {counterfactual!r} object: its counterfactuals are "
                f"{_counterfactuals(first)}."
            )
    rows, problems = [], []
    for where, value in records:
        if isinstance(value, str):
            problems.append((where, value))
            continue
        if mib:
            row, reasons = _mib_row(value, where, counterfactual, label_prefix)
        else:
            row, reasons = _file_row(value, where)
        if row is not None and rows and set(row.positions) != set(rows[0].positions):
            reasons.append(
                f"its position labels are {_listed(row.positions)}, but {rows[0].where}'s are "
                f"{_listed(rows[0].positions)}: every row needs the same labels"
            )
        if reasons:
            problems.append((_named(row, where, value), "; ".join(reasons)))
        elif row is not None:
            rows.append(row)
    if problems:
        _refuse(problems, len(records), f"{path} cannot be read")
    return Task(name or (shipped or path.stem), tuple(rows), str(path))


def _resolve(source) -> tuple[Path, str | None]:
    """The file to read, and the shipped name it was given by (None for a path)."""
    if isinstance(source, str) and source in SHIPPED_TASKS:
        return Path(str(resources.files(__package__).joinpath("data", f"{source}.jsonl"))), source
    if not isinstance(source, (str, os.PathLike)):
        raise PatchingError(f"load_task takes a path or a shipped task's name, got {type(source).__name__}.")
    path = Path(source)
    if path.suffix.lower() not in SUFFIXES:
        if not path.exists() and not path.suffix:
            raise PatchingError(
                f"{str(source)!r} is neither a shipped task ({', '.join(SHIPPED_TASKS)}) nor a task file "
                f"({', '.join(SUFFIXES)})."
            )
        raise PatchingError(f"Cannot read {path}: a task file ends in {', '.join(SUFFIXES)}.")
    if not path.is_file():
        raise PatchingError(f"No task file {path}.")
    return path, None


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, value) for each row of the file: a dict, or a string saying why the row is unreadable."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return _csv_records(text, path)
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines in a .json file, as datasets' to_json writes them
        if isinstance(whole, list):
            return [(f"item {index}", _object(value)) for index, value in enumerate(whole, 1)]
        if isinstance(whole, dict):
            return [("item 1", whole)]
    return [(f"line {number}", _json_line(line)) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _json_line(line: str) -> object:
    try:
        return _object(json.loads(line))
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at column {error.colno})"


def _object(value: object) -> object:
    return value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _csv_records(text: str, path: Path) -> list[tuple[str, object]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    if "clean" not in columns:
        raise PatchingError(
            f"{path} has the columns {', '.join(map(repr, columns)) or '(none)'}; a task file's are "
            f"{', '.join(COLUMNS)} (positions and id optional)."
        )
    records = []
    for cells in reader:
        value, reasons = {}, []
        for column, cell in cells.items():
            if column not in COLUMNS or cell is None or (cell == "" and column in ("positions", "id")):
                continue
            if column in ("answer", "wrong") and cell.lstrip().startswith("["):
                value[column] = _json_cell(cell, column, reasons)
            elif column == "positions":
                value[column] = _json_cell(cell, column, reasons)
            else:
                value[column] = cell
        records.append((f"line {reader.line_num}", "; ".join(reasons) if reasons else value))
    return records


def _json_cell(cell: str, column: str, reasons: list[str]) -> object:
    try:
        return json.loads(cell)
    except json.JSONDecodeError as error:
        reasons.append(f"its {column} cell is not valid JSON ({error.msg} at column {error.colno})")
        return None


def _file_row(value: dict, where: str) -> tuple[TaskRow | None, list[str]]:
    """A row of this library's format, or why it cannot be one."""
    reasons = []
    clean, corrupted = (_text(value, column, reasons) for column in ("clean", "corrupted"))
    answers, wrong = (_answers(value, column, reasons) for column in ("answer", "wrong"))
    positions = _positions(value.get("positions"), reasons)
    row_id = value.get("id")
    if reasons:
        return None, reasons
    return TaskRow(clean, corrupted, answers, wrong, positions, where, None if row_id is None else str(row_id)), []


def _text(value: Mapping, column: str, reasons: list[str]) -> str:
    text = value.get(column)
    if text is None:
        reasons.append(f"{column!r} is missing")
    elif not isinstance(text, str):
        reasons.append(f"{column!r} must be text, got {type(text).__name__}")
    elif not text.strip():
        reasons.append(f"{column!r} is empty")
    else:
        return text
    return ""


def _answers(value: Mapping, column: str, reasons: list[str]) -> tuple[str, ...]:
    answers = value.get(column)
    if answers is None:
        reasons.append(f"{column!r} is missing")
        return ()
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        reasons.append(f"{column!r} must be a text or a non-empty list of texts, got {value.get(column)!r}")
        return ()
    if not all(answer.strip() for answer in answers):
        reasons.append(f"{column!r} has an empty answer")
        return ()
    return tuple(answers)


def _positions(value: object, reasons: list[str]) -> dict[str, tuple[str, int]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        reasons.append(f"'positions' must be an object from labels to texts, got {type(value).__name__}")
        return {}
    positions = {}
    for label, spec in value.items():
        if label == END:
            reasons.append(f"the position label {END!r} is reserved: it is each prompt's last token")
            continue
        pair = [spec, 1] if isinstance(spec, str) else spec if isinstance(spec, list) and len(spec) == 2 else ["", 0]
        text, occurrence = pair
        valid_occurrence = isinstance(occurrence, int) and not isinstance(occurrence, bool) and occurrence != 0
        if not isinstance(text, str) or not text or not valid_occurrence:
            reasons.append(
                f"position {label!r} must be a text or [text, occurrence] (occurrence 1, 2, ... or -1 for the last), "
                f"got {spec!r}"
            )
            continue
        positions[str(label)] = (text, occurrence)
    return positions


def _default_counterfactual(first: Mapping, path: Path) -> str:
    for name in MIB_COUNTERFACTUALS:
        if name in first:
            return name
    raise PatchingError(
        f"{path} is in MIB's schema but has none of {', '.join(MIB_COUNTERFACTUALS)}: choose its corrupted prompt "
        f"with counterfactual= (its counterfactuals: {_counterfactuals(first)})."
    )


def _counterfactuals(value: Mapping) -> str:
    return ", ".join(str(key) for key in value if str(key).endswith("_counterfactual")) or "none"


def _mib_row(value: dict, where: str, counterfactual: str, prefix: str) -> tuple[TaskRow | None, list[str]]:
    """A row of MIB's schema as the clean prompt, the counterfactual's prompt and their answers."""
    reasons = []
    clean = _text(value, "prompt", reasons)
    other = value.get(counterfactual)
    if not isinstance(other, Mapping):
        return None, [f"it has no {counterfactual!r} object (its counterfactuals: {_counterfactuals(value)})"]
    corrupted = _text(other, "prompt", reasons)
    metadata = value.get("metadata")
    if isinstance(metadata, Mapping) and "indirect_object" in metadata and "subject" in metadata:
        answers, wrong = (f" {metadata['indirect_object']}",), (f" {metadata['subject']}",)
    elif "choices" in value and "answerKey" in value:
        labels, right = _choice(value, "", reasons)
        other_labels, other_right = _choice(other, f"{counterfactual}.", reasons)
        if reasons:
            return None, reasons
        distractors = [label for label in labels if label not in (right, other_right)]
        answers = (prefix + right,)
        wrong = tuple(prefix + label for label in [other_right, *distractors])
    elif "label" in value and "label" in other:
        answers, wrong = (prefix + str(value["label"]),), (prefix + str(other["label"]),)
    else:
        reasons.append(
            "cannot tell its answers: MIB rows have metadata.indirect_object and metadata.subject (IOI), "
            "choices and answerKey (MCQA, ARC) or label (arithmetic)"
        )
    if reasons:
        return None, reasons
    row_id = next((value[key] for key in ("idx", "id") if value.get(key) is not None), None)
    return TaskRow(clean, corrupted, answers, wrong, {}, where, None if row_id is None else str(row_id)), []


def _choice(value: Mapping, prefix: str, reasons: list[str]) -> tuple[list[str], str]:
    """The choice labels of an MIB row and its correct one (`answerKey`: an index or a label)."""
    choices, key = value.get("choices"), value.get("answerKey")
    labels = choices.get("label") if isinstance(choices, Mapping) else choices
    if not isinstance(labels, list) or not labels:
        reasons.append(f"{prefix}choices must be a list of labels or an object with a 'label' list")
        return [], ""
    labels = [str(label) for label in labels]
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(labels):
        return labels, labels[key]
    if isinstance(key, str) and key in labels:
        return labels, key
    reasons.append(f"{prefix}answerKey {key!r} is neither an index into its {len(labels)} choices nor a label")
    return labels, ""


def _row_tokens(model, row: TaskRow, prepend_bos: bool, n_ctx) -> tuple[dict, list[str]]:
    """One row's token ids, answer ids and positions for `model`, or why it cannot be used."""
    reasons = []
    clean = _tl.text_token_ids(model, row.clean, prepend_bos)
    corrupted = _tl.text_token_ids(model, row.corrupted, prepend_bos)
    if len(clean) != len(corrupted):
        reasons.append(
            f"the clean prompt is {len(clean)} tokens and the corrupted one {len(corrupted)}: "
            "a pair must tokenize to the same length"
        )
    if isinstance(n_ctx, int) and max(len(clean), len(corrupted)) >= n_ctx:
        reasons.append(f"a prompt reaches the model's context of {n_ctx} tokens")
    correct = [_first_token(model, answer) for answer in row.answers]
    wrong = [_first_token(model, answer) for answer in row.wrong]
    for answer, token in zip(row.answers, correct):
        clash = next((text for text, other in zip(row.wrong, wrong) if other == token), None)
        if clash is not None:
            reasons.append(
                f"the answer {answer!r} and the wrong answer {clash!r} both start with the token "
                f"{_token_text(model, token)!r}: answers are scored by their first token"
            )
    positions = {}
    for label, (text, occurrence) in row.positions.items():
        position = _position(model, row.clean, clean, text, occurrence, prepend_bos)
        if isinstance(position, str):
            reasons.append(f"position {label!r}: {position}")
        else:
            positions[label] = position
    return {"clean": clean, "corrupted": corrupted, "correct": correct, "wrong": wrong, "positions": positions}, reasons


def _first_token(model, text: str) -> int:
    return _tl.text_token_ids(model, text, False)[0]


def _token_text(model, token: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def _position(model, prompt: str, tokens: list[int], text: str, occurrence: int, prepend_bos: bool) -> int | str:
    """The position of the last token of `text`'s `occurrence`-th appearance in `prompt`, or why there is none."""
    starts, start = [], prompt.find(text)
    while start >= 0:
        starts.append(start)
        start = prompt.find(text, start + 1)
    if not starts:
        return f"{text!r} is not in the clean prompt"
    if abs(occurrence) > len(starts) or occurrence == 0:
        return f"{text!r} appears {len(starts)} time(s) in the clean prompt, not {abs(occurrence)}"
    end = starts[occurrence - 1 if occurrence > 0 else occurrence] + len(text)
    prefix = _tl.text_token_ids(model, prompt[:end], prepend_bos)
    if prefix != tokens[: len(prefix)]:
        return f"{text!r} does not end at a token boundary of the clean prompt (its last token runs on past it)"
    return len(prefix) - 1


def _batch(model, encoded: list[dict], labels: tuple[str, ...]) -> TaskTokens:
    """The rows' ids as tensors: prompts right-padded, answer lists filled by repeating their first."""
    pad = _tl.pad_token_id(model)
    width = max(len(row["clean"]) for row in encoded)
    clean = _tl.to_tokens(model, torch.tensor([row["clean"] + [pad] * (width - len(row["clean"])) for row in encoded]))
    corrupted = torch.tensor([row["corrupted"] + [pad] * (width - len(row["corrupted"])) for row in encoded])

    def filled(key: str) -> Tensor:
        size = max(len(row[key]) for row in encoded)
        return torch.tensor([row[key] + row[key][:1] * (size - len(row[key])) for row in encoded])

    correct, wrong = filled("correct"), filled("wrong")
    end = torch.tensor([len(row["clean"]) - 1 for row in encoded])
    positions = {label: torch.tensor([row["positions"][label] for row in encoded]) for label in labels}
    positions[END] = end
    device = clean.device
    return TaskTokens(
        clean,
        corrupted.to(device),
        torch.stack([correct[:, 0], wrong[:, 0]], dim=1).to(device),
        correct.to(device),
        wrong.to(device),
        end.to(device),
        {label: value.to(device) for label, value in positions.items()},
    )


def _named(row: TaskRow | None, where: str = "", value: object = None) -> str:
    """A row's place for messages: its line, and its id where it has one."""
    row_id = row.id if row is not None else (value.get("id") if isinstance(value, Mapping) else None)
    where = row.where if row is not None else where
    return f"{where} (id {row_id})" if row_id is not None else where


def _listed(positions: Mapping) -> str:
    return ", ".join(sorted(positions)) or "none"


def _refuse(problems: list[tuple[str, str]], total: int, what: str) -> None:
    lines = [f"  {where}: {reason}" for where, reason in problems[:LISTED]]
    if len(problems) > LISTED:
        lines.append(f"  ... and {len(problems) - LISTED} more")
    raise PatchingError(f"{len(problems)} of {total} rows of {what}:\n" + "\n".join(lines))
