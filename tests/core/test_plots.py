"""plots: figures labelled from PatchResult dims and coords, shared colour scales, percent formatting, errors."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
import typeguard

from transformer_lens_patching import (
    Circuit,
    Edge,
    EdgeGraph,
    EdgeScores,
    FaithfulnessCurve,
    GraphNode,
    MIBFaithfulness,
    PatchingError,
    PatchResult,
)
from transformer_lens_patching.plots import circuit_graph, faithfulness_curves, heatmap, histogram, line

TOKENS = ["<bos>", " When", " John"]


def grid(*dims: str, coords: dict | None = None, sizes: dict | None = None) -> PatchResult:
    """A result whose values are 0, 1, 2, ... minus a constant, so that some are negative."""
    sizes = {"seq_pos": 3, "layer": 2, "head": 4, "neuron": 5, "kv_head": 2, "batch": 6, **(sizes or {})}
    shape = [len(coords[dim]) if coords and dim in coords else sizes[dim] for dim in dims]
    values = torch.arange(float(torch.Size(shape).numel())).reshape(shape) - 3
    return PatchResult(values, dims, coords)


def table(result: PatchResult) -> list:
    return result.as_tensor().tolist()


# --- heatmap: axes, ticks and values from dims and coords ---


def test_layer_head_axes_and_values():
    result = grid("layer", "head")
    fig = heatmap(result)
    trace = fig.data[0]
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis.title.text == "head"
    assert trace.y == (0, 1) and trace.x == (0, 1, 2, 3)
    assert [list(row) for row in trace.z] == table(result)
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 at the top, as in the prior art's imshow


def test_restricted_coords_are_tick_values_not_indices():
    result = grid("layer", "head", coords={"layer": (4, 5), "head": (1, 7)})
    trace = heatmap(result).data[0]
    assert trace.y == (4, 5) and trace.x == (1, 7)
    assert [list(row) for row in trace.z] == table(result)


def test_layer_goes_on_y_even_when_it_is_the_second_dim():
    result = grid("seq_pos", "layer")
    fig = heatmap(result)
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis.title.text == "seq_pos"
    assert [list(row) for row in fig.data[0].z] == table(result.permute_dims("layer", "seq_pos"))


def test_y_chooses_the_vertical_dim():
    result = grid("layer", "neuron")
    fig = heatmap(result, y="neuron")
    assert fig.layout.yaxis.title.text == "neuron" and fig.layout.xaxis.title.text == "layer"
    assert fig.data[0].y == (0, 1, 2, 3, 4)
    assert [list(row) for row in fig.data[0].z] == table(result.permute_dims("neuron", "layer"))


def test_kv_head_results_are_labelled():
    fig = heatmap(grid("layer", "kv_head"))
    assert fig.layout.xaxis.title.text == "kv_head"
    assert "kv_head=%{x}" in fig.data[0].hovertemplate


def test_unknown_y_dim():
    with pytest.raises(
        PatchingError, match=r"y='head' is not a dim of this result: its dims are \('layer', 'neuron'\)"
    ):
        heatmap(grid("layer", "neuron"), y="head")


def test_hover_names_dims_and_value():
    template = heatmap(grid("layer", "head"), value_label="logit diff").data[0].hovertemplate
    assert "layer=%{y}" in template and "head=%{x}" in template and "logit diff=%{z:.4g}" in template


def test_token_labels_on_seq_pos():
    fig = heatmap(grid("seq_pos", "layer"), tokens=TOKENS)
    assert fig.data[0].x == ("0: <bos>", "1:  When", "2:  John")
    assert fig.data[0].y == (0, 1)


def test_diverging_colour_scale_centred_at_zero():
    fig = heatmap(grid("layer", "head"))
    assert fig.data[0].coloraxis == "coloraxis"
    assert fig.layout.coloraxis.cmid == 0
    scale = fig.layout.coloraxis.colorscale
    assert scale == go.Figure(layout={"coloraxis": {"colorscale": "RdBu"}}).layout.coloraxis.colorscale
    assert scale[0][1] != scale[-1][1]  # diverging: different colours at each end


def test_title_default_and_override():
    assert heatmap(grid("layer", "head")).layout.title.text == "value by layer × head"
    assert heatmap(grid("layer", "head"), title="Direct effect").layout.title.text == "Direct effect"


# --- percent ---


def test_percent_formats_colour_bar_and_hover_without_changing_values():
    result = PatchResult(grid("layer", "head").as_tensor() / 10, ("layer", "head"))
    plain, percent = heatmap(result), heatmap(result, percent=True)
    assert percent.layout.coloraxis.colorbar.tickformat.endswith("%")
    assert plain.layout.coloraxis.colorbar.tickformat is None
    assert "%{z:.1%}" in percent.data[0].hovertemplate
    assert percent.data[0].z == plain.data[0].z


def test_percent_on_histogram_and_line():
    hist = histogram(grid("layer", "head"), percent=True)
    assert hist.layout.xaxis.tickformat.endswith("%") and hist.layout.xaxis.hoverformat.endswith("%")
    by_layer = line(grid("layer"), percent=True)
    assert by_layer.layout.yaxis.tickformat.endswith("%")
    assert "%{y:.1%}" in by_layer.data[0].hovertemplate
    assert histogram(grid("layer", "head")).layout.xaxis.tickformat is None


# --- facets ---


def test_components_side_by_side_share_one_colour_scale():
    names = ["resid_pre", "attn_out", "mlp_out"]
    results = {
        name: PatchResult(grid("seq_pos", "layer") * (i + 1), ("seq_pos", "layer")) for i, name in enumerate(names)
    }
    fig = heatmap(results, tokens=TOKENS, percent=True)
    assert len(fig.data) == 3
    assert [annotation.text for annotation in fig.layout.annotations] == names
    assert {trace.coloraxis for trace in fig.data} == {"coloraxis"}
    layout = fig.to_plotly_json()["layout"]
    assert [key for key in layout if key.startswith("coloraxis")] == ["coloraxis"]  # one scale for all panels
    assert len({trace.xaxis for trace in fig.data}) == 3  # three panels
    for name, trace in zip(names, fig.data):
        assert trace.x == ("0: <bos>", "1:  When", "2:  John")
        assert [list(row) for row in trace.z] == table(results[name].permute_dims("layer", "seq_pos"))
        assert name in trace.hovertemplate
    assert fig.layout.xaxis2.title.text == "seq_pos" and fig.layout.yaxis3.title.text == "layer"


def test_five_head_components_in_one_row():
    results = {name: grid("layer", "head") for name in ["z", "q", "k", "v", "pattern"]}
    fig = heatmap(results)
    assert [annotation.text for annotation in fig.layout.annotations] == ["z", "q", "k", "v", "pattern"]
    assert len({fig.layout[trace.yaxis.replace("y", "yaxis")].domain for trace in fig.data}) == 1


def test_single_component_dict_is_titled():
    fig = heatmap({"z": grid("layer", "head")})
    assert [annotation.text for annotation in fig.layout.annotations] == ["z"]


def test_three_dims_facet_over_the_first():
    result = grid("seq_pos", "layer", "head")
    fig = heatmap(result, tokens=TOKENS)
    assert [annotation.text for annotation in fig.layout.annotations] == [
        "seq_pos 0: <bos>",
        "seq_pos 1:  When",
        "seq_pos 2:  John",
    ]
    for position, trace in enumerate(fig.data):
        assert [list(row) for row in trace.z] == table(result.sel(seq_pos=position))
        assert trace.coloraxis == "coloraxis"
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis.title.text == "head"


def test_facets_wrap_into_rows_of_five_and_hide_empty_cells():
    fig = heatmap(grid("seq_pos", "layer", "head", sizes={"seq_pos": 7}))
    assert len(fig.data) == 7
    assert fig.layout.xaxis6.domain == fig.layout.xaxis.domain  # panel 6 starts the second row
    assert [fig.layout[f"xaxis{i}"].visible for i in range(7, 11)] == [None, False, False, False]


def test_dict_of_one_dim_results_becomes_columns():
    results = {
        name: PatchResult(torch.tensor([1.0, -2.0]) * (i + 1), ("layer",), {"layer": (3, 4)})
        for i, name in enumerate(["resid_pre", "attn_out", "mlp_out"])
    }
    fig = heatmap(results)
    trace = fig.data[0]
    assert len(fig.data) == 1
    assert trace.x == ("resid_pre", "attn_out", "mlp_out") and trace.y == (3, 4)
    assert [list(row) for row in trace.z] == [[1.0, 2.0, 3.0], [-2.0, -4.0, -6.0]]
    assert fig.layout.xaxis.title.text == "component"


def test_dict_of_one_dim_results_needs_the_same_coords():
    results = {"a": grid("layer"), "b": grid("layer", coords={"layer": (5, 6)})}
    with pytest.raises(PatchingError, match=r"same coords; results\['b'\] has \{'layer': \(5, 6\)\}"):
        heatmap(results)


# --- line and histogram ---


def test_line_of_one_dim_result():
    result = grid("layer", coords={"layer": (2, 5)})
    fig = line(result, value_label="logit diff")
    assert fig.data[0].x == (2, 5) and fig.data[0].y == tuple(result.tolist())
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "logit diff"
    assert "layer=%{x}" in fig.data[0].hovertemplate


def test_line_one_trace_per_component_with_tokens():
    results = {"resid_pre": grid("seq_pos"), "attn_out": grid("seq_pos")}
    fig = line(results, tokens=TOKENS)
    assert [trace.name for trace in fig.data] == ["resid_pre", "attn_out"]
    assert fig.data[1].x == ("0: <bos>", "1:  When", "2:  John")
    assert fig.layout.showlegend


def test_line_refuses_two_dims():
    with pytest.raises(
        PatchingError, match=r"line needs 1-D results, but this result has dims \('layer', 'head'\): use heatmap"
    ):
        line(grid("layer", "head"))


def test_histogram_counts_every_cell():
    result = grid("layer", "head")
    fig = histogram(result, value_label="logit diff")
    assert sorted(fig.data[0].x) == sorted(result.flatten().tolist())
    assert fig.layout.xaxis.title.text == "logit diff" and fig.layout.yaxis.title.text == "count"
    assert fig.layout.title.text == "logit diff over layer × head"


def test_histogram_overlays_components():
    fig = histogram({"z": grid("layer", "head"), "v": grid("layer", "head")}, nbins=10)
    assert [trace.name for trace in fig.data] == ["z", "v"]
    assert fig.layout.barmode == "overlay" and fig.data[0].nbinsx == 10


# --- errors ---


@pytest.mark.parametrize("plot", [heatmap, line, histogram])
def test_per_prompt_batch_dim_refused(plot):
    result = grid("layer", "batch") if plot is line else grid("layer", "head", "batch")
    with pytest.raises(
        PatchingError, match=r"'batch' holds one value per prompt.*result\.mean\(-1\).*result\.sel\(batch=0\)"
    ):
        plot(result)


def test_per_prompt_dim_in_a_dict_names_the_component():
    with pytest.raises(
        PatchingError, match=r"heatmap cannot plot results\['z'\]: its dims are \('layer', 'head', 'batch'\)"
    ):
        heatmap({"z": grid("layer", "head", "batch")})


def test_metric_output_dim_refused():
    result = PatchResult(torch.zeros(2, 3), ("layer", "metric_0"))
    with pytest.raises(PatchingError, match=r"'metric_0' holds the metric's own output"):
        line(result)


def test_the_suggested_reduction_plots():
    result = grid("layer", "head", "batch")
    heatmap(PatchResult(result.mean(-1), result.dims[:-1], result.coords))
    heatmap(result.sel(batch=0))


def test_plain_tensor_refused_with_a_hint():
    with (
        typeguard.suppress_type_checks(),
        pytest.raises(PatchingError, match=r"needs a PatchResult.*is Tensor.*percent=True"),
    ):
        heatmap(grid("layer", "head") * 100)


def test_empty_dict_refused():
    with typeguard.suppress_type_checks(), pytest.raises(PatchingError, match=r"is an empty dict"):
        histogram({})


def test_heatmap_of_one_dim_result_suggests_line():
    with pytest.raises(PatchingError, match=r"this result has dims \('layer',\): use line"):
        heatmap(grid("layer"))


def test_heatmap_of_four_dims_refused():
    result = PatchResult(torch.zeros(1, 1, 1, 1), ("seq_pos", "layer", "head", "neuron"))
    with pytest.raises(PatchingError, match=r"has dims \('seq_pos', 'layer', 'head', 'neuron'\)"):
        heatmap(result)


def test_three_dim_result_in_a_dict_refused():
    with pytest.raises(
        PatchingError, match=r"results\['z'\] has dims \('seq_pos', 'layer', 'head'\): plot it on its own"
    ):
        heatmap({"z": grid("seq_pos", "layer", "head"), "q": grid("seq_pos", "layer", "head")})


@pytest.mark.parametrize(
    "tokens, match",
    [
        (TOKENS[:2], r"Got 2 tokens for a result over positions 0\.\.2"),
        (TOKENS + ["x"], r"Got 4 tokens for a result over positions 0\.\.2"),
        ("abc", r"tokens must be a list of strings"),
    ],
)
def test_tokens_must_fit_seq_pos(tokens, match):
    with pytest.raises(PatchingError, match=match):
        heatmap(grid("seq_pos", "layer"), tokens=tokens)


def test_tokens_need_a_seq_pos_dim():
    with pytest.raises(PatchingError, match=r"tokens= labels the 'seq_pos' dim, but there is none"):
        heatmap(grid("layer", "head"), tokens=TOKENS)


# --- figures are returned, not shown, and save with plotly's own writers ---


def test_figures_are_returned_not_shown_and_save(monkeypatch, tmp_path):
    monkeypatch.setattr(go.Figure, "show", lambda *args, **kwargs: pytest.fail("a plot function called show()"))
    figures = [
        heatmap({"resid_pre": grid("seq_pos", "layer"), "mlp_out": grid("seq_pos", "layer")}, tokens=TOKENS),
        heatmap(grid("seq_pos", "layer", "head"), percent=True),
        line(grid("layer")),
        histogram(grid("layer", "neuron")),
    ]
    for index, fig in enumerate(figures):
        assert isinstance(fig, go.Figure)
        assert "plotly" in fig.to_html(include_plotlyjs=False)
        path = tmp_path / f"figure{index}.html"
        fig.write_html(path, include_plotlyjs=False)
        assert path.stat().st_size > 0


# --- circuit_graph: nodes by layer, edges as lines weighted and coloured by score ---

GRAPH = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=True)
GROUPED = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2, has_mlps=False)
EMBED, LOGITS = GraphNode("embed"), GraphNode("logits")


def head(layer: int, index: int, into: str | None = None, kv: bool = False) -> GraphNode:
    return GraphNode("head", layer, head=index, input=into, kv_head=kv)


def nodes_of(fig: go.Figure) -> dict[str, tuple[float, float]]:
    """Each drawn node's name (the first line of its hover text) -> its (x, y)."""
    (trace,) = [t for t in fig.data if t.name == "nodes"]
    return {text.split("<br>")[0]: (x, y) for text, x, y in zip(trace.hovertext, trace.x, trace.y)}


def line_traces(fig: go.Figure) -> list:
    return [t for t in fig.data if t.mode == "lines"]


def segments(trace) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The (start, end) of each line of a trace whose lines are separated by None."""
    points = list(zip(trace.x, trace.y))
    found = []
    for i in range(0, len(points), 3):
        assert points[i + 2] == (None, None)
        found.append((points[i], points[i + 1]))
    return found


def edge_styles(fig: go.Figure) -> dict[str, list]:
    """An edge's name -> the line traces drawing it, matched by the hover point in each line's middle."""
    (hover,) = [t for t in fig.data if t.name == "edges"]
    styles: dict[str, list] = {}
    for text, x, y in zip(hover.hovertext, hover.x, hover.y):
        drawn = [
            t
            for t in line_traces(fig)
            for a, b in segments(t)
            if abs((a[0] + b[0]) / 2 - x) < 1e-9 and abs((a[1] + b[1]) / 2 - y) < 1e-9
        ]
        assert len(drawn) == 1, text
        styles.setdefault(text.split("<br>")[0], []).append(drawn[0])
    return styles


def scored(graph: EdgeGraph, values: dict[Edge, float], extra_dim: int | None = None) -> EdgeScores:
    scores = torch.zeros(len(graph))
    for edge, value in values.items():
        scores[graph.index(edge)] = value
    if extra_dim:
        scores = scores[:, None] + torch.arange(extra_dim) - (extra_dim - 1) / 2  # per-prompt, same mean
    return EdgeScores(graph, scores, "atp", 0.0)


def test_circuit_graph_draws_the_joined_nodes_placed_by_layer():
    edges = [
        Edge(EMBED, head(0, 1, "q")),
        Edge(head(0, 1), GraphNode("mlp", 0)),
        Edge(GraphNode("mlp", 0), head(1, 0, "v")),
        Edge(head(1, 0), LOGITS),
        Edge(EMBED, LOGITS),
    ]
    fig = circuit_graph(Circuit(GRAPH, edges))
    # embeddings left of layer 0, logits right of the last layer, heads by index, the MLP above them
    assert nodes_of(fig) == {
        "embed": (-1, -1),
        "head 0.1": (0, 1),
        "mlp 0": (0.5, 2),
        "head 1.0": (1, 0),
        "logits": (2, -1),
    }
    assert fig.layout.xaxis.ticktext == ("embed", "0", "1", "logits")
    assert fig.layout.xaxis.tickvals == (-1, 0, 1, 2)


def test_circuit_graph_draws_exactly_the_nodes_its_edges_join():
    scores = EdgeScores(GRAPH, torch.linspace(-1, 1, len(GRAPH)) ** 3, "atp", 0.0)
    circuit = Circuit.from_scores(scores, 9, prune=False)
    expected = set()
    for edge in circuit.edges:
        receiver = edge.receiver
        marker = head(receiver.layer, receiver.head) if receiver.kind == "head" else receiver
        expected |= {str(edge.sender), str(marker)}
    drawn = nodes_of(circuit_graph(circuit, scores))
    assert len(drawn) == len(expected) and set(drawn) == expected
    assert len(circuit_graph(circuit, scores).data[-1].x) == len(expected)


def test_edges_run_from_sender_to_the_receiving_heads_marker_with_the_input_visible():
    edges = [Edge(EMBED, head(1, 1, part)) for part in ("q", "k", "v")] + [Edge(head(0, 0), head(1, 1, "k"))]
    fig = circuit_graph(Circuit(GRAPH, edges))
    by_input = {trace.name: trace for trace in line_traces(fig)}
    assert set(by_input) == {"→ q", "→ k", "→ v"}
    assert len({trace.line.dash for trace in by_input.values()}) == 3  # q, k and v lines look different
    ends = {}
    for name, trace in by_input.items():
        for start, end in segments(trace):
            assert start in {(-1, -1), (0, 0)}  # the embeddings' or head 0.0's marker
            assert end[0] == 1 and abs(end[1] - 1) < 0.25  # at head 1.1's marker
            ends.setdefault(name, set()).add(end[1])
    (q,), (k,), (v,) = ends["→ q"], ends["→ k"], ends["→ v"]
    assert q > k > v  # q above k above v
    hover = [text for text in fig.data[-2].hovertext]
    assert sorted(hover) == sorted(str(edge) for edge in edges)


def test_grouped_query_edges_end_at_every_query_head_sharing_the_key_value_head():
    edge = Edge(EMBED, head(1, 1, "k", kv=True))  # key/value head 1.1 serves query heads 1.2 and 1.3
    fig = circuit_graph(Circuit(GROUPED, [edge, Edge(head(1, 2), LOGITS)]))
    assert nodes_of(fig) == {"embed": (-1, -1), "head 1.2": (1, 2), "head 1.3": (1, 3), "logits": (2, -1)}
    (into_k,) = [trace for trace in line_traces(fig) if trace.name == "→ k"]
    assert sorted(end for _, end in segments(into_k)) == [(1, 2), (1, 3)]
    texts = [text for text in fig.data[-2].hovertext if text.startswith(str(edge))]
    assert len(texts) == 2 and all("1.2–1.3" in text for text in texts)


def test_line_widths_grow_with_abs_score_and_colours_follow_the_sign():
    values = {
        Edge(head(1, 0), LOGITS): 4.0,
        Edge(head(0, 1), LOGITS): -2.0,
        Edge(EMBED, head(1, 0, "q")): 1.0,
        Edge(head(0, 0), GraphNode("mlp", 1)): -0.4,
    }
    scores = scored(GRAPH, values)
    styles = edge_styles(circuit_graph(Circuit(GRAPH, values), scores))
    widths = [styles[str(edge)][0].line.width for edge in sorted(values, key=lambda e: -abs(values[e]))]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4
    colours = {edge: styles[str(edge)][0].line.color for edge in values}
    positive = {colours[edge] for edge in values if values[edge] > 0}
    negative = {colours[edge] for edge in values if values[edge] < 0}
    assert len(positive) == len(negative) == 1 and positive != negative

    def rgb(colour: str) -> tuple[int, ...]:
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))

    (up,), (down,) = map(rgb, positive), map(rgb, negative)
    assert up[2] > up[0] and down[0] > down[2]  # blue positive, red negative, as the heatmaps' RdBu scale


def test_hover_gives_each_edges_name_and_score_and_each_nodes_total():
    values = {Edge(head(1, 0), LOGITS): 0.25, Edge(EMBED, head(1, 0, "v")): -1.5}
    fig = circuit_graph(Circuit(GRAPH, values), scored(GRAPH, values))
    assert sorted(fig.data[-2].hovertext) == sorted(f"{edge}<br>score {value:+.4g}" for edge, value in values.items())
    (node,) = [text for text in fig.data[-1].hovertext if text.startswith("head 1.0")]
    assert "1 edge in (score -1.5)" in node and "1 edge out (score +0.25)" in node


def test_per_prompt_scores_count_by_their_mean():
    values = {Edge(head(1, 0), LOGITS): 0.5, Edge(head(0, 0), LOGITS): -3.0}
    fig = circuit_graph(Circuit(GRAPH, values), scored(GRAPH, values, extra_dim=3))
    assert sorted(fig.data[-2].hovertext) == sorted(f"{edge}<br>score {value:+.4g}" for edge, value in values.items())


def test_unscored_edges_are_grey_and_thin():
    values = {Edge(head(1, 0), LOGITS): float("nan"), Edge(head(0, 0), LOGITS): 2.0}
    styles = edge_styles(circuit_graph(Circuit(GRAPH, values), scored(GRAPH, values)))
    nan, strong = styles[str(Edge(head(1, 0), LOGITS))][0], styles[str(Edge(head(0, 0), LOGITS))][0]
    assert nan.name.startswith("unscored") and nan.line.width < strong.line.width
    red, green, blue = (int(nan.line.color[i : i + 2], 16) for i in (1, 3, 5))
    assert red == green == blue


def test_without_scores_every_edge_looks_the_same_apart_from_its_input():
    circuit = Circuit(GRAPH, [Edge(head(0, 0), LOGITS), Edge(EMBED, head(1, 1, "k")), Edge(EMBED, GraphNode("mlp", 0))])
    fig = circuit_graph(circuit)
    assert len({(trace.line.width, trace.line.color) for trace in line_traces(fig)}) == 1
    assert not any("score" in text for text in fig.data[-2].hovertext)
    assert fig.layout.title.text == "Circuit of 3 of 46 edges"
    assert circuit_graph(circuit, title="IOI").layout.title.text == "IOI"


def test_positions_of_position_restricted_edges_are_in_the_hover():
    edge = Edge(head(0, 0), LOGITS)
    fig = circuit_graph(Circuit(GRAPH, [edge], positions={edge: [2, -1]}))
    assert fig.data[-2].hovertext == (f"{edge} at positions [-1, 2]",)


def test_hundreds_of_edges_take_a_few_traces_and_one_legend_entry_per_style():
    graph = EdgeGraph(n_layers=4, n_heads=4, n_kv_heads=4, has_mlps=True)
    scores = EdgeScores(graph, torch.randn(len(graph), generator=torch.Generator().manual_seed(0)), "ig", 0.0)
    fig = circuit_graph(Circuit.full(graph), scores)
    lines = line_traces(fig)
    assert len(graph) > 400
    assert sum(len(segments(trace)) for trace in lines) == len(graph) == len(fig.data[-2].hovertext)
    assert len(lines) <= 2 * 5 * 6  # sign x what the receiver reads x width step
    shown = [trace.name for trace in lines if trace.showlegend]
    assert sorted(shown) == sorted({trace.name for trace in lines})
    assert fig.layout.title.text == f"Circuit of {len(graph)} of {len(graph)} edges (ig scores)"


def test_empty_circuit_draws_no_nodes():
    fig = circuit_graph(Circuit.empty(GRAPH))
    assert len(fig.data[-1].x) == 0 and not line_traces(fig)


def test_circuit_graph_refuses_other_input():
    circuit = Circuit(GRAPH, [Edge(head(0, 0), LOGITS)])
    with typeguard.suppress_type_checks():
        with pytest.raises(PatchingError, match=r"circuit_graph needs a Circuit, got list"):
            circuit_graph(circuit.edges)
        with pytest.raises(PatchingError, match=r"scores must be EdgeScores.*got Tensor"):
            circuit_graph(circuit, torch.zeros(len(GRAPH)))
    other = EdgeScores(GROUPED, torch.zeros(len(GROUPED)), "atp", 0.0)
    with pytest.raises(PatchingError, match=r"The scores are of EdgeGraph\(n_layers=2, n_heads=4.*the circuit of"):
        circuit_graph(circuit, other)


# --- faithfulness_curves ---


def curve(method: str, fractions: tuple[float, ...], values: tuple[float, ...], full=2.0, empty=-2.0, absolute=True):
    circuits = tuple(Circuit(GRAPH, GRAPH.edges[: int(f * len(GRAPH))]) for f in fractions)
    return FaithfulnessCurve(method, fractions, circuits, values, full, empty, absolute)


def trapezoid(xs, ys) -> float:
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


def test_curve_points_are_fractions_and_faithfulness():
    atp = curve("atp", (0.1, 0.5, 1.0), (-1.0, 1.0, 2.0))
    fig = faithfulness_curves(atp)
    (trace,) = fig.data
    faithfulness = [(v + 2.0) / 4.0 for v in (-1.0, 1.0, 2.0)]
    assert trace.x == (0.1, 0.5, 1.0) and list(trace.y) == faithfulness
    assert trace.mode == "lines+markers"
    assert trace.name == f"atp by |score|: area {trapezoid([0.1, 0.5, 1.0], faithfulness):.3f}"
    assert [list(point) for point in trace.customdata] == [[4, -1.0], [23, 1.0], [46, 2.0]]
    assert "kept" in trace.hovertemplate and "metric %{customdata[1]" in trace.hovertemplate


def test_one_line_per_curve_with_reference_lines_and_a_log_axis():
    curves = [curve("atp", (0.01, 0.1, 1.0), (0.0, 1.0, 2.0)), curve("ig", (0.01, 0.1, 1.0), (1.0, 1.5, 2.0))]
    fig = faithfulness_curves(curves)
    assert [trace.name.split(":")[0] for trace in fig.data] == ["atp by |score|", "ig by |score|"]
    assert sorted((shape.y0, shape.y1, shape.line.dash) for shape in fig.layout.shapes) == [
        (0, 0, "dash"),
        (1, 1, "dash"),
    ]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.title.text == "faithfulness"
    assert faithfulness_curves(curves, log_x=False).layout.xaxis.type == "linear"
    assert fig.layout.title.text == "Faithfulness by circuit size"
    assert faithfulness_curves(curves, title="IOI").layout.title.text == "IOI"


def test_mib_summaries_draw_both_curves_labelled_with_cpr_and_cmd():
    signed = curve("atp", (0.1, 0.5, 1.0), (0.0, 1.0, 2.0), absolute=False)
    absolute = curve("atp", (0.1, 0.5, 1.0), (-1.0, 0.0, 2.0))
    fig = faithfulness_curves([MIBFaithfulness(signed, absolute)])
    cpr = trapezoid([0.1, 0.5, 1.0], [0.5, 0.75, 1.0])
    cmd = trapezoid([0.1, 0.5, 1.0], [1 - 0.25, 1 - 0.5, 0.0])
    names = [f"atp by signed score: CPR {cpr:.3f}", f"atp by |score|: CMD {cmd:.3f}"]
    assert [trace.name for trace in fig.data] == names
    assert [list(trace.y) for trace in fig.data] == [[0.5, 0.75, 1.0], [0.25, 0.5, 1.0]]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"atp": None}, r"got dict"),
        ([], r"got an empty list"),
        (["atp"], r"got a list holding str"),
        ("atp", r"got str"),
    ],
)
def test_faithfulness_curves_refuses_other_input(bad, match):
    if isinstance(bad, dict):
        bad = {"atp": curve("atp", (0.1, 1.0), (0.0, 2.0))}
    with typeguard.suppress_type_checks(), pytest.raises(PatchingError, match=r"needs a FaithfulnessCurve.*" + match):
        faithfulness_curves(bad)


def test_circuit_figures_save(tmp_path):
    values = {Edge(head(1, 0), LOGITS): 0.25, Edge(EMBED, head(1, 1, "k", kv=True)): -1.5}
    grouped = Circuit(GROUPED, values)
    for index, fig in enumerate(
        [circuit_graph(grouped, scored(GROUPED, values)), faithfulness_curves(curve("atp", (0.1, 1.0), (0.0, 2.0)))]
    ):
        path = tmp_path / f"figure{index}.html"
        fig.write_html(path, include_plotlyjs=False)
        assert path.stat().st_size > 0


def test_results_with_uncertainty_show_their_standard_errors():
    from transformer_lens_patching import PatchResult, plots

    values = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    result = PatchResult.from_per_prompt(PatchResult(values, ("layer", "head", "batch")), baseline=torch.zeros(6))
    expected = (values.double().std(-1) / 6**0.5).float()
    figure = plots.heatmap(result)
    assert "standard error" in figure.data[0].hovertemplate
    torch.testing.assert_close(torch.tensor(figure.data[0].customdata), expected)
    bars = plots.line(result.sel(head=1)).data[0].error_y.array
    torch.testing.assert_close(torch.tensor(bars), expected[:, 1])
    assert plots.line(PatchResult(values[:, 0, 0], ("layer",))).data[0].error_y.array is None
