"""Write an `Analysis` as a self-contained HTML report, a JSON file and a CSV file, and its circuit
and edge scores in EAP-IG's graph JSON (which MIB's circuit track reads).

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
import warnings
from pathlib import Path

import torch

import transformer_lens_patching as tlp

from ...results import PatchResult
from .analysis import Analysis
from .circuit_step import ESTIMATORS, RANKINGS, CircuitFinding
from .report_page import named_heads, report_html
from .uncertainty import CI_LEVEL, Uncertainty, curve_band, mean_uncertainty

REPORT, JSON, CSV = "report.html", "results.json", "results.csv"
CIRCUIT, EDGE_SCORES = "circuit.json", "edge_scores.json"
"""The circuit step's circuit (with its ranking's scores) and every edge's score, in EAP-IG's graph JSON."""
CSV_DIMS = ("seq_pos", "layer", "head", "kv_head", "neuron")
"""The dim columns of the CSV file (empty where a result has no such dim)."""
EXACT = "exact"
"""The CSV's component suffix for the neuron step's exactly patched cells (e.g. `post exact`)."""
CSV_ERRORS = ("stderr", "ci_low", "ci_high", "p_value", "significant")
"""The CSV's columns after `value`: its error bars, and for a head its test (empty where a value has none)."""


def write_report(analysis: Analysis, out: str | Path) -> dict[str, Path]:
    """Write `report.html`, `results.json` and `results.csv` into the folder `out`, and, once the
    circuit step has run, `circuit.json` and `edge_scores.json` in EAP-IG's graph JSON
    (`eap_ig_circuit` and `eap_ig_scores` read them back; a model whose graph EAP-IG cannot
    express gets a warning instead). An analysis that stopped early (see `Analysis.missing_steps`)
    gets a report of the steps it finished, which says which are missing.

    >>> paths = write_report(run_ioi(model), "ioi-report")  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['csv', 'html', 'json']
    """
    paths = {"html": Path(out) / REPORT, "json": write_json(analysis, out), "csv": Path(out) / CSV}
    paths["html"].write_text(report_html(analysis), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("step", "component", *CSV_DIMS, "value", *CSV_ERRORS))
        writer.writerows(csv_rows(analysis))
    return paths | _write_eap_ig(analysis, Path(out))


def _write_eap_ig(analysis: Analysis, folder: Path) -> dict[str, Path]:
    """The circuit step's circuit and scores as EAP-IG JSON files, where it ran and EAP-IG can express them."""
    step = next((step for step in analysis.steps if step.circuit is not None), None)
    if step is None or analysis.d_model is None:
        return {}
    finding = step.circuit
    scores = finding.scores[finding.chosen]
    try:
        texts = {
            "circuit": (CIRCUIT, tlp.to_eap_ig_json(finding.circuit, d_model=analysis.d_model, scores=scores)),
            "edge_scores": (EDGE_SCORES, tlp.to_eap_ig_json(scores, d_model=analysis.d_model)),
        }
    except tlp.PatchingError as refusal:
        warnings.warn(f"the circuit is not written in EAP-IG's format: {refusal}", stacklevel=2)
        return {}
    for name, text in texts.values():
        (folder / name).write_text(text, encoding="utf-8")
    return {key: folder / name for key, (name, _) in texts.items()}


def write_json(analysis: Analysis, out: str | Path) -> Path:
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


def _circuit_json(finding: CircuitFinding, analysis: Analysis) -> dict:
    """A CircuitFinding as plain JSON values: the curves (with their bands), the estimators' agreement
    with the exact scores, the circuit's edges (with their scores' error bars and inclusion
    frequencies), and the named heads' membership."""
    kept = set(finding.circuit.heads)
    index = list(finding.selection[finding.chosen].fractions).index(finding.size)
    held_out = curve_band(finding.curves[finding.chosen].signed)
    scoring = curve_band(finding.selection[finding.chosen])
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
        "agreement": _agreement_json(finding),
        "target": finding.target,
        "faithfulness": finding.faithfulness,
        "faithfulness_ci": None if held_out is None else [held_out[1][index], held_out[2][index]],
        "chosen_faithfulness": finding.chosen_faithfulness,
        "chosen_faithfulness_ci": None if scoring is None else [scoring[1][index], scoring[2][index]],
        "ci_level": CI_LEVEL,
        "selection": [_curve_json(curve) for curve in finding.selection],
        "size": finding.size,
        "circuit": json.loads(finding.circuit.to_json()),
        "circuit_edges": _circuit_edges_json(finding),
        "stability": None
        if finding.stability is None
        else {
            "method": finding.stability.method,
            "n_resamples": len(finding.stability.jaccard),
            "mean_jaccard": finding.stability.mean_jaccard,
        },
        "named_heads": [
            {"role": role, "layer": head.layer, "head": head.head, "in_circuit": (head.layer, head.head) in kept}
            for role, head in named_heads(analysis)
        ],
    }


def _agreement_json(finding: CircuitFinding) -> dict:
    """Each estimator's Spearman correlation and top-k overlap with the exact scores over the
    candidates (a NaN correlation as null), and each candidate's exact score and estimates."""
    k = finding.overlap_size
    return {
        "top_k": k,
        "estimators": [
            {
                "estimator": name,
                "method": scores.method,
                "spearman": None if math.isnan(confirmation.spearman) else confirmation.spearman,
                "top_k_overlap": confirmation.overlap(k),
            }
            for name, scores, confirmation in zip(ESTIMATORS, finding.scores, finding.agreement)
        ],
        "edges": [
            {
                "edge": str(edge),
                "exact": float(finding.scores[-1].score(edge)),
                "estimates": {name: float(scores.score(edge)) for name, scores in zip(ESTIMATORS, finding.scores)},
            }
            for edge in finding.candidate_edges
        ],
    }


def _circuit_edges_json(finding: CircuitFinding) -> list[dict]:
    """Each edge of the circuit: its score (by the chosen ranking), the score's standard error
    and interval, and how often the resampled circuits hold it."""
    scores = finding.scores[finding.chosen]
    graph = finding.circuit.graph
    errors = finding.edge_errors
    inclusion = None if finding.stability is None else finding.stability.inclusion
    return [
        {
            "edge": str(edge),
            "score": float(scores.score(edge)),
            **(
                {}
                if errors is None
                else {"stderr": float(errors[0][i]), "ci_low": float(errors[1][i]), "ci_high": float(errors[2][i])}
            ),
            "inclusion": None if inclusion is None else float(inclusion[graph.index(edge)]),
        }
        for i, edge in enumerate(finding.circuit.edges)
    ]


def _curve_json(curve: tlp.FaithfulnessCurve) -> dict:
    """One faithfulness curve as plain JSON values, with its band where it has one."""
    band = curve_band(curve)
    return {
        "fractions": list(curve.fractions),
        "edges": list(curve.edge_counts),
        "metric": list(curve.values),
        "faithfulness": list(curve.faithfulness),
        **(
            {}
            if band is None
            else {
                "faithfulness_stderr": list(band[0]),
                "faithfulness_ci_low": list(band[1]),
                "faithfulness_ci_high": list(band[2]),
            }
        ),
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
                "top_k_frequency": c.top_k_frequency,
            }
            for c in confirmation.cells
        ],
    }


def as_json(analysis: Analysis) -> dict:
    """Everything measured, as plain JSON values."""
    prompts = analysis.prompts
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
        "clean_accuracy": analysis.clean_accuracy,
        "corrupted_accuracy": analysis.corrupted_accuracy,
        "task": prompts.task,
        "prompts": [
            {"clean": clean, "corrupted": corrupted, prompts.answer_key: answer, prompts.wrong_key: wrong}
            for clean, corrupted, answer, wrong in zip(
                prompts.clean_texts, prompts.corrupted_texts, prompts.answer_texts, prompts.wrong_texts
            )
        ],
        "steps": [
            {
                "key": step.key,
                "title": step.title,
                "description": step.description,
                "seconds": step.seconds,
                "top": {name: [vars(head) for head in heads] for name, heads in step.top.items()},
                "not_significant": step.not_significant,
                "results": {name: _result_json(r, step.uncertainty.get(name)) for name, r in step.results.items()},
                **({"confirmation": _confirmation_json(step.confirmation)} if step.confirmation is not None else {}),
                **({"circuit": _circuit_json(step.circuit, analysis)} if step.circuit is not None else {}),
            }
            for step in analysis.steps
        ],
    }


def _result_json(result: PatchResult, error: Uncertainty | None) -> dict:
    """A result's dims, coordinates and values, and where it has them its error bars, each of the
    values' shape (and for a result of heads, each head's p-value and significance)."""
    return {
        "dims": list(result.dims),
        "coords": {d: list(c) for d, c in result.coords.items()},
        "values": result.tolist(),
        **({} if error is None else _errors_json(error)),
    }


def _errors_json(error: Uncertainty) -> dict:
    """An `Uncertainty` as plain JSON values (None where it has no such values)."""
    tests = (
        {} if error.p_values is None else {"p_values": _plain(error.p_values), "significant": _plain(error.significant)}
    )
    return {
        "n_prompts": error.n_prompts,
        "ci_level": CI_LEVEL,
        "ci_method": error.ci_method,
        "stderr": _plain(error.stderr),
        "ci_low": _plain(error.ci_low),
        "ci_high": _plain(error.ci_high),
        **tests,
    }


def _plain(values: torch.Tensor | None):
    """A tensor as nested lists (a 0-d one as a number; NaN as null), or None."""
    if values is None:
        return None
    plain = values.tolist()
    if values.dtype == torch.bool:
        return plain
    return _no_nan(plain)


def _no_nan(value):
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _values(per_prompt) -> dict:
    """The logit differences: their mean with its error bars, and each prompt's."""
    return {
        "mean": float(per_prompt.mean()),
        **_errors_json(mean_uncertainty(per_prompt)),
        "per_prompt": per_prompt.tolist(),
    }


def csv_rows(analysis: Analysis):
    """One row per result cell: step, component, the dims' coordinates, value, and its
    `CSV_ERRORS` (empty where it has none); then for the neuron step one row per exactly
    patched neuron (component `post exact`)."""
    for step in analysis.steps:
        for name, result in step.results.items():
            values = result.as_tensor()
            error = step.uncertainty.get(name)
            columns = (
                [] if error is None else [error.stderr, error.ci_low, error.ci_high, error.p_values, error.significant]
            )
            for index in itertools.product(*(range(size) for size in values.shape)):
                coords = {dim: result.coords[dim][i] for dim, i in zip(result.dims, index)}
                errors = [_cell(column, index) for column in columns] or [""] * len(CSV_ERRORS)
                yield (step.key, name, *(coords.get(dim, "") for dim in CSV_DIMS), float(values[index]), *errors)
        for cell in step.confirmation.cells if step.confirmation is not None else ():
            coords = (cell.coords.get(dim, "") for dim in CSV_DIMS)
            yield (step.key, f"{cell.component} {EXACT}", *coords, cell.exact, *[""] * len(CSV_ERRORS))


def _cell(column: torch.Tensor | None, index: tuple[int, ...]):
    """One cell of an error-bar column for the CSV ("" where the column is missing)."""
    return "" if column is None else column[index].item()
