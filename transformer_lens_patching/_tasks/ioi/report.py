"""Write an `IOIAnalysis` as a self-contained HTML report, a JSON file and a CSV file.

The HTML page (`report_page`) needs plotly (`pip install 'transformer_lens_patching[plot]'`),
imported when a report is written.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import tempfile
from pathlib import Path

import transformer_lens_patching as tlp

from .analysis import IOIAnalysis
from .circuit_step import RANKINGS, CircuitFinding
from .report_page import named_heads, report_html

REPORT, JSON, CSV = "report.html", "results.json", "results.csv"
CSV_DIMS = ("seq_pos", "layer", "head", "kv_head", "neuron")
"""The dim columns of the CSV file (empty where a result has no such dim)."""
EXACT = "exact"
"""The CSV's component suffix for the neuron step's exactly patched cells (e.g. `post exact`)."""


def write_report(analysis: IOIAnalysis, out: str | Path) -> dict[str, Path]:
    """Write `report.html`, `results.json` and `results.csv` into the folder `out`. An
    analysis that stopped early (see `IOIAnalysis.missing_steps`) gets a report of the steps
    it finished, which says which are missing.

    >>> paths = write_report(run_ioi(model), "ioi-report")  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['csv', 'html', 'json']
    """
    paths = {"html": Path(out) / REPORT, "json": write_json(analysis, out), "csv": Path(out) / CSV}
    paths["html"].write_text(report_html(analysis), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("step", "component", *CSV_DIMS, "value"))
        writer.writerows(csv_rows(analysis))
    return paths


def write_json(analysis: IOIAnalysis, out: str | Path) -> Path:
    """Write `results.json` alone into the folder `out` (e.g. after each step); returns its path.

    It is written to a temporary file first and then renamed, so an interruption never
    leaves half a file; it gets the permissions of any new file (as report.html and
    results.csv do), not the temporary file's owner-only ones.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=folder, prefix=f".{JSON}.", suffix=".partial", delete=False, encoding="utf-8"
    ) as partial:
        json.dump(as_json(analysis), partial, indent=1)
    os.chmod(partial.name, _new_file_mode())
    Path(partial.name).replace(folder / JSON)
    return folder / JSON


def _new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the process's umask (read from
    /proc where Linux has it, since setting the umask to read it races with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _circuit_json(finding: CircuitFinding, analysis: IOIAnalysis) -> dict:
    """A CircuitFinding as plain JSON values: the curves, the circuit's edges and the named heads' membership."""
    kept = set(finding.circuit.heads)
    return {
        "curves": [
            {
                "ranking": method,
                "method": mib.signed.method,
                "cpr": mib.cpr,
                "cmd": mib.cmd,
                "signed": _curve_json(mib.signed),
                "absolute": _curve_json(mib.absolute),
            }
            for method, mib in zip(RANKINGS, finding.curves)
        ],
        "scored_on": list(finding.scored_on),
        "held_out": list(finding.held_out),
        "ranking": finding.method,
        "candidates": finding.candidates,
        "target": finding.target,
        "faithfulness": finding.faithfulness,
        "chosen_faithfulness": finding.chosen_faithfulness,
        "selection": [_curve_json(curve) for curve in finding.selection],
        "circuit": json.loads(finding.circuit.to_json()),
        "named_heads": [
            {"role": role, "layer": head.layer, "head": head.head, "in_circuit": (head.layer, head.head) in kept}
            for role, head in named_heads(analysis)
        ],
    }


def _curve_json(curve: tlp.FaithfulnessCurve) -> dict:
    """One faithfulness curve as plain JSON values."""
    return {
        "fractions": list(curve.fractions),
        "edges": list(curve.edge_counts),
        "metric": list(curve.values),
        "faithfulness": list(curve.faithfulness),
        "full": curve.full,
        "empty": curve.empty,
    }


def _confirmation_json(confirmation: tlp.Confirmation) -> dict:
    """A Confirmation as plain JSON values (a NaN correlation as null)."""
    return {
        "screened": confirmation.screened,
        "unpatched": confirmation.unpatched,
        "spearman": None if math.isnan(confirmation.spearman) else confirmation.spearman,
        "overlap_size": confirmation.overlap_size,
        "top_k_overlap": confirmation.top_k_overlap,
        "cells": [
            {
                "component": c.component,
                "coords": c.coords,
                "estimate": c.estimate,
                "exact": c.exact,
                "estimated_change": c.estimated_change,
                "exact_change": c.exact_change,
            }
            for c in confirmation.cells
        ],
    }


def as_json(analysis: IOIAnalysis) -> dict:
    """Everything measured, as plain JSON values."""
    return {
        "model": analysis.model_name,
        "model_source": analysis.model_source,
        "versions": analysis.versions,
        "settings": vars(analysis.settings),
        "complete": not analysis.missing_steps,
        "missing_steps": analysis.missing_steps,
        "seconds": analysis.seconds,
        "estimated_seconds": analysis.estimated_seconds,
        "clean_logit_diff": _values(analysis.clean_logit_diff),
        "corrupted_logit_diff": _values(analysis.corrupted_logit_diff),
        "prompts": [
            {"clean": clean, "corrupted": corrupted, "io": p.io, "s": p.s}
            for clean, corrupted, p in zip(
                analysis.dataset.sentences, analysis.corrupted.sentences, analysis.dataset.prompts
            )
        ],
        "steps": [
            {
                "key": step.key,
                "title": step.title,
                "description": step.description,
                "seconds": step.seconds,
                "top": {name: [vars(head) for head in heads] for name, heads in step.top.items()},
                "results": {
                    name: {
                        "dims": list(r.dims),
                        "coords": {d: list(c) for d, c in r.coords.items()},
                        "values": r.tolist(),
                    }
                    for name, r in step.results.items()
                },
                **({"confirmation": _confirmation_json(step.confirmation)} if step.confirmation is not None else {}),
                **({"circuit": _circuit_json(step.circuit, analysis)} if step.circuit is not None else {}),
            }
            for step in analysis.steps
        ],
    }


def _values(per_prompt) -> dict:
    return {"mean": float(per_prompt.mean()), "per_prompt": per_prompt.tolist()}


def csv_rows(analysis: IOIAnalysis):
    """One row per result cell: step, component, the dims' coordinates, value; then for the
    neuron step one row per exactly patched neuron (component `post exact`)."""
    for step in analysis.steps:
        for name, result in step.results.items():
            values = result.as_tensor()
            for index in itertools.product(*(range(size) for size in values.shape)):
                coords = {dim: result.coords[dim][i] for dim, i in zip(result.dims, index)}
                yield (step.key, name, *(coords.get(dim, "") for dim in CSV_DIMS), float(values[index]))
        for cell in step.confirmation.cells if step.confirmation is not None else ():
            yield (step.key, f"{cell.component} {EXACT}", *(cell.coords.get(dim, "") for dim in CSV_DIMS), cell.exact)
