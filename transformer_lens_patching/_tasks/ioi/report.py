"""Write an `IOIAnalysis` as a self-contained HTML report, a JSON file and a CSV file.

The HTML report needs plotly (`pip install 'transformer_lens_patching[plot]'`), imported
when a report is written.
"""

import csv
import datetime
import html
import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..._core.circuit import Circuit
from ..._methods.confirmation import Confirmation
from ..._methods.faithfulness import FaithfulnessCurve
from .analysis import IOIAnalysis, Step
from .circuit_step import METHODS, CircuitFinding

if TYPE_CHECKING:
    import plotly.graph_objects as go

REPORT, JSON, CSV = "report.html", "results.json", "results.csv"
PATH_STEPS = ("path_logits", "path_queries", "path_values")
"""The path-patching steps whose heads the circuit section looks up in the circuit."""
SHOWN_EDGES = 40
"""The circuit's strongest edges drawn and listed in the report (results.json has them all)."""
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


def step_figure(step: Step) -> "go.Figure":
    """The heatmap of a step's results, one panel per component; for the neuron step, its
    confirmed neurons' estimated against exact effect."""
    from ... import plots

    if step.confirmation is not None:
        labels = [_neuron(cell.coords) for cell in step.confirmation.cells]
        return plots.estimate_vs_exact(step.confirmation, percent=True, value_label="effect", labels=labels)
    results = step.results if len(step.results) > 1 else next(iter(step.results.values()))
    return plots.heatmap(results, percent=True, value_label="effect", title=step.title)


def logit_diff_figure(analysis: IOIAnalysis) -> "go.Figure":
    """Each prompt's clean and corrupted logit difference, side by side on one row per prompt
    (a line joins the two), the prompt's text on hover."""
    import plotly.graph_objects as go

    clean, corrupted = analysis.clean_logit_diff.tolist(), analysis.corrupted_logit_diff.tolist()
    rows = [f"prompt {i}" for i in range(len(clean))]
    fig = go.Figure()
    joins_x = [value for pair in zip(corrupted, clean, itertools.repeat(None)) for value in pair]
    joins_y = [row for row in rows for _ in range(3)]
    fig.add_trace(
        go.Scatter(x=joins_x, y=joins_y, mode="lines", line={"color": "#bbb"}, hoverinfo="skip", showlegend=False)
    )
    for name, values, prompts, colour in (
        ("clean", clean, analysis.dataset, "#2166ac"),
        ("corrupted", corrupted, analysis.corrupted, "#b2182b"),
    ):
        texts = [html.escape(sentence) for sentence in prompts.sentences]
        fig.add_trace(
            go.Scatter(
                x=values,
                y=rows,
                mode="markers",
                name=name,
                marker={"color": colour, "size": 9},
                customdata=texts,
                hovertemplate=f"%{{y}}, {name}: %{{x:.3f}}<br>%{{customdata}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Logit difference (IO - S) per prompt, clean and corrupted",
        height=160 + 22 * len(rows),
        legend={"orientation": "h", "y": -0.15},
    )
    fig.update_xaxes(title_text="logit diff", zeroline=True)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def report_html(analysis: IOIAnalysis) -> str:
    """The report as one HTML page with plotly.js inside (no network needed to view it)."""
    from plotly.offline import get_plotlyjs

    sections = [_summary(analysis), _figure(logit_diff_figure(analysis), "logit-diff"), _prompts(analysis)]
    for step in analysis.steps:
        sections.append(
            f'<h2 id="{step.key}">{html.escape(step.title)}</h2>'
            f"<p>{html.escape(step.description)}"
            + (f" ({step.seconds:.0f} s)</p>" if step.results or step.circuit else "</p>")
            + _top_table(step)
            + (_confirmation_section(step.confirmation, analysis) if step.confirmation is not None else "")
            + (_figure(step_figure(step), step.key) if step.results else "")
            + (_circuit_section(step.circuit, analysis) if step.circuit is not None else "")
        )
    title = f"IOI circuit analysis: {html.escape(analysis.model_name)}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<script>{get_plotlyjs()}</script><style>{_STYLE}</style></head>"
        f"<body><h1>{title}</h1>{_missing(analysis)}{''.join(sections)}</body></html>"
    )


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    ".figure{margin:1em 0}.missing{background:#fde0dd;border:1px solid #c51b8a;padding:.5em 1em}"
    "mark{background:#fee391;font-weight:bold}"
)


def _figure(figure: "go.Figure", key: str) -> str:
    return f'<div class="figure">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{key}")}</div>'


def _missing(analysis: IOIAnalysis) -> str:
    if not analysis.missing_steps:
        return ""
    return (
        f'<p class="missing" id="missing-steps">This run stopped early: the steps {", ".join(analysis.missing_steps)} '
        "did not run, and their results are missing. Everything below was finished.</p>"
    )


def _summary(analysis: IOIAnalysis) -> str:
    settings = vars(analysis.settings)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    versions = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in analysis.versions.items()
    )
    clean, corrupted = float(analysis.clean_logit_diff.mean()), float(analysis.corrupted_logit_diff.mean())
    found = "".join(
        f"<li>{html.escape(step.title)}: {html.escape(name)}: {html.escape(', '.join(map(str, heads)) or 'none')}</li>"
        for step in analysis.steps
        for name, heads in step.top.items()
    )
    threshold, top_k = analysis.settings.min_effect, analysis.settings.top_k
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    source = f"<p>Weights: {html.escape(analysis.model_source)}</p>" if analysis.model_source else ""
    return (
        f"<p>Model <b>{html.escape(analysis.model_name)}</b>, {analysis.dataset.N} prompts; "
        f"run in {analysis.seconds:.0f} s on {when}.</p>{source}"
        f"<p>Mean logit difference (IO - S at the end): clean <b>{clean:.3f}</b>, corrupted <b>{corrupted:.3f}</b>.</p>"
        f"<h2>Heads found</h2><p>At most {top_k} heads per role, each with an effect of at least {threshold:.0%} "
        "of the clean - corrupted logit difference in size (--min-effect); only those are carried into the next "
        f"step.</p><ul>{found}</ul><h2>Settings</h2><table>{rows}</table>"
        f'<h2>Versions</h2><table id="versions">{versions}</table>'
    )


def _marked_answer(sentence: str, answer: str) -> str:
    """The sentence, its final word (the answer, which the model is not shown) marked."""
    if not sentence.endswith(" " + answer):
        return html.escape(sentence)
    return f"{html.escape(sentence[: -len(answer)])}<mark>{html.escape(answer)}</mark>"


def _prompts(analysis: IOIAnalysis, count: int = 5) -> str:
    rows = "".join(
        f"<tr><td>{_marked_answer(clean, prompt.io)}</td><td>{_marked_answer(corrupted, prompt.io)}</td></tr>"
        for clean, corrupted, prompt in zip(
            analysis.dataset.sentences[:count], analysis.corrupted.sentences[:count], analysis.dataset.prompts
        )
    )
    return (
        f"<h2>Prompts (first {count})</h2><p>Marked: the answer, the indirect object (IO). The model reads each "
        "prompt up to the word before it, and the logit difference is the logit of IO minus that of the subject "
        "(S) there.</p>"
        f"<table><tr><th>clean</th><th>corrupted</th></tr>{rows}</table>"
    )


def _top_table(step: Step) -> str:
    if not step.top:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{head.layer}.{head.head}</td><td>{head.value:+.1%}</td></tr>"
        for name, heads in step.top.items()
        for head in heads
    )
    return f"<table><tr><th>role</th><th>head</th><th>effect</th></tr>{rows}</table>"


def _neuron(coords: dict[str, int]) -> str:
    """'L12 N345'."""
    return f"L{coords['layer']} N{coords['neuron']}"


def _confirmation_section(confirmation: Confirmation, analysis: IOIAnalysis) -> str:
    """The confirmed neurons' table, how well the estimate ranked them, and the strongest head for scale."""
    rows = "".join(
        f"<tr><td>{cell.coords['layer']}</td><td>{cell.coords['neuron']}</td><td>{cell.estimated_change:+.1%}</td>"
        f"<td>{cell.exact_change:+.1%}</td></tr>"
        for cell in confirmation.cells
    )
    n = confirmation.overlap_size
    scale = ""
    heads = next((step for step in analysis.steps if step.key == "act_heads" and step.results), None)
    if heads is not None:
        z = heads.results["z"]
        strongest = int(z.as_tensor().abs().argmax())
        layer, head = z.coords["layer"][strongest // z.shape[1]], z.coords["head"][strongest % z.shape[1]]
        scale = (
            f" For scale, the strongest head's output (z, exact) restores {float(z.sel(layer=layer, head=head)):+.1%}"
            f" (head {layer}.{head})."
        )
    return (
        f"<p>The {len(confirmation.cells)} of {confirmation.screened} neurons with the largest estimated effect, "
        "each patched exactly. Rank correlation (Spearman) of estimated and exact effect over them: "
        f"<b>{_number(confirmation.spearman)}</b>; of the estimate's "
        f"{n} strongest, <b>{confirmation.top_k_overlap}</b> "
        f"are among the {n} strongest exactly.{scale}</p>"
        '<table id="confirmed-neurons"><tr><th>layer</th><th>neuron</th><th>estimated effect</th>'
        f"<th>exact effect</th></tr>{rows}</table>"
    )


def _shown(finding: CircuitFinding) -> Circuit:
    """The circuit's `SHOWN_EDGES` strongest edges by the scores that chose them."""
    scores = finding.scores[finding.chosen]
    strongest = [edge for edge in scores.top(len(scores.graph)) if edge in finding.circuit][:SHOWN_EDGES]
    return Circuit(finding.circuit.graph, strongest)


def named_heads(analysis: IOIAnalysis) -> list[tuple[str, object]]:
    """(role, head) of every head the path-patching steps named."""
    return [
        (role, head)
        for step in analysis.steps
        if step.key in PATH_STEPS
        for role, heads in step.top.items()
        for head in heads
    ]


def _circuit_section(finding: CircuitFinding, analysis: IOIAnalysis) -> str:
    """The curves and their areas, the circuit (figure and strongest edges), and which named heads it holds."""
    from ... import plots

    sizes = finding.curves[0].signed.fractions
    header = "".join(f"<th>{f:g}</th>" for f in sizes)
    rows = "".join(
        f"<tr><td>{html.escape(method)}</td><td>{html.escape(curve.ranking)}</td><td>{summary}</td>"
        + "".join(f"<td>{f:.3f}</td>" for f in curve.faithfulness)
        + "</tr>"
        for method, mib in zip(METHODS, finding.curves)
        for curve, summary in ((mib.signed, f"CPR {mib.cpr:.3f}"), (mib.absolute, f"CMD {mib.cmd:.3f}"))
    )
    shown = _shown(finding)
    scores = finding.scores[finding.chosen]
    edges = "".join(
        f"<tr><td>{html.escape(str(edge.sender))}</td><td>{html.escape(str(edge.receiver))}</td>"
        f"<td>{float(scores.score(edge)):+.4f}</td></tr>"
        for edge in sorted(shown, key=lambda edge: -abs(float(scores.score(edge))))
    )
    kept = set(finding.circuit.heads)
    heads = "".join(
        f"<tr><td>{html.escape(role)}</td><td>{head.layer}.{head.head}</td>"
        f"<td>{'yes' if (head.layer, head.head) in kept else 'no'}</td></tr>"
        for role, head in named_heads(analysis)
    )
    curves = plots.faithfulness_curves(
        list(finding.curves), title="Faithfulness of each ranking's circuits, on the held-out prompts"
    )
    graph = plots.circuit_graph(
        shown,
        scores,
        title=f"The circuit's {len(shown)} strongest of {len(finding.circuit):,} edges ({finding.method} scores)",
    )
    return (
        f"<h3>Faithfulness</h3><p>Edges scored on {len(finding.scored_on)} of the prompts; every faithfulness "
        f"in this table and figure is measured on the other {len(finding.held_out)}, held out, as MIB does. MIB's "
        "CPR is the area under the curve of the edges ranked by signed "
        "score (higher is better), its CMD the area between 1 and "
        "the curve of the edges ranked by |score| (lower is better); the columns are MIB's circuit sizes, as "
        'fractions of the edges.</p><table id="faithfulness"><tr><th>scores</th><th>edges ranked by</th>'
        f"<th>MIB summary</th>{header}</tr>{rows}</table>"
        + _figure(curves, "faithfulness")
        + f"<h3>The circuit</h3><p>{len(finding.circuit):,} of {len(finding.circuit.graph):,} edges from the "
        f"{html.escape(finding.method)} ranking by signed score, chosen on the scoring prompts (faithfulness "
        f"{finding.chosen_faithfulness:.3f} there); faithfulness <b>{finding.faithfulness:.3f}</b> on the held-out "
        "prompts; its "
        f"{len(shown)} strongest edges:</p>"
        + _figure(graph, "circuit-graph")
        + f'<table id="circuit-edges"><tr><th>sender</th><th>receiver</th><th>score</th></tr>{edges}</table>'
        + "<h3>Heads named by path patching</h3><p>Whether each head the path-patching steps named writes into "
        "the circuit (its output is the sender of an edge in it).</p>"
        + f'<table id="named-heads"><tr><th>role</th><th>head</th><th>in the circuit</th></tr>{heads}</table>'
    )


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
            for method, mib in zip(METHODS, finding.curves)
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


def _curve_json(curve: FaithfulnessCurve) -> dict:
    """One faithfulness curve as plain JSON values."""
    return {
        "fractions": list(curve.fractions),
        "edges": list(curve.edge_counts),
        "metric": list(curve.values),
        "faithfulness": list(curve.faithfulness),
        "full": curve.full,
        "empty": curve.empty,
    }


def _number(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def _confirmation_json(confirmation: Confirmation) -> dict:
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
