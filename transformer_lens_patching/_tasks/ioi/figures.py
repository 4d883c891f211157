"""The report's figures: each step's results, and each prompt's logit differences.

They need plotly (`pip install 'transformer_lens_patching[plot]'`), imported when a figure is made.
"""

from __future__ import annotations

import html
import itertools
from typing import TYPE_CHECKING

from .analysis import IOIAnalysis
from .records import Step

if TYPE_CHECKING:
    import plotly.graph_objects as go


def step_figure(step: Step) -> go.Figure:
    """The heatmap of a step's results, one panel per component; for the neuron step, its
    confirmed neurons' estimated against exact effect."""
    from ... import plots

    if step.confirmation is not None:
        labels = [_neuron(cell.coords) for cell in step.confirmation.cells]
        return plots.estimate_vs_exact(step.confirmation, percent=True, value_label="effect", labels=labels)
    results = step.results if len(step.results) > 1 else next(iter(step.results.values()))
    return plots.heatmap(results, percent=True, value_label="effect", title=step.title)


def logit_diff_figure(analysis: IOIAnalysis) -> go.Figure:
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


def _neuron(coords: dict[str, int]) -> str:
    """'L12 N345'."""
    return f"L{coords['layer']} N{coords['neuron']}"
