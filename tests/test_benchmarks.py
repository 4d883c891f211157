"""The attribution benchmark runs end to end on small shapes (`--tiny`); its speed targets are
the benchmark's to check, on the GPT-2-small shape, not this test's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.models import TL_MAJOR

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "attribution.py"


@pytest.mark.skipif(TL_MAJOR < 4, reason="the benchmark compares with TransformerLens 4.3's attribution helpers")
def test_attribution_benchmark_tiny(capsys):
    spec = importlib.util.spec_from_file_location("attribution_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| comparison")]
    names = [row.split(" | ")[0] for row in rows]
    expected = ["| attr_patch vs act_patch, heads", "| attr_patch vs act_patch, neurons", "| attr_edges EAP vs",
                "| attr_edges EAP-IG", "| attr_patch vs TransformerLens", "| attr_edges EAP vs TransformerLens",
                *[f"| peak memory, {key}" for key in benchmark.MEMORY_KEYS[1:]]]  # fmt: skip
    assert len(names) == len(expected) and all(name.startswith(start) for name, start in zip(names, expected)), names
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert cells[-1].strip() == "not checked" and "nan" not in row and "inf" not in row, row
    gaps = [float(line.split("largest difference ")[1].split()[0]) for line in lines if "largest difference" in line]
    assert len(gaps) == 2 and max(gaps) < 1e-5, gaps
