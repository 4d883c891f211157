"""What a review found, each fixed: IOIDataset.groups as mean-ablation groups, metric dims named
by behaviour not by length, CLI errors, dropout, immutable sites, head dims of k and v."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests import models
from tests.helpers import assert_close, logit_diff_metric, make_inputs, model_state, raises
from transformer_lens_patching import (
    IOIDataset,
    IterNode,
    Node,
    act_patch,
    mean_ablation_cache,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)
from transformer_lens_patching import cli as cli_module
from transformer_lens_patching._core.components import COMPONENTS
from transformer_lens_patching._core.sites import resolve_node

# IOIDataset.groups and mean_ablation_cache


@pytest.fixture(scope="module")
def wide_model(tok):
    """A 3-layer random model with the tokenizer's whole vocabulary, for text prompts."""
    return models.gpt2_like(n_layers=3, tok=tok, vocab=len(tok))


def test_mean_ablation_groups_from_an_ioi_dataset(wide_model, tok):
    dataset = IOIDataset("mixed", N=12, tokenizer=tok, seed=0, nb_templates=4)
    _, cache = wide_model.run_with_cache(dataset.toks)
    by_groups = mean_ablation_cache(cache, groups=dataset.groups)
    labels = [p.template_index for p in dataset.prompts]
    by_labels = mean_ablation_cache(cache, groups=labels)
    name = "blocks.0.attn.hook_z"
    assert len(dataset.groups) > 1
    torch.testing.assert_close(by_groups[name], by_labels[name], rtol=0, atol=0)
    for rows in dataset.groups:
        group_mean = cache[name][rows].mean(0, keepdim=True)
        torch.testing.assert_close(by_groups[name][rows], group_mean.expand_as(cache[name][rows]))


def test_mean_ablation_groups_must_cover_each_prompt_once(gpt2_model):
    orig, _ = make_inputs(gpt2_model)
    _, cache = gpt2_model.run_with_cache(orig)
    with raises(r"every prompt in exactly one group: prompts \[2\] are in no group"):
        mean_ablation_cache(cache, groups=[torch.tensor([0]), torch.tensor([1])])
    with raises(r"prompts \[1\] are in several groups"):
        mean_ablation_cache(cache, groups=[[0, 1], [1, 2]])
    with raises(r"groups lists prompt 5, but the cache has 3 prompts"):
        mean_ablation_cache(cache, groups=[[0, 1, 2], [5]])
    with raises(r"groups has 2 labels, but the cache has 3 prompts.*IOIDataset.groups"):
        mean_ablation_cache(cache, groups=["a", "b"])


# Metric dims


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


# The command line


def test_cli_shows_bugs_instead_of_hiding_them(monkeypatch, tmp_path):
    def broken(name, device):
        raise TypeError("a bug in loading code")

    monkeypatch.setattr(cli_module._tl, "load_pretrained", broken)
    with pytest.raises(TypeError, match="a bug in loading code"):
        cli_module.main(["ioi", "--model", "not-a-folder", "--quiet", "--out", str(tmp_path)])


def test_cli_turns_a_loading_failure_into_one_line(monkeypatch, capsys, tmp_path):
    def missing(name, device):
        raise OSError("not found on the hub")

    monkeypatch.setattr(cli_module._tl, "load_pretrained", missing)
    assert cli_module.main(["ioi", "--model", "not-a-folder", "--quiet", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("tl-patch: error: Cannot load model 'not-a-folder'")


def test_cli_dry_run_prints_the_plans_and_runs_nothing(monkeypatch, capsys, tmp_path, wide_model):
    model = wide_model
    monkeypatch.setattr(cli_module, "load_model", lambda name, device: model)
    calls = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: calls.append(1))]):
        status = cli_module.main(["ioi", "--dry-run", "--n-prompts", "3", "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert status == 0 and calls == [] and not (tmp_path / "report").exists()
    for step in (
        "act_heads",
        "act_words at S2",
        "path_logits",
        "path_queries",
        "path_values",
        "attr_neurons",
        "circuit, exact scores of the candidates",
        "circuit, choosing on the scoring prompts",
        "circuit, faithfulness curves",
    ):
        assert f"\n{step}" in out, step
    assert out.count("forward passes in") == 14


# Dropout


def test_dropout_in_training_mode_is_refused_everywhere(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model)
    if models.TL_MAJOR < 4:
        pytest.skip("HookedTransformer has no dropout: training mode changes nothing (tested below)")
    model.train()
    try:
        before = model_state(model)
        message = r"training mode with dropout active .*Call model.eval\(\) first"
        with raises(message):
            act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)
        with raises(message):
            path_patch(model, orig, new, IterNode("z", layers=[0]), Node("resid_post", 2), logit_diff_metric())
        with raises(message):
            plan_act_patch(model, orig, Node("z", 0, head=0), logit_diff_metric(), new_input=new)
        with raises(message):
            plan_path_patch(model, orig, new, Node("z", 0, head=0), Node("resid_post", 2), logit_diff_metric())
        assert model_state(model) == before
    finally:
        model.eval()


def test_training_mode_without_dropout_patches_as_eval_mode(gpt2_model):
    model = gpt2_model
    if models.TL_MAJOR >= 4:
        pytest.skip("the bridged GPT-2 has dropout (tested above)")
    orig, new = make_inputs(model)
    expected = act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)["z"]
    model.train()
    try:
        assert torch.equal(
            act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)["z"], expected
        )
    finally:
        model.eval()


# Sites and the component table


def test_a_site_changes_nothing_when_used():
    site = resolve_node(Node("z", 1, head=2, seq_pos=[1, 0]), models_shape(), 2, 4, torch.device("cpu"))
    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
    site.index(0, 2, torch.device("cpu"))
    site.index(2, 2, torch.device("meta"))
    assert {f.name: getattr(site, f.name) for f in dataclasses.fields(site)} == fields
    assert all(not isinstance(value, (dict, list, set)) for value in fields.values()), "a site holds nothing mutable"
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.unit = 3


def models_shape():
    from transformer_lens_patching._tl import ModelShape

    return ModelShape(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=16, d_vocab=10, has_mlps=True)


def test_the_table_says_which_components_have_heads():
    with_heads = {name for name, component in COMPONENTS.items() if component.has_heads}
    assert with_heads == {"q", "k", "v", "z", "result", "pattern", "attn_scores", "q_input", "k_input", "v_input"}
    assert {name for name, c in COMPONENTS.items() if c.unit == "kv_head"} == {"k", "v", "k_input", "v_input"}


# k and v: head or kv_head


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
