"""Plotly figures of patching results, with axes, ticks and hover text taken from their dims.

Each function takes a `PatchResult`, or the dict of them that `act_patch` and `path_patch`
return for an `IterNode` (the last two: a `Circuit`, or faithfulness curves), and returns a
`plotly.graph_objects.Figure`. Nothing is shown: call `fig.show()` or `fig.write_html(path)`.

- `heatmap`: a 2-D result (layer on the y axis by default), one panel per entry of a dict
  with one shared colour scale, or a dict of 1-D results side by side as columns. A 3-D
  result, e.g. `IterNode("z", seq_pos="each")`'s `(seq_pos, layer, head)`, gets one panel per
  coordinate of its first dim; use `result.permute_dims(...)` to choose that dim.
- `line`: 1-D results, one line per entry of a dict.
- `histogram`: the distribution of a result's values, one overlaid histogram per entry.
- `estimate_vs_exact`: a `Confirmation`'s cells, estimated against exact change, with the
  diagonal where the two agree.
- `circuit_graph`: a `Circuit`'s nodes by layer and its edges as lines, weighted and coloured
  by `EdgeScores` when given.
- `faithfulness_curves`: `FaithfulnessCurve`s or `MIBFaithfulness` summaries, faithfulness against
  the fraction of edges kept.

`tokens=` labels the `seq_pos` dim ("0: <bos>", "1: When", ...). `percent=True` shows
normalised metrics as percentages (0.25 as 25%) on colour bars, axes and hover text.
Results with a per-prompt `batch` dim (or another dim of the metric's own output) are
refused: reduce that dim or select one prompt first.
"""

import math
from collections.abc import Mapping, Sequence

import torch

from ._core.circuit import Circuit
from ._core.graph import Edge, EdgeGraph, EdgeScores, GraphNode
from ._methods.confirmation import Confirmation
from ._methods.faithfulness import FaithfulnessCurve, MIBFaithfulness
from .errors import PatchingError
from .results import PatchResult

try:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
except ImportError as error:
    raise ImportError(
        "transformer_lens_patching.plots needs plotly: pip install 'transformer_lens_patching[plot]'."
    ) from error

__all__ = ["circuit_graph", "estimate_vs_exact", "faithfulness_curves", "heatmap", "histogram", "line"]

Results = PatchResult | Mapping[str, PatchResult]
"""One result, or a dict of them by component name (as returned for an IterNode)."""

COLUMNS = 5
"""Panels per row of a faceted heatmap."""
ROW_PIXELS = 16
"""Height of one heatmap row (e.g. one layer), so that every row keeps its tick label."""
EVERY_TICK = ("layer", "head", "kv_head")
"""Dims whose every coordinate gets a tick (plotly would otherwise skip some on deep models)."""
MLP_SHIFT = 0.5
"""How far right of its layer's heads a circuit graph draws an MLP (it reads their outputs)."""
INPUT_OFFSET = {"q": 0.15, "k": 0.0, "v": -0.15}
"""Where on a head's marker an edge into its query, key or value input ends (in head rows)."""
EDGE_DASH = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}
"""The line of an edge, by what its receiver reads: a head's input, an MLP or the logits."""
WIDTH_STEPS = 6
"""Line widths of a scored circuit graph: |score| / max |score| rounded up to this many steps."""
MAX_WIDTH = 8.0
"""The width in pixels of a circuit graph's strongest edges."""
SIGN_COLOURS = {"positive": "#2166ac", "negative": "#b2182b", "unscored": "#bbbbbb"}
"""Edge colours by the sign of the score, as the heatmaps' RdBu scale (positive blue)."""
NODE_STYLE = {
    "embed": ("diamond", "#444444"),
    "logits": ("diamond", "#444444"),
    "head": ("circle", "#4d9221"),
    "mlp": ("square", "#e08214"),
}
"""Marker symbol and colour of a circuit graph's nodes, by kind."""


def heatmap(
    results: Results,
    *,
    tokens: Sequence[str] | None = None,
    y: str | None = None,
    percent: bool = False,
    value_label: str = "value",
    title: str | None = None,
) -> go.Figure:
    """A heatmap of a 2-D result, or one panel per entry of a dict, on a colour scale centred at 0;
    hovering a cell of a result with uncertainty gives its standard error too.

    Args:
        results: A 2-D PatchResult (e.g. `("layer", "head")`, `("seq_pos", "layer")`); a 3-D
            one, faceted over its first dim; a dict of 2-D results, one panel each, titled by
            key; or a dict of 1-D results, drawn as the columns of one heatmap.
        tokens: One string per position of the prompt, to label the `seq_pos` dim.
        y: The dim on the y axis; by default `layer` where there is one, else the first dim.
        percent: Show values as percentages (for metrics normalised to 0..1).
        value_label: What the values are, for the colour bar and hover text.
        title: The figure title; by default the value label and the dims.

    Raises:
        PatchingError: For anything but PatchResults of those shapes, for per-prompt dims,
            and for `tokens` that do not fit the `seq_pos` dim.

    >>> import torch
    >>> from transformer_lens_patching import PatchResult
    >>> result = PatchResult(torch.arange(6.0).reshape(2, 3) - 2, ("layer", "head"), {"layer": (4, 5)})
    >>> fig = heatmap(result)
    >>> fig.layout.yaxis.title.text, fig.data[0].y, fig.layout.xaxis.title.text, fig.data[0].x
    ('layer', (4, 5), 'head', (0, 1, 2))
    >>> resid = PatchResult(torch.arange(6.0).reshape(3, 2), ("seq_pos", "layer"))
    >>> by_position = {"resid_pre": resid, "attn_out": resid}
    >>> fig = heatmap(by_position, tokens=["<bos>", " When", " John"], percent=True)
    >>> [a.text for a in fig.layout.annotations], fig.data[1].x
    (['resid_pre', 'attn_out'], ('0: <bos>', '1:  When', '2:  John'))
    """
    panels = _checked(results, "heatmap")
    _check_tokens(panels, tokens)
    title = title or _title(value_label, "by", panels)
    panels = _heatmap_panels(results, panels, tokens)
    rows, cols = -(-len(panels) // COLUMNS), min(len(panels), COLUMNS)
    titles = list(panels) if any(panels) else None
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.3 / cols)
    for index, (name, result) in enumerate(panels.items()):
        y_dim = _y_of(result, y)
        if y_dim not in result.dims:
            where = f"the panel {name!r}" if name else "this result"
            raise PatchingError(f"y={y_dim!r} is not a dim of {where}: its dims are {result.dims}.")
        x_dim = next(dim for dim in result.dims if dim != y_dim)
        values = result.permute_dims(y_dim, x_dim).as_tensor()
        x_labels, y_labels = _labels(result, x_dim, tokens), _labels(result, y_dim, tokens)
        heads = _head_names(result, y_dim, x_dim)
        number = _number_format(percent)
        hover = f"{y_dim}=%{{y}}<br>{x_dim}=%{{x}}<br>{value_label}=%{{z:{number}}}"
        stderr = None
        if result.samples is not None and result.samples.n > 1:
            stderr = result.permute_dims(y_dim, x_dim).stderr.float().tolist()
            hover += f" +- %{{customdata:{number}}} (standard error)"
        if heads is not None:
            hover = f"{heads[0]} %{{text}}<br>{hover}"
        trace = go.Heatmap(
            z=values.float().tolist(),
            x=x_labels,
            y=y_labels,
            text=None if heads is None else heads[1],
            customdata=stderr,
            coloraxis="coloraxis",
            name=name,
            hovertemplate=f"{hover}<extra>{name}</extra>",
        )
        row, col = index // cols + 1, index % cols + 1
        fig.add_trace(trace, row=row, col=col)
        fig.update_xaxes(title_text=x_dim, type="category", row=row, col=col, **_every_tick(x_dim, x_labels))
        fig.update_yaxes(
            title_text=y_dim, type="category", autorange="reversed", row=row, col=col, **_every_tick(y_dim, y_labels)
        )
    for index in range(len(panels), rows * cols):  # the empty cells of the last row
        fig.update_xaxes(visible=False, row=rows, col=index % cols + 1)
        fig.update_yaxes(visible=False, row=rows, col=index % cols + 1)
    colorbar = {"title": {"text": value_label}, **({"tickformat": "~%"} if percent else {})}
    fig.update_layout(
        title=title,
        height=150 + rows * _row_height(panels, y),
        coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": colorbar},
    )
    return fig


def line(
    results: Results,
    *,
    tokens: Sequence[str] | None = None,
    percent: bool = False,
    value_label: str = "value",
    title: str | None = None,
) -> go.Figure:
    """A line plot of a 1-D result (e.g. dims `("layer",)`), or one line per entry of a dict,
    with error bars of one standard error where a result has uncertainty.

    Args:
        results: A 1-D PatchResult, or a dict of them over the same dim (one line each, named by key).
        tokens: One string per position of the prompt, to label the `seq_pos` dim.
        percent: Show values as percentages (for metrics normalised to 0..1).
        value_label: What the values are, for the y axis and hover text.
        title: The figure title; by default the value label and the dim.

    Raises:
        PatchingError: For anything but 1-D PatchResults over one dim, for per-prompt dims,
            and for `tokens` that do not fit the `seq_pos` dim.

    >>> import torch
    >>> from transformer_lens_patching import PatchResult
    >>> by_layer = {name: PatchResult(torch.arange(3.0) / 4, ("layer",)) for name in ("resid_pre", "mlp_out")}
    >>> fig = line(by_layer, percent=True)
    >>> [trace.name for trace in fig.data], fig.layout.xaxis.title.text, fig.layout.yaxis.tickformat
    (['resid_pre', 'mlp_out'], 'layer', '~%')
    """
    panels = _checked(results, "line")
    _check_tokens(panels, tokens)
    dims = {result.dims for result in panels.values()}
    for name, result in panels.items():
        if result.ndim != 1:
            raise PatchingError(f"line needs 1-D results, but {_name(name)} has dims {result.dims}: use heatmap.")
    if len(dims) > 1:
        raise PatchingError(f"line draws every entry on one x axis, so they need one dim; got dims {sorted(dims)}.")
    (dim,) = dims.pop()
    fig = go.Figure()
    for name, result in panels.items():
        hover = f"{dim}=%{{x}}<br>{value_label}=%{{y:{_number_format(percent)}}}<extra>{name}</extra>"
        x, values = _labels(result, dim, tokens), result.as_tensor().float().tolist()
        spread = result.samples is not None and result.samples.n > 1
        bars = {"type": "data", "array": result.stderr.float().tolist()} if spread else None
        fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=name, hovertemplate=hover, error_y=bars))
    fig.update_layout(title=title or _title(value_label, "by", panels), showlegend=len(panels) > 1)
    fig.update_xaxes(title_text=dim)
    fig.update_yaxes(title_text=value_label, **({"tickformat": "~%"} if percent else {}))
    return fig


def histogram(
    results: Results,
    *,
    percent: bool = False,
    nbins: int | None = None,
    value_label: str = "value",
    title: str | None = None,
) -> go.Figure:
    """The distribution of a result's values (e.g. over all heads); a dict gives one overlaid histogram per entry.

    Args:
        results: A PatchResult of any dims, or a dict of them (one histogram each, named by key).
        percent: Show values as percentages (for metrics normalised to 0..1).
        nbins: The most bins to use; by default plotly chooses.
        value_label: What the values are, for the x axis and hover text.
        title: The figure title; by default the value label and the dims.

    Raises:
        PatchingError: For anything but PatchResults, and for per-prompt dims.

    >>> import torch
    >>> from transformer_lens_patching import PatchResult
    >>> heads = PatchResult(torch.arange(12.0).reshape(3, 4) / 12, ("layer", "head"))
    >>> fig = histogram(heads, percent=True)
    >>> len(fig.data[0].x), fig.layout.xaxis.tickformat, fig.layout.title.text
    (12, '~%', 'value over layer × head')
    """
    panels = _checked(results, "histogram")
    fig = go.Figure()
    for name, result in panels.items():
        hover = f"{value_label}=%{{x}}<br>count=%{{y}}<extra>{name}</extra>"
        values = result.as_tensor().flatten().float().tolist()
        opacity = 0.6 if len(panels) > 1 else 1.0
        fig.add_trace(go.Histogram(x=values, name=name, nbinsx=nbins, opacity=opacity, hovertemplate=hover))
    fig.update_layout(
        title=title or _title(value_label, "over", panels),
        barmode="overlay",
        bargap=0.05,
        showlegend=len(panels) > 1,
    )
    fig.update_xaxes(title_text=value_label, **({"tickformat": "~%", "hoverformat": ".1%"} if percent else {}))
    fig.update_yaxes(title_text="count")
    return fig


def estimate_vs_exact(
    confirmation: Confirmation,
    *,
    percent: bool = False,
    value_label: str = "change",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Each confirmed cell's estimated change (x) against its exact change (y), with the
    diagonal y = x where they agree; the rank correlation and overlap in the title.

    Args:
        confirmation: What `confirm` returned.
        percent: Show values as percentages (for metrics normalised to 0..1).
        value_label: What the values are, for the axes and hover text.
        labels: One name per confirmed cell for the hover text (default: each cell's `label`,
            e.g. "post layer=3, neuron=17").
        title: The figure title; by default the Spearman correlation and the top-k overlap.

    Raises:
        PatchingError: For anything but a Confirmation, and `labels` of the wrong length.

    >>> from transformer_lens_patching import Confirmation, ConfirmedCell
    >>> cells = tuple(ConfirmedCell("post", {"layer": 0, "neuron": n}, n / 4, n / 2, n / 4, n / 2) for n in (3, 2, 1))
    >>> fig = estimate_vs_exact(Confirmation(cells, unpatched=0.0, screened=10))
    >>> points = fig.data[1]
    >>> points.x, points.y, points.text[0]
    ((0.75, 0.5, 0.25), (1.5, 1.0, 0.5), 'post layer=0, neuron=3')
    >>> fig.layout.title.text
    'Estimated and exact change of 3 of 10 cells: Spearman 1.00, top-2 overlap 2 of 2'
    """
    if not isinstance(confirmation, Confirmation):
        raise PatchingError(
            f"estimate_vs_exact needs what confirm returns (a Confirmation), got {type(confirmation).__name__}."
        )
    cells = confirmation.cells
    labels = [cell.label for cell in cells] if labels is None else list(labels)
    if len(labels) != len(cells):
        raise PatchingError(f"labels needs one name per confirmed cell: {len(cells)}, got {len(labels)}.")
    estimated, exact = [cell.estimated_change for cell in cells], [cell.exact_change for cell in cells]
    number = _number_format(percent)
    fig = go.Figure()
    low, high = min([0.0, *estimated, *exact]), max([0.0, *estimated, *exact])
    fig.add_trace(
        go.Scatter(
            x=[low, high],
            y=[low, high],
            mode="lines",
            line={"color": "#bbb", "dash": "dash"},
            name="estimate = exact",
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=estimated,
            y=exact,
            mode="markers",
            text=labels,
            name="confirmed",
            marker={"size": 9, "color": "#2166ac"},
            hovertemplate=f"%{{text}}<br>estimated {value_label}=%{{x:{number}}}<br>exact {value_label}=%{{y:{number}}}"
            "<extra></extra>",
        )
    )
    default = (
        f"Estimated and exact {value_label} of {len(cells)} of {confirmation.screened} cells: Spearman "
        f"{confirmation.spearman:.2f}, top-{confirmation.overlap_size} overlap {confirmation.top_k_overlap} of "
        f"{confirmation.overlap_size}"
    )
    axis = {"tickformat": "~%"} if percent else {}
    fig.update_layout(title=title or default, showlegend=False, height=480)
    fig.update_xaxes(title_text=f"estimated {value_label}", zeroline=True, **axis)
    fig.update_yaxes(title_text=f"exact {value_label}", zeroline=True, **axis)
    return fig


def circuit_graph(circuit: Circuit, scores: EdgeScores | None = None, *, title: str | None = None) -> go.Figure:
    """A circuit's nodes placed by layer and its edges as lines, weighted and coloured by `scores`.

    The x axis is the layer: the embeddings at -1, each layer's heads at its number with the
    MLP half a layer to their right (it reads their outputs), the logits right of the last
    layer. Heads sit on y by head index, the MLPs above them, the embeddings and logits below.
    Only the nodes the circuit's edges join are drawn. An edge into a head's query, key or
    value ends at that head's marker, slightly above (q), at (k) or below (v) its centre, and
    its line is solid (q), dashed (k) or dotted (v). On grouped-query graphs an edge into a
    key/value head ends at each query head that shares it: one line per query head.

    Without scores every edge is a grey line of one width. With `scores`, an edge's width
    grows with its |score| (in steps, relative to the circuit's strongest edge) and its colour
    is its sign: blue positive, red negative, grey unscored (NaN); per-prompt scores count by
    their mean over prompts. Hovering a node names it and counts its edges (with their total
    score); hovering the middle of a line names its edge, its score and the positions it is
    kept at. Legend entries (by sign and input) show or hide those edges.

    Args:
        circuit: The circuit to draw.
        scores: Edge scores of the circuit's graph (e.g. those it was chosen from).
        title: The figure title; by default the circuit's size and the scores' method.

    Raises:
        PatchingError: For anything but a Circuit, and for scores that are not EdgeScores of
            the circuit's graph.

    >>> from transformer_lens_patching import Circuit, Edge, EdgeGraph, GraphNode
    >>> graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=True)
    >>> head = GraphNode("head", 0, head=1)
    >>> circuit = Circuit(graph, [Edge(GraphNode("embed"), GraphNode("head", 0, head=1, input="k")),
    ...                           Edge(head, GraphNode("logits"))])
    >>> fig = circuit_graph(circuit)
    >>> edges, nodes = fig.data[-2:]
    >>> nodes.text, nodes.x, nodes.y
    (('embed', '0.1', 'logits'), (-1.0, 0.0, 2.0), (-1.0, 1.0, -1.0))
    >>> edges.hovertext
    ('embed -> head 0.1 (k)', 'head 0.1 -> logits')
    >>> fig = circuit_graph(Circuit.from_scores(scores, 0.01), scores)  # fig.show() draws it
    >>> fig.layout.title.text  # doctest: +ELLIPSIS
    'Circuit of ... edges (atp scores)'
    """
    if not isinstance(circuit, Circuit):
        raise PatchingError(f"circuit_graph needs a Circuit, got {type(circuit).__name__}.")
    graph = circuit.graph
    values = _circuit_scores(circuit, scores)
    lines = [line for edge in circuit.edges for line in _edge_lines(edge, graph)]
    fig = go.Figure(_edge_traces(lines, values))
    fig.add_trace(
        go.Scatter(
            x=[(start[0] + end[0]) / 2 for _, start, end in lines],
            y=[(start[1] + end[1]) / 2 for _, start, end in lines],
            hovertext=[_edge_text(edge, graph, circuit, values) for edge, _, _ in lines],
            mode="markers",
            name="edges",
            marker={"size": 10, "color": "rgba(0,0,0,0)"},
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
        )
    )
    fig.add_trace(_node_trace(circuit, values))
    _circuit_axes(fig, graph)
    method = "" if scores is None else f" ({scores.method} scores)"
    fig.update_layout(
        title=title or f"Circuit of {len(circuit)} of {len(graph)} edges{method}",
        hovermode="closest",
        height=max(400, 160 + 40 * (graph.n_heads + 2)),
        legend={"title": {"text": "edges into"}},
    )
    return fig


def faithfulness_curves(
    curves: FaithfulnessCurve | MIBFaithfulness | Sequence[FaithfulnessCurve | MIBFaithfulness],
    *,
    title: str | None = None,
    log_x: bool = True,
) -> go.Figure:
    """Faithfulness against the fraction of edges kept, one line per curve, with dashed lines
    at 1 (the full model) and 0 (the empty circuit); hovering a point gives its edges kept and
    metric value; a curve computed with `uncertainty=True` gets 95% error bars (BCa bootstrap
    over prompts). A legend entry names the scores and their ranking, and gives the area under
    a `FaithfulnessCurve`; an `MIBFaithfulness` draws its two curves, labelled with MIB's CPR
    (signed ranking) and CMD (|score| ranking).

    Args:
        curves: A `FaithfulnessCurve` (what `faithfulness_curve` returns), an `MIBFaithfulness`
            (what `mib_faithfulness` returns), or a list of them.
        title: The figure title; by default "Faithfulness by circuit size".
        log_x: Put the fraction of edges on a log axis (MIB's sizes span 0.1% to 100%); a point
            at fraction 0 is then not drawn.

    Raises:
        PatchingError: For anything else, or an empty list.

    >>> fig = faithfulness_curves([mib_faithfulness(model, scores, clean, metric, new_input=corrupted)
    ...                            for scores in (atp_scores, ig_scores)])
    >>> [trace.name for trace in fig.data]  # doctest: +ELLIPSIS
    ['atp by signed score: CPR ...', 'atp by |score|: CMD ...', 'ig by signed score: CPR ...', ...]
    """
    fig = go.Figure()
    for curve, name in _named_curves(curves):
        hover = (
            "%{x:~%} of the edges: %{customdata[0]} kept<br>metric %{customdata[1]:.4g}<br>"
            f"faithfulness %{{y:.3f}}<extra>{curve.method}</extra>"
        )
        fig.add_trace(
            go.Scatter(
                x=list(curve.fractions),
                y=list(curve.faithfulness),
                mode="lines+markers",
                hovertemplate=hover,
                name=name,
                customdata=[[count, value] for count, value in zip(curve.edge_counts, curve.values)],
                error_y=_band(curve),
            )
        )
    for level, text in ((1, "full model"), (0, "empty circuit")):
        fig.add_hline(
            y=level,
            line={"dash": "dash", "color": "#888888", "width": 1},
            annotation_text=text,
            annotation_position="bottom right",
        )
    fig.update_layout(title=title or "Faithfulness by circuit size", height=480)
    fig.update_xaxes(title_text="fraction of edges kept", type="log" if log_x else "linear", tickformat="~%")
    fig.update_yaxes(title_text="faithfulness")
    return fig


def _band(curve: FaithfulnessCurve) -> dict | None:
    """Error bars from a curve's 95% intervals (BCa bootstrap over prompts), where it keeps the
    per-prompt values of at least two prompts."""
    if curve.samples is None or curve.samples.n < 2:
        return None
    low, high = curve.faithfulness_ci()
    values = curve.faithfulness
    return {
        "type": "data",
        "symmetric": False,
        "array": [hi - value for hi, value in zip(high, values)],
        "arrayminus": [value - lo for lo, value in zip(low, values)],
    }


def _named_curves(curves) -> list[tuple[FaithfulnessCurve, str]]:
    """Each curve to draw with its legend entry, refusing anything but curves, MIB summaries or a
    non-empty sequence of them."""
    drawable = (FaithfulnessCurve, MIBFaithfulness)
    listed = isinstance(curves, Sequence) and not isinstance(curves, str)
    items = [curves] if isinstance(curves, drawable) else list(curves) if listed else None
    if items and all(isinstance(item, drawable) for item in items):
        named = []
        for item in items:
            if isinstance(item, MIBFaithfulness):
                named += [
                    (item.signed, f"{item.signed.method} by signed score: CPR {item.cpr:.3f}"),
                    (item.absolute, f"{item.absolute.method} by |score|: CMD {item.cmd:.3f}"),
                ]
            else:
                named.append((item, f"{item.method} by {item.ranking}: area {item.area_under:.3f}"))
        return named
    if items is None:
        got = type(curves).__name__
    elif not items:
        got = "an empty list"
    else:
        got = f"a list holding {type(next(c for c in items if not isinstance(c, drawable))).__name__}"
    raise PatchingError(
        f"faithfulness_curves needs a FaithfulnessCurve (what faithfulness_curve returns), an "
        f"MIBFaithfulness (what mib_faithfulness returns) or a list of them, got {got}."
    )


def _circuit_scores(circuit: Circuit, scores: EdgeScores | None) -> dict[Edge, float]:
    """Each kept edge's score (the mean over prompts of per-prompt scores); empty without scores."""
    if scores is None:
        return {}
    if not isinstance(scores, EdgeScores):
        raise PatchingError(
            f"circuit_graph's scores must be EdgeScores (e.g. from attr_edges), got {type(scores).__name__}."
        )
    if scores.graph != circuit.graph:
        raise PatchingError(
            f"The scores are of {scores.graph!r}, the circuit of {circuit.graph!r}: pass scores of the "
            "circuit's own model."
        )
    values = scores.scores.float()
    values = values.mean(1) if values.ndim == 2 else values
    return {edge: float(values[circuit.graph.index(edge)]) for edge in circuit.edges}


def _edge_traces(lines: list[tuple], values: dict[Edge, float]) -> list[go.Scatter]:
    """The circuit's lines, one trace per style (sign, input, width), thinnest first; segments
    apart by None. One legend entry per sign and input."""
    strongest = max((abs(value) for value in values.values() if not math.isnan(value)), default=0.0)
    groups: dict[tuple[str, str, float], list[tuple]] = {}
    for edge, start, end in lines:
        groups.setdefault(_edge_style(edge, values.get(edge), strongest), []).append((start, end))
    traces, named = [], set()
    for (sign, into, width), segments in sorted(groups.items(), key=lambda item: item[0][2]):
        name = f"{sign} → {into}" if sign else f"→ {into}"
        traces.append(
            go.Scatter(
                x=[x for start, end in segments for x in (start[0], end[0], None)],
                y=[y for start, end in segments for y in (start[1], end[1], None)],
                mode="lines",
                name=name,
                legendgroup=name,
                showlegend=name not in named,
                hoverinfo="skip",
                opacity=0.75,
                line={"color": SIGN_COLOURS.get(sign, "#777777"), "width": width, "dash": EDGE_DASH[into]},
            )
        )
        named.add(name)
    return traces


def _edge_lines(edge: Edge, graph: EdgeGraph) -> list[tuple[Edge, tuple[float, float], tuple[float, float]]]:
    """(edge, start, end) of each line drawn for an edge: one per head marker its receiver belongs to."""
    start = _node_position(edge.sender, graph)
    offset = INPUT_OFFSET.get(edge.receiver.input, 0.0)
    ends = [_node_position(marker, graph) for marker in _receiver_markers(edge.receiver, graph)]
    return [(edge, start, (x, y + offset)) for x, y in ends]


def _edge_style(edge: Edge, value: float | None, strongest: float) -> tuple[str, str, float]:
    """(sign, what the receiver reads, line width) of an edge; sign "" without scores."""
    into = edge.receiver.input or edge.receiver.kind
    if value is None:
        return "", into, 2.0
    if math.isnan(value):
        return "unscored", into, MAX_WIDTH / WIDTH_STEPS
    step = max(1, math.ceil(WIDTH_STEPS * abs(value) / strongest)) if strongest else 1
    return ("positive" if value >= 0 else "negative"), into, MAX_WIDTH * step / WIDTH_STEPS


def _edge_text(edge: Edge, graph: EdgeGraph, circuit: Circuit, values: dict[Edge, float]) -> str:
    """An edge's hover text: its name, the query heads sharing a key/value head, its positions and score."""
    text = str(edge)
    if edge.receiver.kv_head:
        heads = _receiver_markers(edge.receiver, graph)
        text += f" (read by heads {heads[0].layer}.{heads[0].head}–{heads[-1].layer}.{heads[-1].head})"
    if edge in circuit.positions:
        text += f" at positions {list(circuit.positions[edge])}"
    return text + (f"<br>score {values[edge]:+.4g}" if edge in values else "")


def _receiver_markers(receiver: GraphNode, graph: EdgeGraph) -> list[GraphNode]:
    """The markers an edge into `receiver` ends at: its head (each query head sharing a
    key/value head), its MLP, the logits."""
    if receiver.kind != "head":
        return [receiver]
    if not receiver.kv_head:
        return [GraphNode("head", receiver.layer, head=receiver.head)]
    group = graph.n_heads // graph.n_kv_heads
    heads = range(receiver.head * group, (receiver.head + 1) * group)
    return [GraphNode("head", receiver.layer, head=head) for head in heads]


def _node_position(node: GraphNode, graph: EdgeGraph) -> tuple[float, float]:
    """(x, y) of a marker: a head at (layer, head), an MLP at (layer + MLP_SHIFT, n_heads), the
    embeddings at (-1, -1) and the logits at (n_layers, -1)."""
    if node.kind in ("embed", "logits"):
        return (-1.0 if node.kind == "embed" else float(graph.n_layers), -1.0)
    if node.kind == "mlp":
        return (node.layer + MLP_SHIFT, float(graph.n_heads))
    return (float(node.layer), float(node.head))


def _node_trace(circuit: Circuit, values: dict[Edge, float]) -> go.Scatter:
    """The markers of the nodes the circuit's edges join, in forward order, with their edge counts."""
    ins: dict[GraphNode, list[Edge]] = {}
    outs: dict[GraphNode, list[Edge]] = {}
    for edge in circuit.edges:
        outs.setdefault(edge.sender, []).append(edge)
        for marker in _receiver_markers(edge.receiver, circuit.graph):
            ins.setdefault(marker, []).append(edge)
    nodes = sorted(set(ins) | set(outs))
    texts = []
    for node in nodes:
        counts = []
        for word, edges in (("in", ins.get(node, [])), ("out", outs.get(node, []))):
            total = f" (score {sum(values[edge] for edge in edges):+.4g})" if values and edges else ""
            counts.append(f"{len(edges)} edge{'' if len(edges) == 1 else 's'} {word}{total}")
        texts.append(f"{node}<br>{', '.join(counts)}")
    positions = [_node_position(node, circuit.graph) for node in nodes]
    return go.Scatter(
        x=[x for x, _ in positions],
        y=[y for _, y in positions],
        mode="markers+text",
        name="nodes",
        text=[f"{n.layer}.{n.head}" if n.kind == "head" else str(n) for n in nodes],
        textposition="top center",
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
        showlegend=False,
        marker={
            "size": 16,
            "symbol": [NODE_STYLE[n.kind][0] for n in nodes],
            "color": [NODE_STYLE[n.kind][1] for n in nodes],
            "line": {"width": 1, "color": "white"},
        },
    )


def _circuit_axes(fig: go.Figure, graph: EdgeGraph) -> None:
    """Layer ticks on x (embed, 0, 1, ..., logits), head and MLP rows on y."""
    layers = list(range(graph.n_layers))
    fig.update_xaxes(
        title_text="layer",
        tickmode="array",
        tickvals=[-1, *layers, graph.n_layers],
        ticktext=["embed", *map(str, layers), "logits"],
        range=[-1.5, graph.n_layers + 0.5],
        zeroline=False,
    )
    rows = list(range(graph.n_heads)) + ([graph.n_heads] if graph.has_mlps else [])
    fig.update_yaxes(
        title_text="head",
        tickmode="array",
        tickvals=rows,
        zeroline=False,
        ticktext=[f"head {row}" if row < graph.n_heads else "mlp" for row in rows],
        range=[-1.6, graph.n_heads + 0.6],
    )


def _checked(results, function: str) -> dict[str, PatchResult]:
    """name -> result ("" for a lone result), refusing plain tensors, empty dicts and the metric's own dims."""
    panels = dict(results) if isinstance(results, Mapping) and results else {"": results}
    for name, result in panels.items():
        if not isinstance(result, PatchResult):
            got = "an empty dict" if isinstance(results, Mapping) and not results else type(result).__name__
            raise PatchingError(
                f"{function} needs a PatchResult, or a dict of them as act_patch returns for an IterNode; "
                f"{_name(name)} is {got}. Indexing or arithmetic on a PatchResult gives a plain tensor: use "
                "percent=True instead of scaling, restrict a sweep with IterNode(..., layers=..., heads=...), "
                "select with result.sel(...), or rebuild one with PatchResult(values, dims, coords)."
            )
        extra = [dim for dim in result.dims if dim == "batch" or dim.startswith("metric_")]
        if extra:
            what = "one value per prompt" if extra[0] == "batch" else "the metric's own output"
            raise PatchingError(
                f"{function} cannot plot {_name(name)}: its dims are {result.dims}, and {extra[0]!r} holds {what}. "
                f"Reduce it first, e.g. PatchResult(result.mean(-1), result.dims[:-1], result.coords), "
                f"or select one with result.sel({extra[0]}=0)."
            )
    return panels


def _heatmap_panels(
    results: Results, panels: dict[str, PatchResult], tokens: Sequence[str] | None
) -> dict[str, PatchResult]:
    """The 2-D result of each panel: a 3-D result split over its first dim, a dict of 1-D results stacked."""
    if isinstance(results, PatchResult) and results.ndim == 3:
        dim = results.dims[0]
        labels = _labels(results, dim, tokens)
        return {f"{dim} {label}": results.sel(**{dim: coord}) for coord, label in zip(results.coords[dim], labels)}
    if isinstance(results, Mapping) and all(result.ndim == 1 for result in panels.values()):
        (first_name, first), *_ = panels.items()
        for name, result in panels.items():
            if result.coords != first.coords:
                raise PatchingError(
                    f"heatmap draws a dict of 1-D results as the columns of one grid, so they need the same coords; "
                    f"{_name(name)} has {result.coords}, {_name(first_name)} has {first.coords}."
                )
        values = torch.stack([result.as_tensor() for result in panels.values()], dim=1)
        (dim,) = first.dims
        return {"": PatchResult(values, (dim, "component"), {dim: first.coords[dim], "component": tuple(panels)})}
    for name, result in panels.items():
        if result.ndim != 2:
            hint = {1: "use line", 3: "plot it on its own, one panel per coordinate of its first dim"}.get(
                result.ndim, "select coordinates with result.sel(...) first"
            )
            raise PatchingError(
                f"heatmap needs 2-D results (or one 3-D result, or a dict of 1-D results), but {_name(name)} "
                f"has dims {result.dims}: {hint}."
            )
    return panels


def _check_tokens(panels: dict[str, PatchResult], tokens: Sequence[str] | None) -> None:
    if tokens is None:
        return
    if isinstance(tokens, str) or not all(isinstance(token, str) for token in tokens):
        raise PatchingError("tokens must be a list of strings, one per position, e.g. model.to_str_tokens(prompt).")
    positions = [result.coords["seq_pos"] for result in panels.values() if "seq_pos" in result.dims]
    if not positions:
        dims = sorted({result.dims for result in panels.values()})
        raise PatchingError(f"tokens= labels the 'seq_pos' dim, but there is none here: the dims are {dims}.")
    for coords in positions:
        whole = coords == tuple(range(len(coords)))
        if len(tokens) <= max(coords) or (whole and len(tokens) != len(coords)):
            raise PatchingError(
                f"Got {len(tokens)} tokens for a result over positions {coords[0]}..{coords[-1]}: "
                "pass one token per position of the prompt, e.g. model.to_str_tokens(prompt)."
            )


def _y_of(result: PatchResult, y: str | None) -> str:
    """The dim a heatmap panel puts on its y axis: `y`, else `layer` where there is one, else the first."""
    return result.dim_for(y) if y else ("layer" if "layer" in result.dims else result.dims[0])


def _row_height(panels: dict[str, PatchResult], y: str | None) -> int:
    """Pixels per row of panels: 300, or enough for a tick per coordinate of a deep `EVERY_TICK` y axis."""
    ticked = [len(r.coords[_y_of(r, y)]) for r in panels.values() if _y_of(r, y) in EVERY_TICK]
    return max([300] + [80 + ROW_PIXELS * count for count in ticked])


def _every_tick(dim: str, labels: list) -> dict:
    """Axis settings that tick every coordinate of `dim`, for the dims of `EVERY_TICK`."""
    return {"tickmode": "array", "tickvals": labels} if dim in EVERY_TICK else {}


def _head_names(result: PatchResult, y_dim: str, x_dim: str) -> tuple[str, list[list[str]]] | None:
    """For a (layer, head) or (layer, kv_head) panel: what a cell is ("head") and each cell's
    "layer.head" name, in the panel's (y, x) order; None for other dims."""
    dims = {y_dim, x_dim}
    unit = next((dim for dim in ("head", "kv_head") if dim in dims), None)
    if "layer" not in dims or unit is None:
        return None
    rows, columns = result.coords[y_dim], result.coords[x_dim]
    if y_dim == "layer":
        names = [[f"{layer}.{head}" for head in columns] for layer in rows]
    else:
        names = [[f"{layer}.{head}" for layer in columns] for head in rows]
    return unit.replace("_", " "), names


def _labels(result: PatchResult, dim: str, tokens: Sequence[str] | None) -> list:
    """The coordinates of `dim`, as "position: token" for `seq_pos` when tokens are given."""
    if dim == "seq_pos" and tokens is not None:
        return [f"{position}: {tokens[position]}" for position in result.coords[dim]]
    return list(result.coords[dim])


def _title(value_label: str, word: str, panels: dict[str, PatchResult]) -> str:
    dims = dict.fromkeys(dim for result in panels.values() for dim in result.dims)
    return f"{value_label} {word} {' × '.join(dims)}"


def _name(name: str) -> str:
    return f"results[{name!r}]" if name else "this result"


def _number_format(percent: bool) -> str:
    return ".1%" if percent else ".4g"
