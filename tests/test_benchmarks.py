"""The attribution, circuit and GPU benchmarks run end to end on small shapes (`--tiny`); their
speed targets are the benchmarks' to check, on their full shapes, not these tests'."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.models import TL_MAJOR

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def tiny_run(script: str, capsys) -> tuple[object, list[str]]:
    """Run `benchmarks/<script>.py --tiny` in this process: its module, and the lines it printed."""
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", BENCHMARKS / f"{script}.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--tiny"]) == 0
    return benchmark, capsys.readouterr().out.splitlines()


@pytest.mark.skipif(TL_MAJOR < 4, reason="the benchmark compares with TransformerLens 4.3's attribution helpers")
def test_attribution_benchmark_tiny(capsys):
    benchmark, lines = tiny_run("attribution", capsys)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| comparison")]
    names = [row.split(" | ")[0] for row in rows]
    expected = [
        "| attr_patch vs act_patch, heads",
        "| attr_patch vs act_patch, neurons",
        "| attr_edges EAP vs",
        "| attr_edges EAP-IG",
        "| attr_patch vs TransformerLens",
        "| attr_edges EAP vs TransformerLens",
        *[f"| peak memory, {key}" for key in benchmark.MEMORY_KEYS[1:]],
    ]
    assert len(names) == len(expected) and all(name.startswith(start) for name, start in zip(names, expected)), names
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert cells[-1].strip() == "not checked" and "nan" not in row and "inf" not in row, row
    gaps = [float(line.split("largest difference ")[1].split()[0]) for line in lines if "largest difference" in line]
    assert len(gaps) == 2 and max(gaps) < 1e-5, gaps


def _gpt2_style_edge_count(n_layers: int, n_heads: int) -> int:
    """Edges of a GPT-2-style graph, counted here: every head's q, k and v input reads the embeddings and
    every head and MLP of earlier layers; an MLP those and its own layer's heads; the logits everything."""
    earlier = [1 + layer * (n_heads + 1) for layer in range(n_layers)]
    return sum(3 * n_heads * senders + senders + n_heads for senders in earlier) + 1 + n_layers * (n_heads + 1)


@pytest.mark.skipif(TL_MAJOR < 4, reason="the benchmark's main sections run on a TransformerBridge")
def test_circuit_benchmark_tiny(capsys):
    benchmark, lines = tiny_run("circuits", capsys)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| measurement")]
    tiny = benchmark.SHAPES["tiny"]
    edges = _gpt2_style_edge_count(tiny["n_layer"], tiny["n_head"])
    assert rows[0].startswith(f"| attr_edges EAP, the whole edge graph ({edges} edges) | "), rows
    assert rows[1].startswith("| faithfulness_curve, 50 sizes + full + empty ("), rows
    assert rows[2].startswith("| evaluate_circuit of the same 52 circuits stacked vs one at a time | "), rows
    assert rows[3].startswith(("| auto-circuit: not installed |", "| faithfulness_curve vs auto-circuit")), rows
    assert len(rows) == 4 and all("nan" not in row and "inf" not in row for row in rows), rows
    for row in rows[1:3]:
        ratio = row.split(" | ")[3]
        assert ratio.startswith("**") and float(ratio.strip("*x").replace(",", "")) > 0, row
    assert "52 circuits x 2 prompts" in next(line for line in lines if line.startswith("2. ")), lines
    gaps = [float(gap) for line in lines for gap in re.findall(r"values (\S+) of \|full - empty\|", line)]
    assert len(gaps) in (2, 3) and max(gaps) < 1e-4, gaps


def test_gpu_benchmark_tiny(capsys):
    benchmark, lines = tiny_run("gpu", capsys)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| row |")]
    assert lines[0].startswith("device CPU") and "transformer-lens" in lines[0], lines[0]
    titles = [line for line in lines if line.startswith("## ")]
    assert len(titles) == 2 and ", float32, 8 prompts" in titles[0] and ", bfloat16, 16 prompts" in titles[1], titles
    expected = [
        '| act_patch IterNode("z") vs get_act_patch_attn_head_out_all_pos | ',
        '| act_patch IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each") vs get_act_patch_block_',
        '| path_patch IterNode("z") -> resid_post 1, direct_includes_mlps=True, vs two passes per sender ',
        '| path_patch IterNode("z") -> resid_post 1, direct_includes_mlps=False, vs two passes per sender ',
    ]
    assert len(rows) == 2 * len(expected), rows
    assert all(row.startswith(start) for row, start in zip(rows, expected * 2)), rows
    tiny = benchmark.TINY["llama8b"]
    n_cells = [tiny.n_layers * tiny.n_heads, 3 * tiny.n_layers * benchmark.SEQ_LEN, *[tiny.n_layers * tiny.n_heads] * 2]
    for index, row in enumerate(rows):
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 7 and "nan" not in row and "inf" not in row, row
        ours, baseline, ratio = float(cells[1].removesuffix(" s")), float(cells[2].split(" s")[0]), cells[3]
        assert ours > 0 and baseline > 0 and ratio.startswith("**"), row
        assert float(ratio.strip("*x").replace(",", "")) > 0, row
        assert cells[4].count("GiB") == 2 and cells[5] in ("not checked (tiny)", "-"), row
        gap, tolerance = re.fullmatch(r"yes \((\S+) <= (\S+); \S+ of the spread\)", cells[6]).groups()
        assert float(gap) <= float(tolerance) == (1e-4 if index < 4 else 5e-2), row
        if index < 4:
            assert "extrapolated" not in cells[2], row
        else:
            sampled = f"(extrapolated from {min(tiny.baseline_cells, n_cells[index - 4])} of {n_cells[index - 4]} cells"
            assert sampled in cells[2], row
    assert sum(cell == "not checked (tiny)" for row in rows for cell in row.split(" | ")) == 2, rows
