"""plots: figures labelled from PatchResult dims and coords, shared colour scales, percent formatting, errors."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
import typeguard

from transformer_lens_patching import PatchingError, PatchResult
from transformer_lens_patching.plots import heatmap, histogram, line

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
