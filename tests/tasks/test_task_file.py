"""Tasks as data: task files (JSON Lines, CSV, MIB's schema), the shipped tasks on a random model and
on SmolLM2 (their clean-answer accuracy), and the one error that lists every failing row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TL_MAJOR, raises
from transformer_lens_patching import (
    Accuracy,
    LogitDiff,
    PatchingError,
    Task,
    TaskRow,
    TaskTokens,
    load_task,
    shipped_tasks,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"
SHIPPED = ("greater_than", "ioi", "multiple_choice")


def write_rows(path: Path, rows: list) -> Path:
    """`rows` as JSON Lines (strings are written as they are: a line that is not JSON)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def good_row(**changes) -> dict:
    row = {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Mary and John went to the store, Mary gave a drink to",
        "answer": " Mary",
        "wrong": " John",
        "positions": {"IO": " Mary", "S2": [" John", 2]},
    }
    return {**row, **changes}


# --- the shipped tasks ---


def test_the_shipped_tasks_are_listed_and_load():
    assert shipped_tasks() == SHIPPED
    for name in SHIPPED:
        task = load_task(name)
        assert isinstance(task, Task) and task.name == name and len(task) >= 16
        assert all(row.positions.keys() == task.rows[0].positions.keys() for row in task.rows)
        assert len({row.clean for row in task.rows}) == len(task), "rows are distinct"
    assert load_task("ioi").labels == ("IO", "S1", "S2")


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_task_tokenizes_on_a_random_model(wide_model, name):
    task = load_task(name)
    tokens = task.tokens(wide_model)
    pad = wide_model.tokenizer.pad_token_id if wide_model.tokenizer.pad_token_id is not None else None
    batch, width = tokens.clean.shape
    assert isinstance(tokens, TaskTokens) and len(tokens) == batch == len(task)
    assert tokens.corrupted.shape == tokens.clean.shape and tokens.answers.shape == (batch, 2)
    assert tokens.choices.shape == (batch, 1 + tokens.wrong.shape[1])
    assert int(tokens.end.max()) == width - 1 and set(tokens.positions) == {*task.labels, "end"}
    for index in range(batch):
        end = int(tokens.end[index])
        after = tokens.clean[index, end + 1 :]
        assert (after == tokens.corrupted[index, end + 1 :]).all(), "clean and corrupted are padded alike"
        assert pad is None or (after == pad).all()
        for label in task.labels:
            assert 0 < int(tokens.positions[label][index]) <= end
    assert (tokens.answers[:, 0] != tokens.answers[:, 1]).all()
    if name == "ioi":  # the labelled names are the answers' tokens
        rows = torch.arange(batch)
        assert (tokens.clean[rows, tokens.positions["IO"]] == tokens.answers[:, 0]).all()
        assert (tokens.clean[rows, tokens.positions["S2"]] == tokens.answers[:, 1]).all()
        assert (tokens.positions["S1"] < tokens.positions["S2"]).all()
    if name == "multiple_choice":
        rows = torch.arange(batch)
        assert (tokens.clean[rows, tokens.positions["option"]] == tokens.answers[:, 0]).all()
    with torch.no_grad():
        logits = wide_model(tokens.clean)
    assert isinstance(tokens.logit_diff(), LogitDiff) and isinstance(tokens.accuracy(), Accuracy)
    assert torch.isfinite(tokens.logit_diff(per_prompt=True)(logits)).all()
    assert 0.0 <= float(tokens.accuracy()(logits)) <= 1.0


def test_padding_does_not_change_what_is_read(wide_model):
    """A prompt right-padded in the batch is read at its end exactly as it is alone."""
    tokens = load_task("ioi")[:8].tokens(wide_model)
    short = int(tokens.end.argmin())
    assert int(tokens.end[short]) < tokens.clean.shape[1] - 1, "the batch pads some prompt"
    with torch.no_grad():
        batched = wide_model(tokens.clean)[short, int(tokens.end[short])]
        alone = wide_model(tokens.clean[short : short + 1, : int(tokens.end[short]) + 1])[0, -1]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_slicing_a_task_keeps_its_rows_and_name():
    task = load_task("greater_than")
    head = task[:5]
    assert head.rows == task.rows[:5] and head.name == task.name and len(head) == 5
    with raises("slice"):
        task[0]


# --- the file formats ---


def test_csv_reads_like_json_lines(tmp_path):
    from_csv = load_task(FIXTURES / "small.csv")
    assert from_csv.name == "small" and len(from_csv) == 2
    first, second = from_csv.rows
    assert first == TaskRow(
        clean="When Mary and John went to the store, John gave a drink to",
        corrupted="When Mary and John went to the store, Mary gave a drink to",
        answers=(" Mary",),
        wrong=(" John",),
        positions={"subject": (" Mary", 1), "key": (" John", -1)},
        where="line 2",
        id="first",
    )
    assert second.answers == ("58", "67") and second.wrong == ("30", "21") and second.where == "line 3"
    lines = [
        {"id": row.id, "clean": row.clean, "corrupted": row.corrupted, "answer": list(row.answers)}
        | {"wrong": list(row.wrong), "positions": {label: list(spec) for label, spec in row.positions.items()}}
        for row in from_csv.rows
    ]
    from_jsonl = load_task(write_rows(tmp_path / "small.jsonl", lines))
    assert from_jsonl.rows == tuple(
        TaskRow(**{**row.__dict__, "where": f"line {n}"}) for n, row in enumerate(from_csv.rows, 1)
    )


def test_answer_lists_fill_by_repeating_their_first(wide_model):
    tokens = load_task(FIXTURES / "small.csv").tokens(wide_model)
    first_token = {
        text: wide_model.to_tokens(text, prepend_bos=False)[0, 0].item()
        for text in (" Mary", " John", "58", "67", "30", "21")
    }
    assert tokens.correct.tolist() == [[first_token[" Mary"]] * 2, [first_token["58"], first_token["67"]]]
    assert tokens.wrong.tolist() == [[first_token[" John"]] * 2, [first_token["30"], first_token["21"]]]
    assert tokens.answers.tolist() == [
        [first_token[" Mary"], first_token[" John"]],
        [first_token["58"], first_token["30"]],
    ]
    assert tokens.choices.shape == (2, 3)


def test_json_files_hold_an_array_or_json_lines(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([good_row(), good_row(id=7)]))
    lines = write_rows(tmp_path / "lines.json", [good_row(), good_row(id=7)])
    for path in (array, lines):
        task = load_task(path)
        assert len(task) == 2 and task.rows[1].id == "7"
    assert load_task(array).rows[1].where == "item 2" and load_task(lines).rows[1].where == "line 2"
    single = tmp_path / "single.json"
    single.write_text(json.dumps(good_row(), indent=2))
    assert load_task(single).rows[0].where == "item 1"


# --- MIB's schema ---


def test_mib_ioi_rows_load_as_mibs_circuit_track_reads_them(wide_model):
    task = load_task(FIXTURES / "mib_ioi.jsonl")
    first = task.rows[0]
    assert first.clean == "When Mary and John went to the store, John gave a drink to"
    assert first.corrupted == "When Mary and John went to the store, Mary gave a drink to", "s2_io_flip by default"
    assert (first.answers, first.wrong) == ((" Mary",), (" John",))
    abc = load_task(FIXTURES / "mib_ioi.jsonl", counterfactual="abc_counterfactual")
    assert abc.rows[0].corrupted.endswith("Kate gave a drink to") and abc.rows[0].answers == (" Mary",)
    tokens = task.tokens(wide_model)
    assert tokens.clean.shape == tokens.corrupted.shape and tokens.answers.shape == (3, 2)
    with raises(r"no 'random_names_counterfactual' object: its counterfactuals are s2_io_flip_counterfactual, abc"):
        load_task(FIXTURES / "mib_ioi.jsonl", counterfactual="random_names_counterfactual")


def test_mib_mcqa_rows_load_with_their_choices(wide_model):
    task = load_task(FIXTURES / "mib_mcqa.json")
    first, second = task.rows
    assert first.corrupted.startswith("A lemon is yellow.") and "\nX. yellow" in first.corrupted
    assert (first.answers, first.wrong) == (("B",), ("X", "A", "C", "D")), "symbol_counterfactual by default"
    assert (second.answers, second.wrong, second.id) == (("A",), ("C", "B", "D"), "1")
    spaced = load_task(FIXTURES / "mib_mcqa.json", label_prefix=" ", counterfactual="noun_counterfactual")
    assert spaced.rows[0].corrupted.startswith("A cherry is red.")
    assert (spaced.rows[0].answers, spaced.rows[0].wrong) == ((" B",), (" A", " C", " D"))
    tokens = spaced.tokens(wide_model)
    assert tokens.choices.shape == (2, 4) and tokens.clean.shape == tokens.corrupted.shape


def test_mib_options_are_refused_for_this_librarys_format():
    with raises(r"counterfactual= and label_prefix= \(tl-patch analyze: --counterfactual, --label-prefix\) apply"):
        load_task("ioi", counterfactual="abc_counterfactual")


def test_mib_rows_without_a_default_counterfactual_name_theirs(tmp_path):
    path = write_rows(
        tmp_path / "mib.jsonl",
        [{"prompt": "1 + 1 =", "label": 2, "other_counterfactual": {"prompt": "1 + 2 =", "label": 3}}],
    )
    with raises("has none of s2_io_flip_counterfactual.*its counterfactuals: other_counterfactual"):
        load_task(path)
    task = load_task(path, counterfactual="other_counterfactual", label_prefix=" ")
    assert (task.rows[0].answers, task.rows[0].wrong) == ((" 2",), (" 3",))


# --- errors: every failing row, with its line and why ---


def test_a_bad_file_lists_every_bad_row_with_its_line_and_reason(tmp_path):
    path = write_rows(
        tmp_path / "bad.jsonl",
        [
            good_row(),
            {k: v for k, v in good_row().items() if k != "corrupted"},
            good_row(clean="   "),
            '{"clean": "oops",',
            good_row(wrong=[]),
            good_row(positions={"IO": " Mary"}),
            good_row(positions={"IO": " Mary", "S2": [" John", 0]}),
            good_row(positions={"IO": " Mary", "S2": " John", "end": " to"}),
            [1, 2],
            good_row(answer=17, id="numeric"),
        ],
    )
    with pytest.raises(PatchingError, match=r"9 of 10 rows of .*bad.jsonl cannot be read") as caught:
        load_task(path)
    message = str(caught.value)
    expected = [
        "line 2: 'corrupted' is missing",
        "line 3: 'clean' is empty",
        "line 4: not valid JSON",
        "line 5: 'wrong' must be a text or a non-empty list of texts",
        "line 6: its position labels are IO, but line 1's are IO, S2",
        "line 7: position 'S2' must be a text or [text, occurrence]",
        "line 8: the position label 'end' is reserved",
        "line 9: expected a JSON object, got list",
        "line 10 (id numeric): 'answer' must be a text",
    ]
    for line in expected:
        assert line in message, message
    assert "line 1:" not in message


def test_many_bad_rows_are_counted_after_the_first_ten(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [good_row(answer="")] * 13)
    with raises(r"13 of 13 rows(.|\n)*line 10: (.|\n)*\.\.\. and 3 more"):
        load_task(path)


def test_rows_a_model_cannot_use_are_listed_with_their_reasons(tmp_path, wide_model):
    path = write_rows(
        tmp_path / "bad.jsonl",
        [
            good_row(),
            good_row(corrupted="When Mary and John went to the store, Mary Ann gave a drink to", id="longer"),
            good_row(wrong=[" John", " Mary Ann"]),
            good_row(positions={"IO": " Mary", "S2": [" John", 3]}),
            good_row(positions={"IO": " Ma", "S2": " John"}),
            good_row(positions={"IO": " Kate", "S2": " John"}),
        ],
    )
    task = load_task(path)
    refused = r"5 of 6 rows of 'bad' \(.*bad.jsonl\) cannot be used with this model"
    with pytest.raises(PatchingError, match=refused) as caught:
        task.tokens(wide_model)
    message = str(caught.value)
    for line in [
        "line 2 (id longer): the clean prompt is 15 tokens and the corrupted one 16",
        "line 3: the answer ' Mary' and the wrong answer ' Mary Ann' both start with the token ' Mary'",
        "line 4: position 'S2': ' John' appears 2 time(s) in the clean prompt, not 3",
        "line 5: position 'IO': ' Ma' does not end at a token boundary",
        "line 6: position 'IO': ' Kate' is not in the clean prompt",
    ]:
        assert line in message, message
    assert task[:1].tokens(wide_model).clean.shape[0] == 1


def test_prompts_must_fit_the_models_context(tmp_path, wide_model):
    long = "word " * 80
    path = write_rows(tmp_path / "long.jsonl", [good_row(clean=long + "a", corrupted=long + "b", positions={})])
    with raises("line 1: a prompt reaches the model's context of 64 tokens"):
        load_task(path).tokens(wide_model)


def test_sources_that_are_not_task_files_are_refused(tmp_path):
    with raises("'nope' is neither a shipped task .*greater_than, ioi, multiple_choice"):
        load_task("nope")
    with raises(r"a task file ends in \.jsonl, \.json, \.csv"):
        load_task(tmp_path / "task.txt")
    with raises("No task file"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with raises("has no rows"):
        load_task(tmp_path / "empty.jsonl")
    (tmp_path / "columns.csv").write_text("prompt,answer\nx,y\n")
    with raises("has the columns 'prompt', 'answer'; a task file's are clean, corrupted"):
        load_task(tmp_path / "columns.csv")


# --- the shipped tasks on SmolLM2 ---


@pytest.mark.skipif(
    TL_MAJOR >= 4 or bool(os.environ.get("TLP_FAST")),
    reason="SmolLM2 runs the shipped tasks once, on TransformerLens 2 (TLP_FAST skips it)",
)
@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_task_is_meaningful_on_smollm2(smollm2_model, name):
    """SmolLM2 answers the clean prompts (the answer's first token over the wrong one's, and over
    every distractor), and the corrupted prompts take the logit difference away."""
    model = smollm2_model
    tokens = load_task(name).tokens(model)
    with torch.no_grad():
        clean, corrupted = model(tokens.clean), model(tokens.corrupted)
    read = clean[torch.arange(len(tokens)), tokens.end]
    right, wrong = read.gather(1, tokens.answers[:, :1]), read.gather(1, tokens.answers[:, 1:])
    accuracy = float((right > wrong).float().mean())
    among = float(
        (read.gather(1, tokens.correct[:, :1])[:, 0] > read.gather(1, tokens.wrong).max(1).values).float().mean()
    )
    clean_diff, corrupted_diff = float(tokens.logit_diff()(clean)), float(tokens.logit_diff()(corrupted))
    print(
        f"\n{name}: clean accuracy {accuracy:.3f} (answer vs wrong), {among:.3f} (among all {tokens.choices.shape[1]} "
        f"choices); logit difference clean {clean_diff:.2f}, corrupted {corrupted_diff:.2f}"
    )
    assert float(tokens.accuracy()(clean)) == pytest.approx(among)
    assert accuracy >= 0.75 and among >= 0.75
    assert clean_diff > 1.0 and corrupted_diff < clean_diff - 1.0
    if name == "ioi":
        rows = torch.arange(len(tokens))
        assert (tokens.clean[rows, tokens.positions["IO"]] == tokens.answers[:, 0]).all()
