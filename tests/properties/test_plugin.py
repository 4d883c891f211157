"""The TransformerLens plugin: model methods, the entry point, Node indexing and ablation on caches."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import transformer_lens_patching
from tests.helpers import assert_close, logit_diff_metric, make_inputs
from tests.oracles.reference import naive_act_patch
from transformer_lens_patching import (
    CachePatchingMixin,
    IterNode,
    Node,
    PatchingError,
    PatchingMixin,
    PatchPlan,
    act_patch,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)
from transformer_lens_patching._tl import MODEL_CLASSES, ActivationCache

GROUP, NAME = "transformer_lens.plugins", "transformer_lens_patching"


@pytest.fixture
def cache_and_tokens(small_model):
    orig, _ = make_inputs(small_model)
    _, cache = small_model.run_with_cache(orig)
    return cache, orig


# --- model methods ---


def test_import_adds_model_methods(small_model):
    assert isinstance(small_model, MODEL_CLASSES)
    assert callable(small_model.act_patch) and callable(small_model.path_patch)
    assert small_model.act_patch.__doc__ == act_patch.__doc__


def test_every_mixin_method_is_on_the_model_and_cache_classes():
    methods = [name for name in vars(PatchingMixin) if not name.startswith("_")]
    assert sorted(methods) == [
        "act_patch",
        "attr_edges",
        "attr_patch",
        "attr_path_patch",
        "confirm",
        "confirm_edges",
        "confirm_paths",
        "evaluate_circuit",
        "exact_edge_scores",
        "faithfulness_curve",
        "learn_edge_masks",
        "mib_faithfulness",
        "path_patch",
        "plan_act_patch",
        "plan_circuit_evaluation",
        "plan_path_patch",
    ]
    for model_class in MODEL_CLASSES:
        assert all(getattr(model_class, name) is getattr(PatchingMixin, name) for name in methods)
    cache_methods = [name for name in vars(CachePatchingMixin) if not name.startswith("_")]
    assert all(getattr(ActivationCache, name) is getattr(CachePatchingMixin, name) for name in cache_methods)


def test_plan_methods_match_functions(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    plan = model.plan_act_patch(orig, IterNode("z", layers=[1]), metric, new_input=new)
    assert isinstance(plan, PatchPlan) and model.plan_act_patch.__doc__ == plan_act_patch.__doc__
    expected = act_patch(model, orig, IterNode("z", layers=[1]), metric, new_input=new)["z"]
    assert torch.equal(plan.assemble(plan.run())["z"], expected)
    plan = model.plan_path_patch(orig, new, IterNode("z", layers=[0]), Node("resid_post", 1), metric)
    assert str(plan).startswith("path_patch plan") and model.plan_path_patch.__doc__ == plan_path_patch.__doc__


def test_act_patch_method_matches_function(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    node = Node("resid_mid", 1, seq_pos=[1, 2, 3])
    assert torch.equal(
        model.act_patch(orig, node, metric, new_input=new), act_patch(model, orig, node, metric, new_input=new)
    )
    sweep = IterNode("z", layers=[0, 1])
    by_method = model.act_patch(orig, sweep, metric, new_cache="zero")["z"]
    by_function = act_patch(model, orig, sweep, metric, new_cache="zero")["z"]
    assert by_method.dims == by_function.dims and torch.equal(by_method, by_function)
    unpatched = metric(model(orig)).detach()
    assert (by_method.as_tensor() - unpatched).abs().max() > 1e-4


def test_path_patch_method_matches_function(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    args = (orig, new, Node("z", 0, head=1), Node("q", 2, head=0), metric)
    by_method = model.path_patch(*args, direct_includes_mlps=False)
    assert torch.equal(by_method, path_patch(model, *args, direct_includes_mlps=False))
    sweep_args = (orig, new, IterNode("z", layers=[0], heads=[0, 1]), Node("resid_post", 1), metric)
    by_method = model.path_patch(*sweep_args, seq_pos=-1)["z"]
    by_function = path_patch(model, *sweep_args, seq_pos=-1)["z"]
    assert by_method.dims == by_function.dims and torch.equal(by_method, by_function)


# --- entry point ---


def test_entry_point_registered():
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    assert NAME in entry_points
    assert entry_points[NAME].value == "transformer_lens_patching.plugin:install"


def test_load_plugins_finds_and_installs_entry_point():
    """Removing the methods and loading the entry point puts them back."""
    classes = MODEL_CLASSES
    try:
        for model_class in classes:
            for name in ("act_patch", "path_patch", "plan_act_patch", "plan_path_patch"):
                delattr(model_class, name)
        del ActivationCache.zero_ablated
        loaded = transformer_lens_patching.load_plugins()
        assert NAME in loaded
        assert all(hasattr(c, "act_patch") and hasattr(c, "plan_path_patch") for c in classes)
        assert hasattr(ActivationCache, "zero_ablated")
    finally:
        transformer_lens_patching.install()


def test_load_plugins_unknown_group_is_empty():
    assert transformer_lens_patching.load_plugins("transformer_lens_patching.no_such_group") == []


def test_install_twice_wraps_getitem_once(cache_and_tokens):
    cache, _ = cache_and_tokens
    transformer_lens_patching.install()
    transformer_lens_patching.install()
    inner = ActivationCache.__getitem__.__wrapped__
    assert not getattr(inner, "patching_plugin", False)
    assert torch.equal(cache[Node("z", 1, head=0)], cache["blocks.1.attn.hook_z"][:, :, 0])


# --- indexing a cache by Node ---


def test_cache_node_per_prompt_positions(cache_and_tokens):
    cache, orig = cache_and_tokens
    positions = torch.tensor([1, 4, 6])
    z = cache["blocks.2.attn.hook_z"]
    expected = torch.stack([z[b, positions[b], 1] for b in range(orig.shape[0])]).unsqueeze(1)
    actual = cache[Node("z", 2, head=1, seq_pos=positions)]
    assert actual.shape == (orig.shape[0], 1, z.shape[-1])
    assert torch.equal(actual, expected)


def test_cache_node_several_positions_per_prompt(cache_and_tokens):
    cache, orig = cache_and_tokens
    positions = [[0, 6], [2, 3], [5, -1]]
    resid = cache["blocks.1.hook_resid_mid"]
    expected = torch.stack([resid[b, [p % orig.shape[1] for p in row]] for b, row in enumerate(positions)])
    assert torch.equal(cache[Node("resid_mid", 1, seq_pos=positions)], expected)


def test_cache_node_whole_head_and_neuron(cache_and_tokens):
    cache, _ = cache_and_tokens
    assert torch.equal(cache[Node("z", 1, head=2)], cache["blocks.1.attn.hook_z"][:, :, 2])
    assert torch.equal(cache[Node("post", 0, neuron=5, seq_pos=2)], cache["blocks.0.mlp.hook_post"][:, 2:3, 5])
    assert torch.equal(cache[Node("resid_pre", 0)], cache["blocks.0.hook_resid_pre"])


def test_cache_node_negative_layer_and_position(small_model, cache_and_tokens):
    cache, _ = cache_and_tokens
    last = small_model.cfg.n_layers - 1
    assert torch.equal(cache[Node("resid_post", -1, seq_pos=-1)], cache[f"blocks.{last}.hook_resid_post"][:, -1:])


def test_cache_node_pattern_query_positions(cache_and_tokens):
    cache, orig = cache_and_tokens
    positions = torch.tensor([6, 0, 3])
    pattern = cache["blocks.1.attn.hook_pattern"]
    expected = torch.stack([pattern[b, 2, positions[b]] for b in range(orig.shape[0])]).unsqueeze(1)
    assert torch.equal(cache[Node("pattern", 1, head=2, seq_pos=positions)], expected)


def test_cache_node_full_hook_name(cache_and_tokens):
    cache, _ = cache_and_tokens
    assert torch.equal(cache[Node("blocks.3.attn.hook_v", head=0)], cache["blocks.3.attn.hook_v"][:, :, 0])


def test_cache_node_missing_activation(small_model):
    orig, _ = make_inputs(small_model)
    _, cache = small_model.run_with_cache(orig, names_filter=lambda name: name == "blocks.0.attn.hook_z")
    with pytest.raises(PatchingError, match=r"This cache has no activation 'blocks\.1\.attn\.hook_z'"):
        cache[Node("z", 1, head=0)]


def test_cache_node_out_of_range(small_model, cache_and_tokens):
    cache, _ = cache_and_tokens
    with pytest.raises(PatchingError, match=r"Head \d+ is out of range"):
        cache[Node("z", 1, head=small_model.cfg.n_heads)]
    with pytest.raises(PatchingError, match=r"seq_pos has shape \(2,\)"):
        cache[Node("z", 1, head=0, seq_pos=[1, 2])]


def test_cache_string_keys_unchanged(small_model, cache_and_tokens):
    cache, _ = cache_and_tokens
    z = cache.cache_dict["blocks.2.attn.hook_z"]
    assert cache["blocks.2.attn.hook_z"] is z
    assert torch.equal(cache["z", 2], z)
    assert torch.equal(cache["resid_pre", 1], cache.cache_dict["blocks.1.hook_resid_pre"])
    assert "blocks.2.attn.hook_z" in cache
    with pytest.raises(KeyError):
        cache["blocks.2.attn.hook_nothing"]


# --- ablation caches from a cache ---


def test_zero_ablated_cache(small_model):
    model = small_model
    orig, new = make_inputs(model)
    _, cache = model.run_with_cache(new)
    zeros = cache.zero_ablated()
    assert isinstance(zeros, ActivationCache)
    assert set(zeros.keys()) == set(cache.keys())
    for name in cache.keys():
        assert zeros[name].shape == cache[name].shape and not zeros[name].any()
    assert cache["blocks.0.attn.hook_z"].abs().sum() > 0
    metric = logit_diff_metric(per_prompt=True)
    node = Node("z", 1, head=0)
    expected = naive_act_patch(model, orig, [node], metric, 0)
    assert_close(act_patch(model, orig, node, metric, new_cache=zeros), expected)
    receiver = Node("resid_post", 2)
    assert_close(
        path_patch(model, orig, None, node, receiver, metric, new_cache=zeros, direct_includes_mlps=False),
        path_patch(model, orig, None, node, receiver, metric, new_cache="zero", direct_includes_mlps=False),
    )


def test_mean_ablated_cache_by_group(small_model):
    model = small_model
    orig, new = make_inputs(model)
    _, cache = model.run_with_cache(new)
    means = cache.mean_ablated(["a", "b", "a"])
    assert isinstance(means, ActivationCache)
    z = cache["blocks.1.attn.hook_z"]
    group_a = (z[0] + z[2]) / 2
    expected_z = torch.stack([group_a, z[1], group_a])
    assert_close(means["blocks.1.attn.hook_z"], expected_z)
    metric = logit_diff_metric(per_prompt=True)
    node = Node("z", 1, head=0)
    expected = naive_act_patch(model, orig, [node], metric, {"blocks.1.attn.hook_z": expected_z})
    assert_close(act_patch(model, orig, node, metric, new_cache=means), expected)
    assert (torch.as_tensor(expected) - metric(model(orig)).detach()).abs().max() > 1e-4


def test_mean_ablated_cache_over_batch(small_model):
    model = small_model
    orig, new = make_inputs(model)
    _, cache = model.run_with_cache(new)
    means = cache.mean_ablated()
    resid = cache["blocks.2.hook_resid_pre"]
    assert_close(means["blocks.2.hook_resid_pre"], resid.mean(0, keepdim=True).expand_as(resid))
    node = Node("resid_pre", 2, seq_pos=-1)
    metric = logit_diff_metric()
    expected = naive_act_patch(
        model, orig, [node], metric, {"blocks.2.hook_resid_pre": means["blocks.2.hook_resid_pre"]}
    )
    assert_close(act_patch(model, orig, node, metric, new_cache=means), expected)
