"""`tl-patch` as a user meets it: answers before importing torch, one-line errors naming the
option, an --out folder checked before any model is loaded, and results kept when a run stops.
"""

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import tl_patch
from tests.helpers import TL_MAJOR
from tests.oracles import models
from transformer_lens_patching import cli, shipped_tasks
from transformer_lens_patching._tasks.ioi import analysis as ioi_analysis
from transformer_lens_patching._tasks.task.loader import SUFFIXES as TASK_SUFFIXES
from transformer_lens_patching.analysis import TaskSettings
from transformer_lens_patching.ioi import STEP_KEYS, IOISettings

HEAVY = ("torch", "transformer_lens", "transformer_lens_patching", "transformers")


def imported_after(argv: list[str]) -> tuple[int, str, list[str]]:
    """Exit status, stderr and the heavy modules imported, when a fresh interpreter runs `tl-patch argv`."""
    script = (
        "import sys, tl_patch\n"
        "try:\n    status = tl_patch.main(sys.argv[1:])\nexcept SystemExit as exit:\n    status = exit.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(status)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, check=False
    )
    return run.returncode, run.stderr, run.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["ioi", "--help"], ["ioi", "--n-prompts", "0"], ["ioi", "--bogus"]])
def test_help_and_bad_arguments_answer_without_importing_torch(argv):
    status, _, imported = imported_after(argv)
    assert status == (0 if "--help" in argv else 2)
    assert imported == "[]", f"tl-patch {' '.join(argv)} imported {imported}"


def test_the_console_script_runs_the_front():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="tl-patch")
    assert entry.value == "tl_patch:main"
    script = Path(sys.executable).parent / "tl-patch"
    run = subprocess.run([str(script), "ioi", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and "--min-effect" in run.stdout


def error_of(argv: list[str], capsys) -> str:
    """The one line `tl-patch argv` prints, after checking it exits with status 2 and runs nothing."""
    assert tl_patch.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("tl-patch: error: ")
    return captured.err


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail if the command gets past its arguments (to load a model or run anything)."""

    def run(args):
        raise AssertionError("the command ran despite a bad argument")

    monkeypatch.setattr(cli, "run", run)


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--n-prompts", "0", "must be at least 1, got 0"),
        ("--n-prompts", "many", "expected a whole number, got 'many'"),
        ("--top-k", "-1", "must be at least 1, got -1"),
        ("--top-neurons", "0", "must be at least 1, got 0"),
        ("--circuit-candidates", "0", "must be at least 1, got 0"),
        ("--circuit-faithfulness", "-0.5", "must be 0 or more"),
        ("--batch-size", "0", "must be at least 1"),
        ("--min-effect", "-0.1", "must be 0 or more"),
        ("--model", "./no-such-folder", "'./no-such-folder' is not a folder that exists"),
        ("--device", "cdua", "torch knows no device 'cdua'"),
        ("--device", "cuda 0", "is not a device name"),
    ],
)
def test_bad_arguments_get_one_line_naming_the_option(option, value, says, capsys, nothing_runs):
    message = error_of(["ioi", option, value], capsys)
    assert f"argument {option}: " in message and says in message


def test_cuda_without_cuda_says_what_to_do(capsys, nothing_runs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = error_of(["ioi", "--device", "cuda"], capsys)
    assert "argument --device: 'cuda' needs CUDA" in message and "use --device cpu" in message


def test_a_mistyped_option_gets_the_closest_one(capsys, nothing_runs):
    message = error_of(["ioi", "--min-efect", "0.1"], capsys)
    assert "unrecognized arguments: --min-efect" in message and "did you mean --min-effect?" in message


def test_a_model_file_is_not_a_model_folder(tmp_path, capsys, nothing_runs):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert f"argument --model: {str(weights)!r} is a file" in error_of(["ioi", "--model", str(weights)], capsys)


def test_an_unwritable_out_folder_is_refused_before_any_model_loads(tmp_path, capsys, nothing_runs):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = error_of(["ioi", "--out", str(blocker / "report")], capsys)
    assert "argument --out: cannot write into" in message and "choose a folder you can write" in message


def test_the_out_folder_is_created_and_left_clean(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run", lambda args: seen.append(args) or 0)
    out = tmp_path / "new" / "report"
    assert tl_patch.main(["ioi", "--out", str(out)]) == 0
    assert out.is_dir() and list(out.iterdir()) == [] and seen[0].out == str(out)


def test_a_home_relative_out_folder_is_the_one_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    monkeypatch.setattr(cli, "run", lambda args: seen.append(args) or 0)
    assert tl_patch.main(["ioi", "--out", "~/report"]) == 0
    assert seen[0].out == str(tmp_path / "report") and (tmp_path / "report").is_dir()


def test_a_dry_run_needs_no_out_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "run", lambda args: 0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert tl_patch.main(["ioi", "--dry-run", "--out", str(blocker / "report")]) == 0


def test_the_command_lines_defaults_are_the_settings_defaults():
    args = tl_patch.parse_arguments(["ioi", "--dry-run"])
    assert cli.settings_of(args) == IOISettings()
    # fdr (the false discovery rate at which heads are named) is the library's setting; the command uses 0.05
    assert set(tl_patch.DEFAULTS) == {f.name for f in fields(IOISettings)} - {"prepend_bos", "batch_size", "fdr"}
    assert tl_patch.EMBEDDED == cli.EMBEDDED
    assert tl_patch.SHIPPED_TASKS == shipped_tasks() and tl_patch.TASK_SUFFIXES == TASK_SUFFIXES
    analyze = cli.settings_of(tl_patch.parse_arguments(["analyze", "--task", "ioi", "--dry-run"]))
    assert analyze == TaskSettings()
    assert cli.settings_of(tl_patch.parse_arguments(["ioi", "--dry-run", "--top-neurons", "5"])).top_neurons == 5
    circuit = cli.settings_of(
        tl_patch.parse_arguments(["ioi", "--circuit-candidates", "7", "--circuit-faithfulness", "0.6"])
    )
    assert (circuit.circuit_candidates, circuit.circuit_faithfulness) == (7, 0.6)


# A run that stops keeps what it finished


@pytest.fixture(scope="module")
def small_model(tok):
    return models.gpt2_like(n_layers=2, tok=tok, vocab=len(tok))


def stop_at_step(monkeypatch, key: str, error: BaseException) -> None:
    """Make the IOI step `key` raise `error` when it computes."""

    def stop(*args, **kwargs):
        raise error

    steps = tuple(
        dataclasses.replace(step, compute=stop) if step.key == key else step for step in ioi_analysis.IOI_STEPS
    )
    monkeypatch.setattr(ioi_analysis, "IOI_STEPS", steps)


def run_cli(monkeypatch, model, out: Path) -> int:
    monkeypatch.setattr(cli, "load_model", lambda name, device: model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl_patch.main(["ioi", "--n-prompts", "3", "--quiet", "--out", str(out)])


def test_a_failing_step_keeps_the_steps_before_it(small_model, tmp_path, monkeypatch, capsys):
    stop_at_step(monkeypatch, "path_logits", RuntimeError("a bug in step 4"))
    with pytest.raises(RuntimeError, match="a bug in step 4"):
        run_cli(monkeypatch, small_model, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [step["key"] for step in data["steps"]] == ["act_heads", "act_words"]
    missing = ["path_logits", "path_queries", "path_values", "attr_neurons", "circuit"]
    assert data["complete"] is False and data["missing_steps"] == missing
    page = (tmp_path / "report.html").read_text()
    assert 'id="missing-steps"' in page and f"{', '.join(missing)} did not run" in page
    assert f"tl-patch: stopped before {', '.join(missing)}" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_ends_quietly(tmp_path, monkeypatch, capsys):
    def interrupted(name, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupted)
    assert tl_patch.main(["ioi", "--quiet", "--out", str(tmp_path)]) == cli.INTERRUPTED
    assert capsys.readouterr().err == "tl-patch: interrupted.\n"


def test_a_new_run_removes_the_last_runs_report_first(small_model, tmp_path, monkeypatch, capsys):
    for name in ("report.html", "results.json", "results.csv"):
        (tmp_path / name).write_text("from an earlier run")
    stop_at_step(monkeypatch, "act_heads", KeyboardInterrupt())
    assert run_cli(monkeypatch, small_model, tmp_path) == cli.INTERRUPTED
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["steps"] == [] and data["missing_steps"] == list(STEP_KEYS), "saved once the logit diffs are known"
    assert not (tmp_path / "results.csv").exists() or "earlier" not in (tmp_path / "results.csv").read_text()
    assert "earlier" not in (tmp_path / "report.html").read_text()


def test_an_interrupted_run_keeps_what_it_finished(small_model, tmp_path, monkeypatch, capsys):
    stop_at_step(monkeypatch, "act_words", KeyboardInterrupt())
    assert run_cli(monkeypatch, small_model, tmp_path) == cli.INTERRUPTED
    data = json.loads((tmp_path / "results.json").read_text())
    assert [step["key"] for step in data["steps"]] == ["act_heads"] and data["missing_steps"] == list(STEP_KEYS[1:])
    assert "interrupted" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.partial")), "no half-written file is left"


def test_results_are_saved_after_every_step(small_model, tmp_path, monkeypatch):
    saved = []
    write_json = cli.write_json
    monkeypatch.setattr(
        cli, "write_json", lambda analysis, out: saved.append(len(analysis.steps)) or write_json(analysis, out)
    )
    assert run_cli(monkeypatch, small_model, tmp_path) == 0
    assert saved == [0, 1, 2, 3, 4, 5, 6, 7]
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_the_embedded_models_conversion_is_explained_in_one_line(tmp_path):
    from transformer_lens_patching._embedded import converted_folder, loading_line

    first = loading_line(tmp_path)
    assert first.startswith("Converting the embedded SmolLM2-135M-Instruct from its 4-bit GGUF (Q4_1)")
    assert str(converted_folder(tmp_path)) in first and "\n" not in first
    converted_folder(tmp_path).mkdir(parents=True)
    (converted_folder(tmp_path) / "model.safetensors").write_bytes(b"")
    assert loading_line(tmp_path).startswith("Loading SmolLM2-135M-Instruct (embedded; float32")


@pytest.mark.skipif(TL_MAJOR >= 4, reason="TransformerLens 4 boots every architecture its bridge supports")
def test_a_folder_of_another_architecture_is_refused_on_transformerlens_2(tmp_path, capsys):
    """TransformerLens 2 converts a folder's weights as Llama's: a GPT-2 folder gets one line saying so."""
    import transformers

    tokenizer = models.tokenizer()
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    message = error_of(["ioi", "--model", str(tmp_path), "--dry-run"], capsys)
    assert "holds a 'gpt2' checkpoint; on TransformerLens 2 a local folder can only be a Llama-architecture" in message


# Loading failures and the dry run


def test_cli_shows_bugs_instead_of_hiding_them(monkeypatch, tmp_path):
    def broken(name, device):
        raise TypeError("a bug in loading code")

    monkeypatch.setattr(cli._tl, "load_pretrained", broken)
    with pytest.raises(TypeError, match="a bug in loading code"):
        tl_patch.main(["ioi", "--model", "not-a-folder", "--quiet", "--out", str(tmp_path)])


def test_cli_turns_a_loading_failure_into_one_line(monkeypatch, capsys, tmp_path):
    def missing(name, device):
        raise OSError("not found on the hub")

    monkeypatch.setattr(cli._tl, "load_pretrained", missing)
    assert tl_patch.main(["ioi", "--model", "not-a-folder", "--quiet", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("tl-patch: error: Cannot load model 'not-a-folder'")


def test_cli_dry_run_prints_the_plans_and_runs_no_prompts(monkeypatch, capsys, tmp_path, wide_model):
    model = wide_model
    monkeypatch.setattr(cli, "load_model", lambda name, device: model)
    calls = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: calls.append(tuple(act.shape[:2])))]):
        status = tl_patch.main(["ioi", "--dry-run", "--n-prompts", "3", "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    # no pass of the prompts: only the probes of what the architecture calls (one prompt, at most two tokens;
    # one of them asks whether the final residual stream's hook fires)
    assert status == 0 and all(batch == 1 and tokens <= 2 for batch, tokens in calls) and len(calls) <= 3, calls
    assert not (tmp_path / "report").exists()
    for step in (
        "act_heads",
        "act_words at S2",
        "path_logits",
        "path_queries",
        "path_values",
        "attr_neurons",
        "circuit, exact scores of the candidates",
        "circuit, choosing on the scoring prompts",
        "circuit, faithfulness curves",
    ):
        assert f"\n{step}" in out, step
    assert out.count("forward passes in") == 14
