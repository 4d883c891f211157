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

from .analysis import Analysis
from .circuit_step import ESTIMATORS, RANKINGS, CircuitFinding
from .figures import DRAWN_EDGES, circuit_figure, faithfulness_figure, logit_diff_figure, step_figure
from .records import Step, TopHead
from .uncertainty import (
    CI_LEVEL,
    EXACT_SIGN_FLIPS,
    METHOD_WORDS,
    ci_method,
    curve_band,
    mean_uncertainty,
    prompts_for_a_lone_head,
    smallest_p_value,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

PATH_STEPS = ("path_logits", "path_queries", "path_values")
"""The path-patching steps whose heads the circuit section looks up in the circuit."""
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
    ".scroll{max-height:32em;overflow:auto;margin:1em 0}.scroll table{margin:0}"
    ".scroll th{position:sticky;top:0;background:#fff}"
)


def report_html(analysis: Analysis) -> str:
    """The report as one HTML page with plotly.js inside (no network needed to view it)."""
    from plotly.offline import get_plotlyjs

    sections = [_summary(analysis), _figure(logit_diff_figure(analysis), "logit-diff"), _prompts(analysis)]
    sections += [_step_section(step, analysis) for step in analysis.steps]
    return _PAGE.substitute(
        title=f"{html.escape(analysis.prompts.task)} circuit analysis: {html.escape(analysis.model_name)}",
        plotly=get_plotlyjs(),
        style=_STYLE,
        missing=_missing(analysis),
        sections="".join(sections),
    )


def named_heads(analysis: Analysis) -> list[tuple[str, TopHead]]:
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


def _missing(analysis: Analysis) -> str:
    if not analysis.missing_steps:
        return ""
    return (
        f'<p class="missing" id="missing-steps">This run stopped early: the steps {", ".join(analysis.missing_steps)} '
        "did not run, and their results are missing. Everything below was finished.</p>"
    )


def _summary(analysis: Analysis) -> str:
    """The model, the run, the mean logit differences, the heads found, the settings and versions."""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    source = f"<p>Weights: {html.escape(analysis.model_source)}</p>" if analysis.model_source else ""
    n = analysis.prompts.n
    spread = (
        f" (± one standard error over the {n} prompts; {CI_LEVEL:.0%} confidence intervals by "
        f"{METHOD_WORDS[ci_method(n, 1)]}: how far the means would move on another draw of prompts like these, "
        "for this model)"
        if n >= 2
        else " (one prompt: no error bars)"
    )
    return (
        f"<p>Model <b>{html.escape(analysis.model_name)}</b>, {n} prompts; "
        f"run in {analysis.seconds:.0f} s on {when}.</p>{source}"
        f'<p id="logit-diffs">Mean logit difference ({html.escape(analysis.prompts.difference)} at the end): '
        f"clean {_mean_with_error(analysis.clean_logit_diff)}, "
        f"corrupted {_mean_with_error(analysis.corrupted_logit_diff)}{spread}.</p>"
        + _accuracy(analysis)
        + _section("Heads found", _heads_found(analysis))
        + _section("Settings", _names_table(vars(analysis.settings)))
        + _section("Versions", _names_table(analysis.versions, table_id="versions"))
    )


def _accuracy(analysis: Analysis) -> str:
    """The clean and corrupted accuracy, where the analysis measured them."""
    if analysis.clean_accuracy is None:
        return ""
    return (
        "<p id=\"accuracy\">Accuracy (the answer's first token above every wrong answer's at the end): clean "
        f"<b>{analysis.clean_accuracy:.0%}</b>, corrupted {analysis.corrupted_accuracy:.0%}.</p>"
    )


def _mean_with_error(per_prompt) -> str:
    """'<b>4.507</b> ± 0.564 (95% CI 3.402 to 5.611)' (the mean alone for one prompt)."""
    error = mean_uncertainty(per_prompt)
    mean = f"<b>{float(per_prompt.mean()):.3f}</b>"
    if error.stderr is None:
        return mean
    low, high = float(error.ci_low), float(error.ci_high)
    return f"{mean} ± {float(error.stderr):.3f} ({CI_LEVEL:.0%} CI {low:.3f} to {high:.3f})"


def _heads_found(analysis: Analysis) -> str:
    """The rule that names heads, what the prompts allow it, each role's heads (and how many reached
    the size floor without being significant), and the prompts a tighter interval would take."""
    settings = analysis.settings
    found = "".join(
        f"<li>{html.escape(step.title)}: {html.escape(name)}: {html.escape(', '.join(map(str, heads)) or 'none')}"
        + _unsupported(step.not_significant.get(name, 0), settings.min_effect, bool(heads))
        + "</li>"
        for step in analysis.steps
        for name, heads in step.top.items()
    )
    rule = (
        f"<p>A head is named only if its effect is significant and large: significant after controlling the "
        f"false discovery rate at {settings.fdr:g} over all the heads of its step (Benjamini-Hochberg), each head "
        "tested by a sign-flip permutation test over the prompts (two-sided, of whether patching it changes the logit "
        f"difference at all; exact with up to {EXACT_SIGN_FLIPS} prompts), and at least {settings.min_effect:.0%} of "
        f"the clean - corrupted logit difference in size (--min-effect). At most {settings.top_k} heads per role, the "
        "largest first; only those are carried into the next step. Each effect is given ± one standard error over "
        "the prompts.</p>"
    )
    return rule + _power_note(analysis) + f"<ul>{found}</ul>" + _prompts_note(analysis)


def _unsupported(count: int, min_effect: float, named: bool) -> str:
    """'; 4 more heads reached 5% but were not significant' ('4 heads' where none was named;
    nothing for none)."""
    if not count:
        return ""
    heads = f"{count} {'more ' if named else ''}{'head' if count == 1 else 'heads'}"
    return html.escape(f"; {heads} reached {min_effect:.0%} but {'was' if count == 1 else 'were'} not significant")


def _power_note(analysis: Analysis) -> str:
    """What the number of prompts allows the test: its smallest p-value, against what a head
    needs to be significant on its own among the model's heads."""
    n, fdr = analysis.prompts.n, analysis.settings.fdr
    heads = next((step.results["z"] for step in analysis.steps if step.key == "act_heads" and step.results), None)
    if heads is None:
        return ""
    count = heads.numel()
    smallest = smallest_p_value(n)
    needed = prompts_for_a_lone_head(fdr, count)
    alone = (
        "no number of prompts lets a head be named alone with the test's 10,000 random sign patterns"
        if needed is None
        else f"which takes at least {needed} prompts"
    )
    verdict = (
        f" With {n} prompts no head can be significant: even a head whose effect has the same sign on every prompt "
        f"gets p = {smallest:.3g}, above {fdr:g}."
        if smallest > fdr
        else ""
    )
    return (
        f'<p id="test-power">With {n} prompts the smallest p-value the test can give is {smallest:.3g} (every '
        f"prompt's change of the same sign). Among the model's {count} heads, a head is significant on its own only "
        f"with p at most {fdr:g} / {count} = {fdr / count:.2g} ({alone}); with a larger p, only together with many "
        f"heads of small p.{verdict}</p>"
    )


HALF_WIDTH = 0.1
"""The interval half-width (of the clean - corrupted logit difference) the report's note on prompts aims at."""


def _prompts_note(analysis: Analysis) -> str:
    """How many prompts the observed spread suggests for a `HALF_WIDTH` interval on the strongest
    head's effect (step 2, z)."""
    step = next((step for step in analysis.steps if step.key == "act_heads" and step.results), None)
    if step is None or step.results["z"].samples is None or analysis.prompts.n < 2:
        return ""
    z = step.results["z"]
    strongest = int(z.as_tensor().abs().argmax())
    layer, head = z.coords["layer"][strongest // z.shape[1]], z.coords["head"][strongest % z.shape[1]]
    cell = z.sel(layer=layer, head=head)
    needed = int(cell.prompts_for(HALF_WIDTH, CI_LEVEL))
    return (
        f'<p id="prompts-needed">The strongest head\'s effect (z, step 2: head {layer}.{head}, '
        f"{float(cell):+.1%} ± {float(cell.stderr):.1%}): at the spread observed over these {analysis.prompts.n} "
        f"prompts, a {CI_LEVEL:.0%} confidence interval of ±{HALF_WIDTH:.0%} of the clean - corrupted logit "
        f"difference would take about <b>{needed}</b> prompts (--n-prompts).</p>"
    )


def _marked_answer(sentence: str, answer: str, ends_with_it: bool) -> str:
    """The sentence, its final word marked where the texts end with their answer (IOI's do; the
    model reads them up to the word before) and it is the answer."""
    word = answer.strip()
    if not ends_with_it or not sentence.endswith(" " + word):
        return html.escape(sentence)
    return f"{html.escape(sentence[: -len(word)])}<mark>{html.escape(word)}</mark>"


def _prompts(analysis: Analysis) -> str:
    """The first prompts, clean and corrupted, each with its answer marked."""
    prompts = analysis.prompts
    rows = [
        (
            _marked_answer(clean, answer, prompts.texts_end_with_answer),
            _marked_answer(corrupted, answer, prompts.texts_end_with_answer),
            f"<mark>{html.escape(repr(answer))}</mark>",
            html.escape(repr(wrong)),
        )
        for clean, corrupted, answer, wrong in list(
            zip(prompts.clean_texts, prompts.corrupted_texts, prompts.answer_texts, prompts.wrong_texts)
        )[:PROMPTS_SHOWN]
    ]
    explanation = (
        f"<p>Marked: the answer. The model reads each prompt up to the answer, and the logit difference "
        f"({html.escape(prompts.difference)}) is the logit of the answer's first token minus that of the wrong "
        "answer's there.</p>"
    )
    return _section(
        f"Prompts (first {PROMPTS_SHOWN})",
        explanation
        + _table(("clean", "corrupted", f"answer ({prompts.answer_key})", f"wrong ({prompts.wrong_key})"), rows),
    )


def _step_section(step: Step, analysis: Analysis) -> str:
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
    """The heads the step named, each effect with its error bars and p-value, and how many more
    reached the size floor without being significant."""
    if not step.top:
        return ""
    rows = [
        (
            html.escape(role),
            f"{head.layer}.{head.head}",
            f"{head.value:+.1%}",
            _or_dash(head.stderr, "{:.1%}"),
            "-" if head.ci_low is None else f"{head.ci_low:+.1%} to {head.ci_high:+.1%}",
            _or_dash(head.p_value, "{:.2g}"),
        )
        for role, heads in step.top.items()
        for head in heads
    ]
    unsupported = [
        f"{html.escape(role)}: {count}" for role, count in step.not_significant.items() if count and role in step.top
    ]
    note = (
        f"<p>Reached the size floor but not significant, so not named: {'; '.join(unsupported)}.</p>"
        if unsupported
        else ""
    )
    head = ("role", "head", "effect", "standard error", f"{CI_LEVEL:.0%} CI", "p-value")
    return _table(head, rows, table_id=f"top-{step.key}") + note


def _or_dash(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def _confirmation_section(confirmation: tlp.Confirmation, analysis: Analysis) -> str:
    """The confirmed neurons' table, how well the estimate ranked them, and the strongest head for scale."""
    stable = all(cell.top_k_frequency is not None for cell in confirmation.cells)
    rows = [
        (
            cell.coords["layer"],
            cell.coords["neuron"],
            f"{cell.estimated_change:+.1%}",
            f"{cell.exact_change:+.1%}",
            *((f"{cell.top_k_frequency:.0%}",) if stable else ()),
        )
        for cell in confirmation.cells
    ]
    n = confirmation.overlap_size
    frequency = (
        f" The last column: the fraction of 200 bootstrap resamples of the prompts in which the neuron's estimate is "
        f"among the {len(confirmation.cells)} largest (how stable its place in the screen is)."
        if stable
        else ""
    )
    heads = next((step for step in analysis.steps if step.key == "act_heads" and step.results), None)
    scale = "" if heads is None else _strongest_head(heads.results["z"])
    return (
        f"<p>The {len(confirmation.cells)} of {confirmation.screened} neurons with the largest estimated effect, "
        "each patched exactly. Rank correlation (Spearman) of estimated and exact effect over them: "
        f"<b>{_number(confirmation.spearman)}</b>; of the estimate's {n} strongest, "
        f"<b>{confirmation.top_k_overlap}</b> are among the {n} strongest exactly.{scale}{frequency}</p>"
        + _table(
            ("layer", "neuron", "estimated effect", "exact effect", *(("in the top, resampled",) if stable else ())),
            rows,
            table_id="confirmed-neurons",
        )
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


def _circuit_section(finding: CircuitFinding, analysis: Analysis) -> str:
    """The curves and their areas, the estimators against the exact scores, the circuit (figure and
    every edge), and which named heads it holds."""
    return (
        _section("Faithfulness", _faithfulness(finding), level=3)
        + _section("Estimated against exact edge scores", _agreement(finding), level=3)
        + _section("The circuit", _circuit(finding), level=3)
        + _section("Heads named by path patching", _named_heads(finding, analysis), level=3)
    )


def _faithfulness(finding: CircuitFinding) -> str:
    """Each ranking's two curves on the held-out prompts, each point with its interval, as a table
    and a figure with the curves' bands."""
    sizes = [f"{f:g}" for f in finding.curves[0].signed.fractions]
    rows = [
        (html.escape(method), html.escape(curve.ranking), summary, *_with_band(curve))
        for method, mib in zip(RANKINGS, finding.curves)
        for curve, summary in ((mib.signed, f"CPR {mib.cpr:.3f}"), (mib.absolute, f"CMD {mib.cmd:.3f}"))
    ]
    banded = curve_band(finding.curves[0].signed) is not None
    band = (
        f" Below each faithfulness, its {CI_LEVEL:.0%} confidence interval over the held-out prompts (by "
        f"{METHOD_WORDS[ci_method(len(finding.held_out), 1)]}, each prompt's circuit, full and empty values "
        "taken together); the figure draws it as a band."
        if banded
        else " With one held-out prompt there is no interval."
    )
    return (
        f"<p>Edges scored on {len(finding.scored_on)} of the prompts; every faithfulness in this table and figure "
        f"is measured on the other {len(finding.held_out)}, held out, as MIB does. MIB's CPR is the area under the "
        "curve of the edges ranked by signed score (higher is better), its CMD the area between 1 and the curve of "
        "the edges ranked by |score| (lower is better); the columns are MIB's circuit sizes, as fractions of the "
        f"edges.{band}</p>"
        + _table(("scores", "edges ranked by", "MIB summary", *sizes), rows, table_id="faithfulness")
        + _figure(faithfulness_figure(finding), "faithfulness")
    )


def _agreement(finding: CircuitFinding) -> str:
    """How well each estimator ranks the candidates against their exact scores: Spearman and top-k overlap."""
    k, n = finding.overlap_size, finding.candidates
    rows = [
        (html.escape(method), _number(confirmation.spearman), f"{confirmation.overlap(k)} of {k}")
        for method, confirmation in zip(ESTIMATORS, finding.agreement)
    ]
    return (
        f"<p>The {n} candidates, EAP-IG's strongest edges by |score|, were also scored exactly on the scoring "
        f"prompts (each edge resampled alone: the ranking {html.escape(RANKINGS[-1])}), so each estimator's scores "
        "of them can be held against the exact ones with no further forward pass: the rank correlation (Spearman) of "
        f"estimated and exact scores over the {n} candidates, and how many of the estimate's {k} strongest of them "
        f"(by |score|) are among the {k} strongest exactly. The candidates are the edges EAP-IG ranks highest, so both "
        "estimators are compared where EAP-IG puts its weight; EAP's own strongest edges may lie elsewhere.</p>"
        + _table(
            ("estimator", f"Spearman over the {n} candidates", f"top-{k} overlap"), rows, table_id="estimator-agreement"
        )
    )


def _with_band(curve: tlp.FaithfulnessCurve) -> list[str]:
    """Each size's faithfulness, with its interval below it where the curve has one."""
    band = curve_band(curve)
    if band is None:
        return [f"{f:.3f}" for f in curve.faithfulness]
    return [f"{f:.3f}<br><small>{low:.2f} to {high:.2f}</small>" for f, low, high in zip(curve.faithfulness, *band[1:])]


def _circuit(finding: CircuitFinding) -> str:
    """The circuit's size and faithfulness, its graph, and every edge in a table, strongest first."""
    total = len(finding.circuit)
    drawn = (
        "The figure draws every edge"
        if total <= DRAWN_EDGES
        else f"The figure draws the {DRAWN_EDGES:,} strongest edges (a browser draws more only slowly)"
    )
    head = (
        "sender",
        "receiver",
        "score",
        *(("standard error", f"{CI_LEVEL:.0%} CI") if finding.edge_errors is not None else ()),
        *(("in resampled circuits",) if finding.stability is not None else ()),
    )
    return (
        f"<p>{total:,} of {len(finding.circuit.graph):,} edges from the "
        f"{html.escape(finding.method)} ranking by signed score, chosen on the scoring prompts (faithfulness "
        f"{finding.chosen_faithfulness:.3f}{_interval(finding.selection[finding.chosen], finding)} there); "
        f"faithfulness <b>{finding.faithfulness:.3f}</b>{_interval(finding.curves[finding.chosen].signed, finding)} "
        f"on the held-out prompts.{_stability(finding)} {drawn}; the table lists all {total:,}, strongest first, each "
        "score (the change of the logit difference when the edge alone is resampled, as the ranking measures it) "
        "with its standard error and interval over the scoring prompts. Beside this page, circuit.json holds the "
        "circuit and edge_scores.json every edge's score, in EAP-IG's graph JSON (which MIB's circuit track reads), "
        "where EAP-IG can express the model's graph.</p>"
        + _figure(circuit_figure(finding), "circuit-graph")
        + f'<div class="scroll">{_table(head, _edge_rows(finding), table_id="circuit-edges")}</div>'
    )


def _edge_rows(finding: CircuitFinding) -> list[tuple[str, ...]]:
    """Each of the circuit's edges as a row, strongest first: sender, receiver, score, and where
    measured, the score's standard error and interval and the edge's inclusion in resampled circuits."""
    edges = finding.circuit.edges
    rows = [finding.circuit.graph.index(edge) for edge in edges]
    values = finding.scores[finding.chosen].scores[rows].tolist()
    errors = None if finding.edge_errors is None else [part.tolist() for part in finding.edge_errors]
    inclusion = None if finding.stability is None else finding.stability.inclusion[rows].tolist()

    def row(i: int) -> tuple[str, ...]:
        cells = [html.escape(str(edges[i].sender)), html.escape(str(edges[i].receiver)), f"{values[i]:+.4f}"]
        if errors is not None:
            cells += [f"{errors[0][i]:.4f}", f"{errors[1][i]:+.4f} to {errors[2][i]:+.4f}"]
        if inclusion is not None:
            cells.append(f"{inclusion[i]:.0%}")
        return tuple(cells)

    return [row(i) for i in sorted(range(len(edges)), key=lambda i: -abs(values[i]))]


def _interval(curve: tlp.FaithfulnessCurve, finding: CircuitFinding) -> str:
    """' (95% CI 0.71 to 0.93)' of the circuit's point on `curve` (nothing where it has no band)."""
    band = curve_band(curve)
    if band is None:
        return ""
    index = list(curve.fractions).index(finding.size)
    return f" ({CI_LEVEL:.0%} CI {band[1][index]:.2f} to {band[2][index]:.2f})"


def _stability(finding: CircuitFinding) -> str:
    """How often resampled scoring prompts give the circuit's edges again."""
    stability = finding.stability
    if stability is None:
        return " With one scoring prompt, the circuit's stability over prompts cannot be measured."
    return (
        f' <span id="circuit-stability">Found again on {len(stability.jaccard)} bootstrap resamples of the scoring '
        f"prompts (the same ranking, the same size; no forward pass), the circuits overlap this one by a mean "
        f"Jaccard index of <b>{stability.mean_jaccard:.2f}</b> (1: the same edges); the last column of the table "
        "below is each edge's inclusion frequency, the fraction of the resampled circuits that hold it.</span>"
    )


def _named_heads(finding: CircuitFinding, analysis: Analysis) -> str:
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
