"""The report's figures: each step's results, each prompt's logit differences (and their means'
intervals), and the circuit step's faithfulness curves with their bands and its circuit.

They need plotly (`pip install 'transformer_lens_patching[plot]'`), imported when a figure is made.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
from typing import TYPE_CHECKING

import transformer_lens_patching as tlp

from ...results import PatchResult
from .analysis import Analysis
from .circuit_step import CircuitFinding
from .records import Step
from .uncertainty import CI_LEVEL, curve_band, mean_uncertainty

if TYPE_CHECKING:
    import plotly.graph_objects as go

DRAWN_EDGES = 5000
"""The most edges the circuit's figure draws, the strongest (the report's table lists every edge): a
browser draws 5,000 in about two seconds, the 70,651 of SmolLM2's whole graph in about forty."""


def step_figure(step: Step) -> go.Figure:
    """The heatmap of a step's results, one panel per component; for the neuron step, its
    confirmed neurons' estimated against exact effect."""
    from ... import plots

    if step.confirmation is not None:
        labels = [_neuron(cell.coords) for cell in step.confirmation.cells]
        return plots.estimate_vs_exact(step.confirmation, percent=True, value_label="effect", labels=labels)
    drawn = {name: _drawable(result) for name, result in step.results.items()}
    results = drawn if len(drawn) > 1 else next(iter(drawn.values()))
    return plots.heatmap(results, percent=True, value_label="effect", title=step.title)


def _drawable(result: PatchResult) -> PatchResult:
    """The result as the heatmap draws it: with its per-prompt values (each cell's standard error on
    hover) where there is a spread, without them for one prompt."""
    if result.samples is None or result.n_prompts >= 2:
        return result
    return PatchResult(result.as_tensor(), result.dims, result.coords)


MEAN_ROW = f"mean ({CI_LEVEL:.0%} CI)"
"""The logit-difference figure's first row: each run's mean over the prompts, with its interval."""


def logit_diff_figure(analysis: Analysis) -> go.Figure:
    """Each prompt's clean and corrupted logit difference, side by side on one row per prompt
    (a line joins the two), the prompt's text on hover; above them, each run's mean with its
    confidence interval as an error bar (with two prompts or more)."""
    import plotly.graph_objects as go

    clean, corrupted = analysis.clean_logit_diff.tolist(), analysis.corrupted_logit_diff.tolist()
    rows = [f"prompt {i}" for i in range(len(clean))]
    fig = go.Figure()
    joins_x = [value for pair in zip(corrupted, clean, itertools.repeat(None)) for value in pair]
    joins_y = [row for row in rows for _ in range(3)]
    fig.add_trace(
        go.Scatter(x=joins_x, y=joins_y, mode="lines", line={"color": "#bbb"}, hoverinfo="skip", showlegend=False)
    )
    for name, values, sentences, colour in (
        ("clean", clean, analysis.prompts.clean_texts, "#2166ac"),
        ("corrupted", corrupted, analysis.prompts.corrupted_texts, "#b2182b"),
    ):
        texts = [html.escape(sentence) for sentence in sentences]
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
    for name, per_prompt, colour in (
        ("clean", analysis.clean_logit_diff, "#2166ac"),
        ("corrupted", analysis.corrupted_logit_diff, "#b2182b"),
    ):
        error = mean_uncertainty(per_prompt)
        if error.stderr is None:
            continue
        mean = float(per_prompt.mean())
        low, high = float(error.ci_low), float(error.ci_high)
        fig.add_trace(
            go.Scatter(
                x=[mean],
                y=[MEAN_ROW],
                mode="markers",
                name=f"{name} mean",
                marker={"color": colour, "size": 11, "symbol": "diamond"},
                error_x={"type": "data", "symmetric": False, "array": [high - mean], "arrayminus": [mean - low]},
                hovertemplate=(
                    f"{name} mean: %{{x:.3f}} ± {float(error.stderr):.3f}<br>"
                    f"{CI_LEVEL:.0%} CI {low:.3f} to {high:.3f}<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        title=f"Logit difference ({analysis.prompts.difference}) per prompt, clean and corrupted",
        height=180 + 22 * len(rows),
        legend={"orientation": "h", "y": -0.15},
    )
    fig.update_xaxes(title_text="logit diff", zeroline=True)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=[MEAN_ROW, *rows], autorange="reversed")
    return fig


def _neuron(coords: dict[str, int]) -> str:
    """'L12 N345'."""
    return f"L{coords['layer']} N{coords['neuron']}"


def faithfulness_figure(finding: CircuitFinding) -> go.Figure:
    """Each ranking's two faithfulness curves on the held-out prompts (`plots.faithfulness_curves`),
    each with its `CI_LEVEL` band in its colour (with two held-out prompts or more): the curves are
    drawn without their per-prompt values, so that the bands are the report's own intervals
    (`curve_band`, as in the table), drawn once."""
    import plotly.colors
    import plotly.graph_objects as go

    from ... import plots

    bare = [
        tlp.MIBFaithfulness(
            dataclasses.replace(mib.signed, samples=None), dataclasses.replace(mib.absolute, samples=None)
        )
        for mib in finding.curves
    ]
    figure = plots.faithfulness_curves(bare, title="Faithfulness of each ranking's circuits, on the held-out prompts")
    curves = [curve for mib in finding.curves for curve in (mib.signed, mib.absolute)]
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    palette = plotly.colors.qualitative.Plotly
    for number, (curve, line) in enumerate(zip(curves, lines)):
        colour = palette[number % len(palette)]
        line.line.color = colour
        line.marker.color = colour
        line.legendgroup = line.name
        band = curve_band(curve)
        if band is None:
            continue
        _, low, high = band
        fractions = list(curve.fractions)
        figure.add_trace(
            go.Scatter(
                x=fractions + fractions[::-1],
                y=list(high) + list(low)[::-1],
                fill="toself",
                fillcolor=colour,
                opacity=0.15,
                line={"width": 0},
                mode="lines",
                name=f"{line.name}: {CI_LEVEL:.0%} band",
                legendgroup=line.name,
                showlegend=False,
                hoverinfo="skip",
            )
        )
    return figure


def _drawn(finding: CircuitFinding) -> tlp.Circuit:
    """The circuit, or where it has more than `DRAWN_EDGES` edges, its `DRAWN_EDGES` strongest by the
    scores that chose it."""
    if len(finding.circuit) <= DRAWN_EDGES:
        return finding.circuit
    scores = finding.scores[finding.chosen]
    kept = finding.circuit.edges
    strength = scores.scores[[scores.graph.index(edge) for edge in kept]].abs()
    strongest = strength.argsort(descending=True, stable=True)[:DRAWN_EDGES].tolist()
    return tlp.Circuit(finding.circuit.graph, [kept[i] for i in strongest])


def circuit_figure(finding: CircuitFinding) -> go.Figure:
    """The circuit's graph (`plots.circuit_graph`), its edges weighted and coloured by the scores that
    chose it: every edge, or the `DRAWN_EDGES` strongest of a larger circuit (the title says which)."""
    from ... import plots

    drawn = _drawn(finding)
    total = len(finding.circuit)
    which = f"All {total:,} edges" if len(drawn) == total else f"The {len(drawn):,} strongest of {total:,} edges"
    return plots.circuit_graph(
        drawn, finding.scores[finding.chosen], title=f"{which} of the circuit ({finding.method} scores)"
    )
