"""`tl-patch analyze --task FILE`: the circuit-analysis job on a task file, each shipped task end to end
through the command line on a random model, its numbers against direct calls and plain computations
written here, its usage errors, and its report in headless Chromium. SmolLM2 runs it once (TL4)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import TL_MAJOR, model_state
from tests.oracles import models
from tl_patch import main
from transformer_lens_patching import (
    EdgeGraph,
    Node,
    Task,
    TaskRow,
    act_patch,
    eap_ig_circuit,
    eap_ig_scores,
    load_task,
    path_patch,
    shipped_tasks,
)
from transformer_lens_patching import cli as tlp_cli
from transformer_lens_patching.analysis import STEP_KEYS, TaskSettings, run_task

from .test_ioi_cli import rendered_in_chromium

SETTINGS = TaskSettings(n_prompts=5, top_k=2, min_effect=0.0, fdr=0.99, top_neurons=4, circuit_candidates=4)
"""Few prompts, small screens, no size floor and a false discovery rate near 1, so that every step finds
heads on random weights and runs."""
JOB_ARGUMENTS = ["--n-prompts", "5", "--top-k", "2", "--top-neurons", "4", "--circuit-candidates", "4", "--quiet"]


@pytest.fixture(scope="module")
def job_model(tok):
    return models.gpt2_like(n_layers=3, tok=tok, vocab=len(tok))


def run_cli(monkeypatch, model, *arguments: str) -> int:
    """`tl-patch analyze ...` with `model` standing for the one --model names."""
    monkeypatch.setattr(tlp_cli, "load_model", lambda name, device: model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["analyze", *arguments])


@pytest.mark.parametrize("name", shipped_tasks())
def test_each_shipped_task_runs_end_to_end_through_the_cli(job_model, tmp_path, monkeypatch, capsys, name):
    before = model_state(job_model)
    assert run_cli(monkeypatch, job_model, "--task", name, *JOB_ARGUMENTS, "--out", str(tmp_path)) == 0
    assert model_state(job_model) == before, "the user's model is left as it was"
    printed = capsys.readouterr().out
    assert f"task {name}: 5 prompts" in printed and "Estimated time of the patching, steps 2-6" in printed
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["task"] == name and data["complete"] is True and data["missing_steps"] == []
    assert [step["key"] for step in data["steps"]] == list(STEP_KEYS)
    task = load_task(name)
    assert [p["clean"] for p in data["prompts"]] == [row.clean for row in task.rows[:5]]
    assert [p["answer"] for p in data["prompts"]] == [row.answers[0] for row in task.rows[:5]]
    assert [p["wrong"] for p in data["prompts"]] == [row.wrong[0] for row in task.rows[:5]]
    positions = data["steps"][1]["results"]["resid_pre"]["coords"]["seq_pos"]
    assert positions == [*task.labels, "end"], "the by-position step patches at the task's labels and the end"
    assert len(data["clean_logit_diff"]["per_prompt"]) == 5 and data["clean_logit_diff"]["stderr"] is not None
    assert data["clean_accuracy"] == pytest.approx(plain_accuracy(job_model, task.rows[:5]))
    corrupted_rows = [TaskRow(row.corrupted, row.clean, row.answers, row.wrong) for row in task.rows[:5]]
    assert data["corrupted_accuracy"] == pytest.approx(plain_accuracy(job_model, corrupted_rows))
    circuit = data["steps"][-1]["circuit"]
    assert circuit["circuit"]["edges"] and circuit["faithfulness"] is not None
    graph = EdgeGraph.of(job_model)
    read_back = eap_ig_circuit((tmp_path / "circuit.json").read_text(), graph)
    assert sorted(map(str, read_back.edges)) == sorted(edge["edge"] for edge in circuit["circuit_edges"])
    scores = eap_ig_scores((tmp_path / "edge_scores.json").read_text(), graph)
    for edge in read_back.edges[:20]:
        listed = next(row for row in circuit["circuit_edges"] if row["edge"] == str(edge))
        assert float(scores.score(edge)) == pytest.approx(listed["score"], rel=1e-6)
    page = (tmp_path / "report.html").read_text()
    assert f"<title>{name} circuit analysis: smollm2</title>" in page
    assert "(answer - wrong at the end)" in page and "<th>answer (answer)</th>" in page
    edges_listed = page.split('id="circuit-edges"')[1].split("</table>")[0].count("<tr><td>")
    assert edges_listed == len(circuit["circuit_edges"]), "the report lists every edge of the circuit"
    agreement = circuit["agreement"]
    assert [row["estimator"] for row in agreement["estimators"]] == ["EAP", "EAP-IG (5 steps)"]
    assert len(agreement["edges"]) == 4 and agreement["top_k"] == 2 and 'id="estimator-agreement"' in page
    with (tmp_path / "results.csv").open() as file:
        steps_in_csv = {line.split(",")[0] for line in file.readlines()[1:]}
    assert steps_in_csv == set(STEP_KEYS) - {"circuit"}


@pytest.fixture(scope="module")
def analysis(job_model):
    lines = []
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        result = run_task(job_model, load_task("ioi"), SETTINGS, "tiny", progress=False, log=lines.append)
    result.log = lines
    return result


def plain_logit_diffs(model, task, prepend_bos: bool = True) -> torch.Tensor:
    """Each row alone, unpadded: the logit of the answer's first token minus the wrong answer's at its last token."""
    tokenizer = model.tokenizer
    values = []
    for row in task.rows:
        ids = tokenizer.encode(row.clean, add_special_tokens=False)
        ids = ([tokenizer.bos_token_id] if prepend_bos else []) + ids
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        answer = tokenizer.encode(row.answers[0], add_special_tokens=False)[0]
        wrong = tokenizer.encode(row.wrong[0], add_special_tokens=False)[0]
        values.append(float(logits[answer] - logits[wrong]))
    return torch.tensor(values)


def plain_accuracy(model, rows) -> float:
    """The fraction of rows, each run alone, whose answer's first token has a larger logit at the last token
    than every wrong answer's first token."""
    tokenizer, right = model.tokenizer, 0
    for row in rows:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(row.clean, add_special_tokens=False)]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        answer = logits[tokenizer.encode(row.answers[0], add_special_tokens=False)[0]]
        wrong = [logits[tokenizer.encode(text, add_special_tokens=False)[0]] for text in row.wrong]
        right += int(all(answer > other for other in wrong))
    return right / len(rows)


def test_the_logit_differences_are_read_at_each_prompts_own_end(analysis, job_model):
    task = load_task("ioi")[:5]
    lengths = {len(job_model.tokenizer.encode(row.clean)) for row in task.rows}
    assert len(lengths) > 1, "the prompts should differ in length, so that the padding is tested"
    torch.testing.assert_close(analysis.clean_logit_diff, plain_logit_diffs(job_model, task), rtol=1e-4, atol=1e-4)
    swapped = Task(task.name, tuple(TaskRow(row.corrupted, row.clean, row.answers, row.wrong) for row in task.rows))
    torch.testing.assert_close(
        analysis.corrupted_logit_diff, plain_logit_diffs(job_model, swapped), rtol=1e-4, atol=1e-4
    )


def test_step_results_equal_direct_calls(analysis, job_model):
    """A cell of each patching step recomputed by a direct act_patch / path_patch call, with the
    metric written here: the mean logit difference at each prompt's end, normalised."""
    prompts = analysis.prompts
    rows = torch.arange(prompts.n)
    clean_mean, corrupted_mean = analysis.clean_logit_diff.mean(), analysis.corrupted_logit_diff.mean()

    def mean_ld(logits):
        at_end = logits[rows, prompts.end]
        return (at_end[rows, prompts.answers[:, 0]] - at_end[rows, prompts.answers[:, 1]]).mean()

    def restored(logits):
        return (mean_ld(logits) - corrupted_mean) / (clean_mean - corrupted_mean)

    def damaged(logits):
        return (mean_ld(logits) - clean_mean) / (clean_mean - corrupted_mean)

    head = act_patch(job_model, prompts.corrupted, Node("z", 1, head=2), restored, new_input=prompts.clean)
    assert float(head) == pytest.approx(float(analysis.step("act_heads").results["z"].sel(layer=1, head=2)), abs=1e-5)
    s2 = act_patch(
        job_model, prompts.corrupted, Node("attn_out", 2, seq_pos=prompts.positions["S2"]), restored, prompts.clean
    )
    by_position = analysis.step("act_positions").results["attn_out"]
    assert float(s2) == pytest.approx(float(by_position.sel(seq_pos="S2", layer=2)), abs=1e-5)
    direct = path_patch(
        job_model,
        prompts.clean,
        prompts.corrupted,
        Node("z", 0, head=3),
        Node("resid_post", job_model.cfg.n_layers - 1),
        damaged,
    )
    path_logits = analysis.step("path_logits").results["z"]
    assert float(direct) == pytest.approx(float(path_logits.sel(layer=0, head=3)), abs=1e-5)


def test_the_steps_name_heads_and_keep_error_bars(analysis):
    path = analysis.step("path_logits")
    assert list(path.top) == ["heads writing the answer (lower the logit diff)", "heads writing against it (raise it)"]
    assert all(result.samples is not None for result in analysis.step("act_heads").results.values())
    assert analysis.step("attr_neurons").confirmation is not None
    assert analysis.step("circuit").circuit is not None
    assert any("step 6/6" in line for line in analysis.log)


def test_a_task_without_labels_is_patched_at_each_position_back_from_the_end(job_model, tmp_path):
    rows = [
        {
            "clean": "The war lasted from the year 1745 to the year 17",
            "corrupted": "The war lasted from the year 1701 to the year 17",
            "answer": "58",
            "wrong": "30",
        },
        {
            "clean": "The long war lasted from the year 1683 to the year 16",
            "corrupted": "The long war lasted from the year 1601 to the year 16",
            "answer": "90",
            "wrong": "72",
        },
    ]
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = load_task(path)
    settings = TaskSettings(top_neurons=2, circuit_candidates=2)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        analysis = run_task(job_model, task, settings, progress=False, log=lambda line: None)
    prompts = analysis.prompts
    shortest = int(prompts.end.min())
    assert list(prompts.positions) == [f"end-{back}" for back in range(shortest, 0, -1)] + ["end"]
    assert int(prompts.end[1]) > int(prompts.end[0]), "the second prompt is longer"
    clean_mean, corrupted_mean = analysis.clean_logit_diff.mean(), analysis.corrupted_logit_diff.mean()
    rows_index = torch.arange(prompts.n)

    def restored(logits):
        at_end = logits[rows_index, prompts.end]
        mean_ld = (at_end[rows_index, prompts.answers[:, 0]] - at_end[rows_index, prompts.answers[:, 1]]).mean()
        return (mean_ld - corrupted_mean) / (clean_mean - corrupted_mean)

    two_back = prompts.end - 2
    direct = act_patch(job_model, prompts.corrupted, Node("resid_pre", 1, seq_pos=two_back), restored, prompts.clean)
    result = analysis.step("act_positions").results["resid_pre"]
    assert float(direct) == pytest.approx(float(result.sel(seq_pos="end-2", layer=1)), abs=1e-5)


def test_the_dry_run_plans_every_step_and_writes_nothing(job_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    assert run_cli(monkeypatch, job_model, "--task", "greater_than", "--dry-run", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for key in STEP_KEYS:
        assert re.search(rf"^{key}", printed, re.M), f"the dry run names step {key}"
    assert "act_positions at YY" in printed and "act_positions at end" in printed
    assert not out.exists()


def never_loaded(name, device):
    raise AssertionError("the model must not load before the task file is checked")


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("greater-than", "did you mean greater_than?"),
        ("missing.jsonl", "there is no file 'missing.jsonl'"),
        ("setup.cfg", "it must end in .jsonl, .json, .csv"),
    ],
)
def test_a_bad_task_argument_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, task, message):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setattr(tlp_cli, "load_model", never_loaded)
    assert main(["analyze", "--task", task, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tl-patch: error: argument --task:") and message in error and error.count("\n") == 1


def test_bad_rows_are_listed_before_the_model_loads(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"clean": "a b c", "corrupted": "a b d", "answer": " e", "wrong": " f"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": ""}) + "\n{not json\n")
    monkeypatch.setattr(tlp_cli, "load_model", never_loaded)
    assert main(["analyze", "--task", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "2 of 3 rows" in error and "line 2" in error and "line 3" in error


def test_more_prompts_than_rows_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tlp_cli, "load_model", never_loaded)
    assert main(["analyze", "--task", "ioi", "--n-prompts", "100", "--out", str(tmp_path)]) == 2
    assert "100 prompts asked for (--n-prompts, TaskSettings.n_prompts), but the task 'ioi' has 24 rows" in (
        capsys.readouterr().err
    )


def test_the_output_folder_is_named_after_the_task(monkeypatch, tmp_path):
    import tl_patch

    monkeypatch.chdir(tmp_path)
    assert tl_patch.parse_arguments(["analyze", "--task", "greater_than"]).out == "greater_than-analysis"
    path = tmp_path / "agreement.csv"
    path.write_text("clean,corrupted,answer,wrong\n")
    assert tl_patch.parse_arguments(["analyze", "--task", str(path)]).out == "agreement-analysis"


def test_the_report_renders_in_headless_chromium(job_model, tmp_path, monkeypatch):
    assert run_cli(monkeypatch, job_model, "--task", "multiple_choice", *JOB_ARGUMENTS, "--out", str(tmp_path)) == 0
    page = (tmp_path / "report.html").read_text()
    run = rendered_in_chromium(tmp_path / "report.html")
    assert run.returncode == 0, run.stderr[-2000:]
    figures = len(re.findall(r'<div class="figure">', page))
    assert figures >= 5
    assert len(re.findall(r'class="[^"]*js-plotly-plot[^"]*"', run.stdout)) == figures, "every figure is drawn"
    assert not [line for line in run.stderr.splitlines() if ":CONSOLE" in line], "nothing logged to the console"


@pytest.mark.skipif(bool(os.environ.get("TLP_FAST")), reason="TLP_FAST set: SmolLM2 skipped")
@pytest.mark.skipif(TL_MAJOR < 4, reason="the SmolLM2 job runs once, on TransformerLens 4")
def test_greater_than_on_smollm2_matches_transformers(tmp_path):
    """The job on the embedded model, its clean logit differences recomputed with the Hugging Face model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformer_lens_patching._embedded import hf_folder

    arguments = ["--task", "greater_than", "--n-prompts", "4", "--top-neurons", "4", "--circuit-candidates", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", *arguments, "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is True and data["clean_accuracy"] == 1.0
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder()))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_folder()), dtype=torch.float32).eval()
    expected = []
    for prompt in data["prompts"]:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt["clean"], add_special_tokens=False)]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        answer, wrong = (tokenizer.encode(prompt[key], add_special_tokens=False)[0] for key in ("answer", "wrong"))
        expected.append(float(logits[answer] - logits[wrong]))
    assert data["clean_logit_diff"]["per_prompt"] == pytest.approx(expected, abs=2e-3)
    assert min(expected) > 0, "SmolLM2 prefers the later year on each of these prompts"
