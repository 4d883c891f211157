"""The report as one self-contained HTML page: a summary, the prompts, then a section per step.

Built from `_section` (a heading and its body) and `_table` (a header row and rows of cells);
the cells and bodies are HTML already, every text from the analysis escaped where it is put in.
"""

from __future__ import annotations

import datetime
import html
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import transformer_lens_patching as tlp

from .analysis import IOIAnalysis
from .circuit_step import RANKINGS, CircuitFinding
from .figures import logit_diff_figure, step_figure
from .records import Step, TopHead

if TYPE_CHECKING:
    import plotly.graph_objects as go

PATH_STEPS = ("path_logits", "path_queries", "path_values")
"""The path-patching steps whose heads the circuit section looks up in the circuit."""
SHOWN_EDGES = 40
"""The circuit's strongest edges drawn and listed in the report (results.json has them all)."""
PROMPTS_SHOWN = 5
"""The prompts the report lists (results.json has them all)."""

_PAGE = string.Template(
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>$title</title>"
    "<script>$plotly</script><style>$style</style></head>"
    "<body><h1>$title</h1>$missing$sections</body></html>"
)
_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    ".figure{margin:1em 0}.missing{background:#fde0dd;border:1px solid #c51b8a;padding:.5em 1em}"
    "mark{background:#fee391;font-weight:bold}"
)


def report_html(analysis: IOIAnalysis) -> str:
    """The report as one HTML page with plotly.js inside (no network needed to view it)."""
    from plotly.offline import get_plotlyjs

    sections = [_summary(analysis), _figure(logit_diff_figure(analysis), "logit-diff"), _prompts(analysis)]
    sections += [_step_section(step, analysis) for step in analysis.steps]
    return _PAGE.substitute(
        title=f"IOI circuit analysis: {html.escape(analysis.model_name)}",
        plotly=get_plotlyjs(),
        style=_STYLE,
        missing=_missing(analysis),
        sections="".join(sections),
    )


def named_heads(analysis: IOIAnalysis) -> list[tuple[str, TopHead]]:
    """(role, head) of every head the path-patching steps named."""
    return [
        (role, head)
        for step in analysis.steps
        if step.key in PATH_STEPS
        for role, heads in step.top.items()
        for head in heads
    ]


def _section(title: str, body: str, *, level: int = 2, section_id: str = "") -> str:
    """A heading (with `section_id`, if given) and the HTML that follows it."""
    anchor = f' id="{section_id}"' if section_id else ""
    return f"<h{level}{anchor}>{html.escape(title)}</h{level}>{body}"


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], *, table_id: str = "") -> str:
    """A table: a header row of `head`, then one row per item of `rows` (cells in HTML)."""
    anchor = f' id="{table_id}"' if table_id else ""
    header = "".join(f"<th>{cell}</th>" for cell in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table{anchor}><tr>{header}</tr>{body}</table>"


def _names_table(values: Mapping[str, object], *, table_id: str = "") -> str:
    """A table of one row per name: the name, then its value (both escaped)."""
    anchor = f' id="{table_id}"' if table_id else ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return f"<table{anchor}>{rows}</table>"


def _figure(figure: go.Figure, key: str) -> str:
    return f'<div class="figure">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{key}")}</div>'


def _missing(analysis: IOIAnalysis) -> str:
    if not analysis.missing_steps:
        return ""
    return (
        f'<p class="missing" id="missing-steps">This run stopped early: the steps {", ".join(analysis.missing_steps)} '
        "did not run, and their results are missing. Everything below was finished.</p>"
    )


def _summary(analysis: IOIAnalysis) -> str:
    """The model, the run, the mean logit differences, the heads found, the settings and versions."""
    clean, corrupted = float(analysis.clean_logit_diff.mean()), float(analysis.corrupted_logit_diff.mean())
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    source = f"<p>Weights: {html.escape(analysis.model_source)}</p>" if analysis.model_source else ""
    found = "".join(
        f"<li>{html.escape(step.title)}: {html.escape(name)}: {html.escape(', '.join(map(str, heads)) or 'none')}</li>"
        for step in analysis.steps
        for name, heads in step.top.items()
    )
    threshold, top_k = analysis.settings.min_effect, analysis.settings.top_k
    heads_found = (
        f"<p>At most {top_k} heads per role, each with an effect of at least {threshold:.0%} of the clean - "
        "corrupted logit difference in size (--min-effect); only those are carried into the next step.</p>"
        f"<ul>{found}</ul>"
    )
    return (
        f"<p>Model <b>{html.escape(analysis.model_name)}</b>, {analysis.dataset.N} prompts; "
        f"run in {analysis.seconds:.0f} s on {when}.</p>{source}"
        f"<p>Mean logit difference (IO - S at the end): clean <b>{clean:.3f}</b>, corrupted <b>{corrupted:.3f}</b>.</p>"
        + _section("Heads found", heads_found)
        + _section("Settings", _names_table(vars(analysis.settings)))
        + _section("Versions", _names_table(analysis.versions, table_id="versions"))
    )


def _marked_answer(sentence: str, answer: str) -> str:
    """The sentence, its final word (the answer, which the model is not shown) marked."""
    if not sentence.endswith(" " + answer):
        return html.escape(sentence)
    return f"{html.escape(sentence[: -len(answer)])}<mark>{html.escape(answer)}</mark>"


def _prompts(analysis: IOIAnalysis) -> str:
    """The first prompts, clean and corrupted, each with its answer marked."""
    pairs = zip(analysis.dataset.sentences, analysis.corrupted.sentences, analysis.dataset.prompts)
    rows = [
        (_marked_answer(clean, prompt.io), _marked_answer(corrupted, prompt.io))
        for clean, corrupted, prompt in list(pairs)[:PROMPTS_SHOWN]
    ]
    explanation = (
        "<p>Marked: the answer, the indirect object (IO). The model reads each prompt up to the word before it, "
        "and the logit difference is the logit of IO minus that of the subject (S) there.</p>"
    )
    return _section(f"Prompts (first {PROMPTS_SHOWN})", explanation + _table(("clean", "corrupted"), rows))


def _step_section(step: Step, analysis: IOIAnalysis) -> str:
    """A step's description and time, the heads it found, and what it computed."""
    timed = f" ({step.seconds:.0f} s)" if step.results or step.circuit else ""
    body = (
        f"<p>{html.escape(step.description)}{timed}</p>"
        + _top_table(step)
        + (_confirmation_section(step.confirmation, analysis) if step.confirmation is not None else "")
        + (_figure(step_figure(step), step.key) if step.results else "")
        + (_circuit_section(step.circuit, analysis) if step.circuit is not None else "")
    )
    return _section(step.title, body, section_id=step.key)


def _top_table(step: Step) -> str:
    if not step.top:
        return ""
    rows = [
        (html.escape(role), f"{head.layer}.{head.head}", f"{head.value:+.1%}")
        for role, heads in step.top.items()
        for head in heads
    ]
    return _table(("role", "head", "effect"), rows)


def _confirmation_section(confirmation: tlp.Confirmation, analysis: IOIAnalysis) -> str:
    """The confirmed neurons' table, how well the estimate ranked them, and the strongest head for scale."""
    rows = [
        (cell.coords["layer"], cell.coords["neuron"], f"{cell.estimated_change:+.1%}", f"{cell.exact_change:+.1%}")
        for cell in confirmation.cells
    ]
    n = confirmation.overlap_size
    heads = next((step for step in analysis.steps if step.key == "act_heads" and step.results), None)
    scale = "" if heads is None else _strongest_head(heads.results["z"])
    return (
        f"<p>The {len(confirmation.cells)} of {confirmation.screened} neurons with the largest estimated effect, "
        "each patched exactly. Rank correlation (Spearman) of estimated and exact effect over them: "
        f"<b>{_number(confirmation.spearman)}</b>; of the estimate's {n} strongest, "
        f"<b>{confirmation.top_k_overlap}</b> are among the {n} strongest exactly.{scale}</p>"
        + _table(("layer", "neuron", "estimated effect", "exact effect"), rows, table_id="confirmed-neurons")
    )


def _strongest_head(z: tlp.PatchResult) -> str:
    """' For scale, the strongest head's output (z, exact) restores +40.0% (head 3.1).'"""
    strongest = int(z.as_tensor().abs().argmax())
    layer, head = z.coords["layer"][strongest // z.shape[1]], z.coords["head"][strongest % z.shape[1]]
    return (
        f" For scale, the strongest head's output (z, exact) restores {float(z.sel(layer=layer, head=head)):+.1%}"
        f" (head {layer}.{head})."
    )


def _number(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def _shown(finding: CircuitFinding) -> tlp.Circuit:
    """The circuit's `SHOWN_EDGES` strongest edges by the scores that chose them."""
    scores = finding.scores[finding.chosen]
    strongest = [edge for edge in scores.top(len(scores.graph)) if edge in finding.circuit][:SHOWN_EDGES]
    return tlp.Circuit(finding.circuit.graph, strongest)


def _circuit_section(finding: CircuitFinding, analysis: IOIAnalysis) -> str:
    """The curves and their areas, the circuit (figure and strongest edges), and which named heads it holds."""
    return (
        _section("Faithfulness", _faithfulness(finding), level=3)
        + _section("The circuit", _circuit(finding), level=3)
        + _section("Heads named by path patching", _named_heads(finding, analysis), level=3)
    )


def _faithfulness(finding: CircuitFinding) -> str:
    """Each ranking's two curves on the held-out prompts, as a table and a figure."""
    from ... import plots

    sizes = [f"{f:g}" for f in finding.curves[0].signed.fractions]
    rows = [
        (html.escape(method), html.escape(curve.ranking), summary, *(f"{f:.3f}" for f in curve.faithfulness))
        for method, mib in zip(RANKINGS, finding.curves)
        for curve, summary in ((mib.signed, f"CPR {mib.cpr:.3f}"), (mib.absolute, f"CMD {mib.cmd:.3f}"))
    ]
    curves = plots.faithfulness_curves(
        list(finding.curves), title="Faithfulness of each ranking's circuits, on the held-out prompts"
    )
    return (
        f"<p>Edges scored on {len(finding.scored_on)} of the prompts; every faithfulness in this table and figure "
        f"is measured on the other {len(finding.held_out)}, held out, as MIB does. MIB's CPR is the area under the "
        "curve of the edges ranked by signed score (higher is better), its CMD the area between 1 and the curve of "
        "the edges ranked by |score| (lower is better); the columns are MIB's circuit sizes, as fractions of the "
        "edges.</p>"
        + _table(("scores", "edges ranked by", "MIB summary", *sizes), rows, table_id="faithfulness")
        + _figure(curves, "faithfulness")
    )


def _circuit(finding: CircuitFinding) -> str:
    """The circuit's size and faithfulness, and its strongest edges as a graph and a table."""
    from ... import plots

    shown = _shown(finding)
    scores = finding.scores[finding.chosen]
    edges = [
        (html.escape(str(edge.sender)), html.escape(str(edge.receiver)), f"{float(scores.score(edge)):+.4f}")
        for edge in sorted(shown, key=lambda edge: -abs(float(scores.score(edge))))
    ]
    graph = plots.circuit_graph(
        shown,
        scores,
        title=f"The circuit's {len(shown)} strongest of {len(finding.circuit):,} edges ({finding.method} scores)",
    )
    return (
        f"<p>{len(finding.circuit):,} of {len(finding.circuit.graph):,} edges from the "
        f"{html.escape(finding.method)} ranking by signed score, chosen on the scoring prompts (faithfulness "
        f"{finding.chosen_faithfulness:.3f} there); faithfulness <b>{finding.faithfulness:.3f}</b> on the held-out "
        f"prompts; its {len(shown)} strongest edges:</p>"
        + _figure(graph, "circuit-graph")
        + _table(("sender", "receiver", "score"), edges, table_id="circuit-edges")
    )


def _named_heads(finding: CircuitFinding, analysis: IOIAnalysis) -> str:
    """Whether each head the path-patching steps named writes into the circuit."""
    kept = set(finding.circuit.heads)
    rows = [
        (html.escape(role), f"{head.layer}.{head.head}", "yes" if (head.layer, head.head) in kept else "no")
        for role, head in named_heads(analysis)
    ]
    return (
        "<p>Whether each head the path-patching steps named writes into the circuit (its output is the sender of "
        "an edge in it).</p>" + _table(("role", "head", "in the circuit"), rows, table_id="named-heads")
    )
