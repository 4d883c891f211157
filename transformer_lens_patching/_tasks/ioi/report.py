"""Write an `IOIAnalysis` as a self-contained HTML report, a JSON file and a CSV file.

The HTML report needs plotly (`pip install 'transformer_lens_patching[plot]'`), imported
when a report is written.
"""

import csv
import datetime
import html
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...results import PatchResult
from .analysis import IOIAnalysis, Step

if TYPE_CHECKING:
    import plotly.graph_objects as go

REPORT, JSON, CSV = "report.html", "results.json", "results.csv"
CSV_DIMS = ("seq_pos", "layer", "head", "kv_head")
"""The dim columns of the CSV file (empty where a result has no such dim)."""


def write_report(analysis: IOIAnalysis, out: str | Path) -> dict[str, Path]:
    """Write `report.html`, `results.json` and `results.csv` into the folder `out`.

    >>> paths = write_report(run_ioi(model), "ioi-report")  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['csv', 'html', 'json']
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"html": folder / REPORT, "json": folder / JSON, "csv": folder / CSV}
    paths["html"].write_text(report_html(analysis), encoding="utf-8")
    paths["json"].write_text(json.dumps(as_json(analysis), indent=1), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("step", "component", *CSV_DIMS, "value"))
        writer.writerows(csv_rows(analysis))
    return paths


def step_figure(step: Step) -> "go.Figure":
    """The heatmap of a step's results: one panel per component."""
    from ... import plots

    results = step.results if len(step.results) > 1 else next(iter(step.results.values()))
    return plots.heatmap(results, percent=True, value_label="effect", title=step.title)


def logit_diff_figure(analysis: IOIAnalysis) -> "go.Figure":
    """The per-prompt logit differences of the clean and corrupted runs."""
    from ... import plots

    per_prompt = {
        "clean": PatchResult(analysis.clean_logit_diff, ("prompt",)),
        "corrupted": PatchResult(analysis.corrupted_logit_diff, ("prompt",)),
    }
    return plots.histogram(per_prompt, value_label="logit diff", title="Logit difference per prompt")


def report_html(analysis: IOIAnalysis) -> str:
    """The report as one HTML page with plotly.js inside (no network needed to view it)."""
    from plotly.offline import get_plotlyjs

    sections = [_summary(analysis), _figure(logit_diff_figure(analysis), "logit-diff"), _prompts(analysis)]
    for step in analysis.steps:
        sections.append(
            f'<h2 id="{step.key}">{html.escape(step.title)}</h2>'
            f"<p>{html.escape(step.description)}" + (f" ({step.seconds:.0f} s)</p>" if step.results else "</p>")
            + _top_table(step)
            + (_figure(step_figure(step), step.key) if step.results else "")
        )
    title = f"IOI circuit analysis: {html.escape(analysis.model_name)}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<script>{get_plotlyjs()}</script><style>{_STYLE}</style></head>"
        f"<body><h1>{title}</h1>{''.join(sections)}</body></html>"
    )


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    ".figure{margin:1em 0}"
)


def _figure(figure: "go.Figure", key: str) -> str:
    return f'<div class="figure">{figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{key}")}</div>'


def _summary(analysis: IOIAnalysis) -> str:
    settings = vars(analysis.settings)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    clean, corrupted = float(analysis.clean_logit_diff.mean()), float(analysis.corrupted_logit_diff.mean())
    found = "".join(
        f"<li>{html.escape(step.title)}: {html.escape(name)}: {html.escape(', '.join(map(str, heads)) or 'none')}</li>"
        for step in analysis.steps
        for name, heads in step.top.items()
    )
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"<p>Model <b>{html.escape(analysis.model_name)}</b>, {analysis.dataset.N} prompts; "
        f"run in {analysis.seconds:.0f} s on {when}.</p>"
        f"<p>Mean logit difference (IO - S at the end): clean <b>{clean:.3f}</b>, corrupted <b>{corrupted:.3f}</b>.</p>"
        f"<h2>Heads found</h2><ul>{found}</ul><h2>Settings</h2><table>{rows}</table>"
    )


def _prompts(analysis: IOIAnalysis, count: int = 5) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(clean)}</td><td>{html.escape(corrupted)}</td></tr>"
        for clean, corrupted in zip(analysis.dataset.sentences[:count], analysis.corrupted.sentences[:count])
    )
    return f"<h2>Prompts (first {count})</h2><table><tr><th>clean</th><th>corrupted</th></tr>{rows}</table>"


def _top_table(step: Step) -> str:
    if not step.top:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{head.layer}.{head.head}</td><td>{head.value:+.1%}</td></tr>"
        for name, heads in step.top.items()
        for head in heads
    )
    return f"<table><tr><th>role</th><th>head</th><th>effect</th></tr>{rows}</table>"


def as_json(analysis: IOIAnalysis) -> dict:
    """Everything measured, as plain JSON values."""
    return {
        "model": analysis.model_name,
        "settings": vars(analysis.settings),
        "seconds": analysis.seconds,
        "clean_logit_diff": _values(analysis.clean_logit_diff),
        "corrupted_logit_diff": _values(analysis.corrupted_logit_diff),
        "prompts": [
            {"clean": clean, "corrupted": corrupted, "io": p.io, "s": p.s}
            for clean, corrupted, p in zip(analysis.dataset.sentences, analysis.corrupted.sentences, analysis.dataset.prompts)
        ],
        "steps": [
            {
                "key": step.key,
                "title": step.title,
                "description": step.description,
                "seconds": step.seconds,
                "top": {name: [vars(head) for head in heads] for name, heads in step.top.items()},
                "results": {
                    name: {"dims": list(r.dims), "coords": {d: list(c) for d, c in r.coords.items()}, "values": r.tolist()}
                    for name, r in step.results.items()
                },
            }
            for step in analysis.steps
        ],
    }


def _values(per_prompt) -> dict:
    return {"mean": float(per_prompt.mean()), "per_prompt": per_prompt.tolist()}


def csv_rows(analysis: IOIAnalysis):
    """One row per result cell: step, component, the dims' coordinates, value."""
    for step in analysis.steps:
        for name, result in step.results.items():
            values = result.as_tensor()
            for index in itertools.product(*(range(size) for size in values.shape)):
                coords = {dim: result.coords[dim][i] for dim, i in zip(result.dims, index)}
                yield (step.key, name, *(coords.get(dim, "") for dim in CSV_DIMS), float(values[index]))
