"""PatchResult: named dims and coordinates, selection, export, the dim orders of each sweep, the dims
a metric's values get, and k and v results (per key/value head) selected like heads."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs, raises
from tests.oracles.reference import full_cache, naive_act_patch
from transformer_lens_patching import IterNode, Node, PatchingError, PatchResult, act_patch, path_patch


@pytest.fixture
def grid() -> PatchResult:
    """Values 0..5 on layers (4, 5) by heads (0, 1, 2)."""
    return PatchResult(torch.arange(6.0).reshape(2, 3), ("layer", "head"), {"layer": (4, 5)})


# --- PatchResult on its own ---


def test_dims_and_coords(grid):
    assert grid.dims == ("layer", "head")
    assert grid.coords == {"layer": (4, 5), "head": (0, 1, 2)}
    assert grid.shape == (2, 3)


def test_bad_dim_names_rejected():
    with pytest.raises(PatchingError, match=r"3 dim names .* for a 2-d tensor"):
        PatchResult(torch.zeros(2, 3), ("seq_pos", "layer", "head"))


def test_bad_coords_rejected():
    with pytest.raises(PatchingError, match=r"coords\['layer'\] has 3 entries for a dim of size 2"):
        PatchResult(torch.zeros(2, 3), ("layer", "head"), {"layer": (0, 1, 2)})


def test_sel_by_coordinate_not_index(grid):
    row = grid.sel(layer=5)
    assert isinstance(row, PatchResult) and row.dims == ("head",) and row.coords == {"head": (0, 1, 2)}
    assert torch.equal(row.as_tensor(), torch.tensor([3.0, 4.0, 5.0]))
    cell = grid.sel(layer=5, head=1)
    assert type(cell) is torch.Tensor and cell.ndim == 0 and cell.item() == 4.0
    assert grid.sel(head=2).coords == {"layer": (4, 5)}
    assert torch.equal(grid.sel(head=2).as_tensor(), torch.tensor([2.0, 5.0]))


def test_sel_unknown_coordinate(grid):
    with pytest.raises(PatchingError, match=r"layer=0 is not in this result; layer runs over \[4, 5\]"):
        grid.sel(layer=0)


def test_sel_unknown_dim(grid):
    with pytest.raises(PatchingError, match=r"No dim 'neuron': this result has dims \('layer', 'head'\)"):
        grid.sel(neuron=0)


def test_permute_dims(grid):
    swapped = grid.permute_dims("head", "layer")
    assert swapped.dims == ("head", "layer")
    assert swapped.coords == {"head": (0, 1, 2), "layer": (4, 5)}
    assert torch.equal(swapped.as_tensor(), torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))
    assert swapped.sel(layer=5, head=1).item() == 4.0


def test_permute_dims_needs_every_dim_once(grid):
    with pytest.raises(PatchingError, match=r"permute_dims needs each of"):
        grid.permute_dims("head")
    with pytest.raises(PatchingError, match=r"permute_dims needs each of"):
        grid.permute_dims("head", "head")


def test_to_dataframe(grid):
    frame = grid.to_dataframe()
    assert list(frame.columns) == ["layer", "head", "value"]
    assert len(frame) == 6
    assert frame[["layer", "head"]].values.tolist() == [[4, 0], [4, 1], [4, 2], [5, 0], [5, 1], [5, 2]]
    assert frame["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert frame.loc[(frame["layer"] == 5) & (frame["head"] == 1), "value"].item() == 4.0


def test_repr_shows_dim_names(grid):
    text = repr(grid)
    assert "PatchResult" in text and "layer=2" in text and "head=3" in text


def test_pickle_round_trip(grid):
    loaded = pickle.loads(pickle.dumps(grid))
    assert isinstance(loaded, PatchResult)
    assert loaded.dims == grid.dims and loaded.coords == grid.coords
    assert torch.equal(loaded.as_tensor(), grid.as_tensor())


def test_arithmetic_gives_plain_tensors(grid):
    values = torch.arange(6.0).reshape(2, 3)
    for result, expected in [
        (grid * 2, values * 2),
        (grid + grid, values + values),
        (grid - grid.mean(), values - 2.5),
        (grid[1], values[1]),
        (grid.T, values.T),
        (torch.softmax(grid, dim=-1), torch.softmax(values, dim=-1)),
    ]:
        assert type(result) is torch.Tensor
        assert torch.allclose(result, expected)
    assert grid.max().item() == 5.0 and grid.argmax().item() == 5


# --- dim orders of real sweeps ---


def test_z_sweep_is_layer_head(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    result = act_patch(model, orig, IterNode("z"), metric, new_input=new)["z"]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.dims == ("layer", "head") and result.shape == (n_layers, n_heads)
    assert result.coords == {"layer": tuple(range(n_layers)), "head": tuple(range(n_heads))}
    cache = full_cache(model, new)
    for layer, head in [(n_layers - 1, 0), (1, n_heads - 1)]:
        expected = naive_act_patch(model, orig, [Node("z", layer, head=head)], metric, cache)
        assert_close(result[layer, head], expected)
        assert_close(result.sel(layer=layer, head=head), expected)


def test_resid_pre_each_position_is_seq_pos_layer(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    layers = [0, 2, 3]
    result = act_patch(model, orig, IterNode("resid_pre", seq_pos="each", layers=layers), metric, new_input=new)[
        "resid_pre"
    ]
    assert result.dims == ("seq_pos", "layer") and result.shape == (orig.shape[1], len(layers))
    assert result.coords == {"seq_pos": tuple(range(orig.shape[1])), "layer": tuple(layers)}
    cache = full_cache(model, new)
    for pos, layer in [(6, 2), (4, 3), (6, 0)]:
        expected = naive_act_patch(model, orig, [Node("resid_pre", layer, seq_pos=pos)], metric, cache)
        assert_close(result[pos, layers.index(layer)], expected)
        assert_close(result.sel(seq_pos=pos, layer=layer), expected)


def test_resid_pre_full_each_position_sweep_shape(gqa_model):
    orig, new = make_inputs(gqa_model)
    result = act_patch(gqa_model, orig, IterNode("resid_pre", seq_pos="each"), logit_diff_metric(), new_input=new)[
        "resid_pre"
    ]
    assert result.dims == ("seq_pos", "layer") and result.shape == (orig.shape[1], gqa_model.cfg.n_layers)


def test_post_sweep_is_layer_neuron(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    result = act_patch(model, orig, IterNode("post", layers=[0], neurons=[0, 1, 2]), metric, new_input=new)["post"]
    assert result.dims == ("layer", "neuron") and result.shape == (1, 3)
    assert result.coords == {"layer": (0,), "neuron": (0, 1, 2)}
    expected = naive_act_patch(model, orig, [Node("post", 0, neuron=2)], metric, full_cache(model, new))
    assert_close(result.sel(layer=0, neuron=2), expected)


def test_k_sweep_on_gqa_is_layer_kv_head(gqa_model):
    orig, new = make_inputs(gqa_model)
    metric = logit_diff_metric()
    results = act_patch(gqa_model, orig, IterNode(["q", "k"]), metric, new_input=new)
    n_kv = gqa_model.cfg.n_key_value_heads
    assert results["k"].dims == ("layer", "kv_head") and results["k"].shape == (gqa_model.cfg.n_layers, n_kv)
    assert results["q"].dims == ("layer", "head") and results["q"].shape == (
        gqa_model.cfg.n_layers,
        gqa_model.cfg.n_heads,
    )
    expected = naive_act_patch(gqa_model, orig, [Node("k", 2, head=n_kv - 1)], metric, full_cache(gqa_model, new))
    assert_close(results["k"].sel(layer=2, kv_head=n_kv - 1), expected)


def test_k_sweep_without_gqa_is_layer_head(gpt2_model):
    orig, new = make_inputs(gpt2_model)
    result = act_patch(gpt2_model, orig, IterNode("k", layers=[0]), logit_diff_metric(), new_input=new)["k"]
    assert result.dims == ("layer", "head") and result.shape == (1, gpt2_model.cfg.n_heads)


def test_per_prompt_metric_adds_batch_dim(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    result = act_patch(model, orig, IterNode("z", layers=[1]), metric, new_input=new)["z"]
    assert result.dims == ("layer", "head", "batch") and result.shape == (1, model.cfg.n_heads, orig.shape[0])
    assert result.coords["batch"] == tuple(range(orig.shape[0]))
    expected = naive_act_patch(model, orig, [Node("z", 1, head=0)], metric, full_cache(model, new))
    assert_close(result.sel(layer=1, head=0), expected)
    assert result.sel(layer=1, head=0).dims == ("batch",)


def test_restricted_sweep_coords_and_sel(gpt2_model):
    orig, new = make_inputs(gpt2_model)
    metric = logit_diff_metric()
    result = act_patch(gpt2_model, orig, IterNode("z", layers=[2, 5], heads=[1, 3]), metric, new_input=new)["z"]
    assert result.dims == ("layer", "head") and result.shape == (2, 2)
    assert result.coords == {"layer": (2, 5), "head": (1, 3)}
    single = act_patch(gpt2_model, orig, Node("z", 5, head=3), metric, new_input=new)
    assert_close(result.sel(layer=5, head=3), single)
    assert_close(result[1, 1], single)
    cache = full_cache(gpt2_model, new)
    assert_close(result.sel(layer=2, head=3), naive_act_patch(gpt2_model, orig, [Node("z", 2, head=3)], metric, cache))
    assert_close(result.sel(layer=5, head=1), naive_act_patch(gpt2_model, orig, [Node("z", 5, head=1)], metric, cache))
    frame = result.to_dataframe()
    assert frame.loc[(frame["layer"] == 5) & (frame["head"] == 3), "value"].item() == pytest.approx(
        float(single), abs=1e-5
    )


def test_multi_component_sweep_keys(small_model):
    model = small_model
    orig, new = make_inputs(model)
    results = act_patch(model, orig, IterNode(["attn_out", "z"], layers=[0]), logit_diff_metric(), new_input=new)
    assert list(results) == ["attn_out", "z"]
    assert results["attn_out"].dims == ("layer",) and results["z"].dims == ("layer", "head")


def test_path_patch_sweep_dims(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    senders = path_patch(model, orig, new, IterNode("z", layers=[0, 1], heads=[0, 2]), Node("resid_post", 2), metric)[
        "z"
    ]
    assert senders.dims == ("layer", "head") and senders.coords == {"layer": (0, 1), "head": (0, 2)}
    receivers = path_patch(
        model,
        orig,
        new,
        Node("z", 0),
        IterNode("resid_pre", seq_pos="each", layers=[1]),
        metric,
        direct_includes_mlps=False,
    )
    assert receivers["resid_pre"].dims == ("seq_pos", "layer") and receivers["resid_pre"].shape == (orig.shape[1], 1)


def test_sweep_result_pickle_round_trip(gqa_model):
    orig, new = make_inputs(gqa_model)
    result = act_patch(gqa_model, orig, IterNode("k", layers=[1, 3]), logit_diff_metric(True), new_input=new)["k"]
    loaded = pickle.loads(pickle.dumps(result))
    assert loaded.dims == ("layer", "kv_head", "batch") and loaded.coords == result.coords
    assert torch.equal(loaded.as_tensor(), result.as_tensor())


# --- the metric's dims ---


def test_a_vector_metric_the_length_of_the_batch_is_not_called_batch(gpt2_model):
    """One value per layer, on a model whose layer count equals the number of prompts."""
    model = gpt2_model
    n_layers = model.cfg.n_layers
    orig, new = make_inputs(model, batch=n_layers)

    def per_layer(cache):
        residuals = [cache[f"blocks.{layer}.hook_resid_post"][:, -1] for layer in range(n_layers)]
        return torch.stack([residual.norm(dim=-1).mean() for residual in residuals])

    sweep = IterNode("z", layers=[0])
    result = act_patch(model, orig, sweep, per_layer, new_input=new, apply_metric_to_cache=True)["z"]
    assert result.dims == ("layer", "head", "metric_0")
    per_prompt = act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(per_prompt=True), new_input=new)
    assert per_prompt["z"].dims == ("layer", "head", "batch")


def test_declared_metric_dims_are_used(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model)

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    metric.dims = ("prompt",)
    assert act_patch(model, orig, IterNode("resid_pre"), metric, new_input=new)["resid_pre"].dims == ("layer", "prompt")
    metric.dims = "prompt"
    with raises(r"A metric's dims must be a tuple of dim names"):
        act_patch(model, orig, IterNode("resid_pre"), metric, new_input=new)


def test_a_metric_returning_a_tuple_gets_an_output_dim(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model)

    def two(logits):
        return logits[:, -1, 5], logits[:, -1, 6]

    single = act_patch(model, orig, Node("z", 1, head=0), two, new_input=new)
    assert isinstance(single, tuple) and len(single) == 2, "a single result is what the metric returned"
    sweep = act_patch(model, orig, IterNode("z", layers=[1]), two, new_input=new)["z"]
    assert sweep.dims == ("layer", "head", "output", "batch")
    assert_close(sweep[0, 0, 1], single[1])


# --- k and v: head or kv_head ---


def test_k_and_v_results_select_plot_and_tabulate_like_heads(gqa_model):
    from transformer_lens_patching import plots

    model = gqa_model
    orig, new = make_inputs(model)
    results = act_patch(model, orig, IterNode(["z", "k"], layers=[1]), logit_diff_metric(), new_input=new)
    z, k = results["z"], results["k"]
    assert z.dims == ("layer", "head") and k.dims == ("layer", "kv_head")
    assert torch.equal(k.sel(layer=1, head=1), k.sel(layer=1, kv_head=1))
    assert torch.equal(z.sel(layer=1, kv_head=2), z.sel(layer=1, head=2))
    assert k.permute_dims("head", "layer").dims == ("kv_head", "layer")
    columns = [list(r.to_dataframe(head_column="head").columns) for r in (z, k)]
    assert columns == [["layer", "head", "value"]] * 2
    figure = plots.heatmap({"z": z, "k": k}, y="head")
    assert [trace.y for trace in figure.data] == [tuple(range(6)), tuple(range(2))]


def test_uncertainty_of_one_prompt_and_of_rounding_noise():
    """One prompt has no spread (a NaN standard error in tables, refused elsewhere); differences
    from the unpatched run at float32 rounding are no effect, however consistent their sign."""
    from transformer_lens_patching._stats import PromptSamples

    one = PatchResult.from_per_prompt(PatchResult(torch.ones(2, 1), ("layer", "batch")), baseline=torch.zeros(1))
    assert one.to_dataframe()["stderr"].isna().all()
    with pytest.raises(PatchingError, match="at least 2 prompts"):
        _ = one.stderr
    baseline = torch.full((8,), 3.0)
    noise = PromptSamples(torch.stack([baseline + 1e-6, baseline + 0.5]), baseline=baseline)
    assert noise.p_values().tolist() == [1.0, 2 / 2**8]
