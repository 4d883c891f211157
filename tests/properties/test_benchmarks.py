"""The attribution, circuit and GPU benchmarks run end to end on small shapes (`--tiny`) and return
their rows; their speed targets are the benchmarks' to check, on their full shapes, not these tests'."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tests.helpers import TL_MAJOR

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def tiny_run(script: str, monkeypatch, capsys) -> tuple[object, list, list[str]]:
    """Run `benchmarks/<script>.py --tiny` in this process: its module, the rows it returned, and the
    lines it printed, measuring and then printing the same rows as its `main` does."""
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", BENCHMARKS / f"{script}.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.run(benchmark.parse_args(["--tiny"]))
    monkeypatch.setattr(benchmark, "run", lambda args: rows)
    assert benchmark.main(["--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| ") for line in lines) == len(rows) + len({row.group for row in rows}), lines
    return benchmark, rows, lines


def positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@pytest.mark.skipif(TL_MAJOR < 4, reason="the benchmark compares with TransformerLens 4.3's attribution helpers")
def test_attribution_benchmark_tiny(monkeypatch, capsys):
    benchmark, rows, _ = tiny_run("attribution", monkeypatch, capsys)
    expected = [
        "attr_patch vs act_patch, heads",
        "attr_patch vs act_patch, neurons",
        "attr_edges EAP vs",
        "attr_edges EAP-IG",
        "attr_patch vs TransformerLens",
        "attr_edges EAP vs TransformerLens",
        *[f"peak memory, {key}" for key in benchmark.MEMORY_KEYS[1:]],
    ]
    assert len(rows) == len(expected) and all(row.name.startswith(start) for row, start in zip(rows, expected)), rows
    for row in rows[:6]:
        assert row.unit == "s" and positive(row.ours) and positive(row.baseline) and positive(row.ratio), row
    for row in rows[6:]:
        assert row.unit == "B" and row.ours >= 0 and positive(row.baseline) and math.isfinite(row.ratio), row
        assert row.bound == 1.0, row
    gaps = [row.gap for row in rows if row.gap is not None]
    assert len(gaps) == 2 and max(gaps) < 1e-5, gaps


def _gpt2_style_edge_count(n_layers: int, n_heads: int) -> int:
    """Edges of a GPT-2-style graph, counted here: every head's q, k and v input reads the embeddings and
    every head and MLP of earlier layers; an MLP those and its own layer's heads; the logits everything."""
    earlier = [1 + layer * (n_heads + 1) for layer in range(n_layers)]
    return sum(3 * n_heads * senders + senders + n_heads for senders in earlier) + 1 + n_layers * (n_heads + 1)


@pytest.mark.skipif(TL_MAJOR < 4, reason="the benchmark's main sections run on a TransformerBridge")
def test_circuit_benchmark_tiny(monkeypatch, capsys):
    benchmark, rows, _ = tiny_run("circuits", monkeypatch, capsys)
    tiny = benchmark.SHAPES["tiny"]
    edges = _gpt2_style_edge_count(tiny.n_layers, tiny.n_heads)
    assert len(rows) == 6, rows
    assert rows[0].name == f"attr_edges EAP, the whole edge graph ({edges} edges)", rows[0]
    assert positive(rows[0].ours) and rows[0].baseline is None and rows[0].gap is None, rows[0]
    sampled = min(edges, benchmark.EXACT_SAMPLE)
    assert rows[1].name == f"exact_edge_scores, {sampled} edges", rows[1]
    assert rows[2].name == f"exact_edge_scores, the whole edge graph ({edges} edges), at that rate", rows[2]
    assert rows[2].ours == pytest.approx(rows[1].ours / sampled * edges), "the sample's rate times the edges"
    rows = [rows[0], *rows[3:]]
    assert rows[1].name.startswith("faithfulness_curve, 50 sizes + full + empty ("), rows[1]
    assert rows[2].name == "evaluate_circuit of the same 52 circuits stacked vs one at a time", rows[2]
    assert rows[3].name.startswith(("auto-circuit: not installed", "faithfulness_curve vs auto-circuit")), rows[3]
    for row in rows[1:3]:
        assert positive(row.ours) and positive(row.baseline) and positive(row.ratio), row
    assert "52 circuits x 2 prompts" in rows[1].how, rows[1].how
    gaps = [row.gap for row in rows if row.gap is not None]
    assert len(gaps) in (2, 3) and max(gaps) < 1e-4 and all(row.agrees is not False for row in rows), gaps


def test_gpu_benchmark_tiny(monkeypatch, capsys):
    benchmark, rows, lines = tiny_run("gpu", monkeypatch, capsys)
    assert lines[0].startswith("device CPU") and "transformer-lens" in lines[0], lines[0]
    titles = list(dict.fromkeys(row.group for row in rows))
    assert len(titles) == 2 and ", float32, 8 prompts" in titles[0] and ", bfloat16, 16 prompts" in titles[1], titles
    expected = [
        'act_patch IterNode("z") vs get_act_patch_attn_head_out_all_pos',
        'act_patch IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each") vs get_act_patch_block_',
        'path_patch IterNode("z") -> resid_post 1, direct_includes_mlps=True, vs two passes per sender ',
        'path_patch IterNode("z") -> resid_post 1, direct_includes_mlps=False, vs two passes per sender ',
    ]
    assert len(rows) == 2 * len(expected), rows
    assert all(row.name.startswith(start) for row, start in zip(rows, expected * 2)), rows
    assert [row.group for row in rows] == [titles[0]] * 4 + [titles[1]] * 4, rows
    tiny = benchmark.TINY["llama8b"]
    n_layers, n_heads = tiny.shape.n_layers, tiny.shape.n_heads
    n_cells = [n_layers * n_heads, 3 * n_layers * tiny.shape.seq_len, *[n_layers * n_heads] * 2]
    for index, row in enumerate(rows):
        details = row.details
        assert positive(row.ours) and positive(row.baseline) and positive(row.ratio), row
        assert all(positive(peak) for peak in details["peak_memory"]), row
        assert details["target"] in ("not checked (tiny)", "-") and details["target_met"] is None, row
        assert row.agrees and row.tolerance == (1e-4 if index < 4 else 5e-2) and math.isfinite(details["spread_gap"])
        if index < 4:
            assert details["cells_run"] == details["n_cells"], row
        else:
            assert details["n_cells"] == n_cells[index - 4], row
            assert details["cells_run"] == min(tiny.baseline_cells, n_cells[index - 4]), row
            assert positive(details["measured_seconds"]), row
    assert sum(row.details["target"] == "not checked (tiny)" for row in rows) == 2, rows


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_benchmark_tiny(capsys):
    """Each estimator's row per kind of cell, after its exact baseline, with a rank correlation in
    [-1, 1] and an overlap no larger than k."""
    benchmark = _script("agreement")
    rows = benchmark.run(benchmark.parse_args(["--tiny", "--edges", "30"]))
    kinds = ["every head's z", "every neuron", "30 random edges"]
    assert len(rows) == 13 and [sum(row[0].startswith(kind) for row in rows) for kind in kinds] == [4, 4, 5], rows
    edges = ["exact (exact_edge_scores)", "EAP", "EAP-IG", "RelP", "EAP-IG on activations, 3 steps"]
    assert [row[1] for row in rows[8:]] == edges, rows
    for row in rows:
        exact = row[1].startswith("exact")
        assert (row[3] is None) == exact and (exact or -1 <= row[3] <= 1), row
        assert positive(row[5]) or row[5] == 0, row
    benchmark.print_rows(rows)
    assert sum(line.startswith("| ") for line in capsys.readouterr().out.splitlines()) == len(rows) + 1


def test_discovery_benchmark_tiny(capsys):
    """One row per method: its time, the smallest circuit reaching 0.8 (or none), CPR and CMD."""
    benchmark = _script("discovery")
    rows = benchmark.run(benchmark.parse_args(["--tiny", "--mask-steps", "3"]))
    assert [row[0] for row in rows] == ["EAP", "EAP-IG (5 steps)", "RelP", "learned masks (3 steps, from EAP-IG)"]
    for _, seconds, fraction, edges, held_out, cpr, cmd, total in rows:
        assert seconds >= 0 and math.isfinite(cpr) and math.isfinite(cmd) and total > 0
        assert fraction is None or (0 < fraction <= 1 and 0 < edges <= total and math.isfinite(held_out))
    benchmark.print_rows(rows)
    assert sum(line.startswith("| ") for line in capsys.readouterr().out.splitlines()) == len(rows) + 1


def test_positions_benchmark_tiny(capsys):
    """One row per ranking, edges and edges at positions, position-aware sizes counting pairs."""
    benchmark = _script("positions")
    rows = benchmark.run(benchmark.parse_args(["--tiny"]))
    assert [row[0] for row in rows] == list(benchmark.RANKINGS), rows
    for name, seconds, size, _, edges, held_out, cpr, cmd in rows:
        assert seconds >= 0 and math.isfinite(cpr) and math.isfinite(cmd), name
        assert size is None or (0 < size <= 1 and 0 < edges and math.isfinite(held_out)), name
    assert rows[1][3] > rows[0][3], "the position-aware rankings count (edge, position) pairs"
    benchmark.print_rows(rows)
    assert sum(line.startswith("| ") for line in capsys.readouterr().out.splitlines()) == len(rows) + 1


def test_discovery_benchmark_auto_circuit_tiny(capsys):
    """The auto_circuit section: one row saying why not where auto-circuit does not import, else one row
    per method with its time and each size's faithfulness, error and edges."""
    benchmark = _script("discovery")
    args = benchmark.parse_args(["--tiny", "--sections", "auto_circuit", "--mask-steps", "3"])
    rows = benchmark.auto_circuit_rows(args)
    if rows[0]["name"] == "auto-circuit: not installed":
        assert len(rows) == 1 and "import auto_circuit" in rows[0]["why"], rows
    else:
        names = ["EAP", "EAP-IG (5 steps)", "learned masks (3 steps", "auto-circuit subnetwork probing (3 epochs"]
        assert len(rows) == 4 and all(row["name"].startswith(name) for row, name in zip(rows, names)), rows
        sizes = len(benchmark.AC_SIZES["tiny"])
        for row in rows:
            assert row["seconds"] >= 0 and len(row["faithfulness"]) == len(row["error"]) == len(row["edges"]) == sizes
            assert all(math.isfinite(value) for value in [*row["faithfulness"], *row["error"]]), row
    benchmark.print_auto_circuit_rows(rows, tiny=True)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| ") for line in lines) == len(rows) + 1, lines
