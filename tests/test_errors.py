"""Every invalid input raises one PatchingError with a message that says what was wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import logit_diff_metric, make_inputs, raises
from transformer_lens_patching import IterNode, Node, PatchingError, act_patch, path_patch


def n_kv_heads(model) -> int:
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def patch(model, node, **kwargs):
    """act_patch `node` with new_input from make_inputs, unless kwargs say otherwise."""
    orig, new = make_inputs(model)
    kwargs.setdefault("new_input", new)
    return act_patch(model, orig, node, kwargs.pop("metric", logit_diff_metric()), **kwargs)


def ppatch(model, senders, receivers, **kwargs):
    """path_patch from `senders` to `receivers` with inputs from make_inputs."""
    orig, new = make_inputs(model)
    new_input = kwargs.pop("new_input", new)
    return path_patch(model, orig, new_input, senders, receivers, kwargs.pop("metric", logit_diff_metric()), **kwargs)


# --- Node and IterNode construction (no model needed) ---


def test_patching_error_is_value_error():
    """Callers that catch ValueError also catch PatchingError."""
    assert issubclass(PatchingError, ValueError)


def test_unknown_component_suggests_close_match():
    with raises(r"Unknown component 'resid_pr'.*Did you mean 'resid_pre'"):
        Node("resid_pr", 0)


def test_unknown_component_lists_valid_names():
    with raises(r"Unknown component 'bogus'.*Valid components: .*resid_pre"):
        Node("bogus", 0)


def test_unknown_full_hook_name_suffix():
    with raises(r"Unknown hook name 'blocks\.3\.attn\.hook_zz'.*Did you mean 'attn\.hook_z'"):
        Node("blocks.3.attn.hook_zz")


def test_non_string_name():
    with raises(r"must be a str"):
        Node(3, 0)


@pytest.mark.parametrize("name", ["attn_out", "resid_pre", "mlp_out", "post", "embed"])
def test_head_on_component_without_heads(name):
    layer = None if name == "embed" else 3
    with raises(rf"'{name}' has no head axis, so head=2 is not allowed"):
        Node(name, layer, head=2)


@pytest.mark.parametrize("name", ["resid_pre", "attn_out", "z", "q", "pattern"])
def test_neuron_on_component_without_neurons(name):
    with raises(rf"'{name}' has no neuron axis, so neuron=1 is not allowed"):
        Node(name, 0, neuron=1)


def test_missing_layer():
    with raises(r"'z' needs a layer"):
        Node("z", head=1)


def test_layer_on_component_without_layers():
    with raises(r"'embed' is not per layer"):
        Node("embed", 0)


def test_full_hook_name_with_conflicting_layer():
    with raises(r"at layer 11, but layer=3"):
        Node("blocks.11.attn.hook_z", 3)


@pytest.mark.parametrize("field, value", [("layer", 1.0), ("head", "0"), ("neuron", True)])
def test_non_int_indices(field, value):
    kwargs = {"layer": 0, "head": None, "neuron": None, field: value}
    name = "post" if field == "neuron" else "z"
    with raises(rf"{field} must be an int or None"):
        Node(name, **kwargs)


def test_seq_pos_three_dims():
    with raises(r"got 3 dims \(shape \(3, 1, 1\)\)"):
        Node("resid_pre", 0, seq_pos=torch.zeros(3, 1, 1, dtype=torch.long))


@pytest.mark.parametrize("seq_pos", [torch.tensor([1.0, 2.0, 3.0]), 1.5, [0.5, 1.0, 2.0]])
def test_seq_pos_float_dtype(seq_pos):
    with raises(r"seq_pos must hold integer positions"):
        Node("resid_pre", 0, seq_pos=seq_pos)


def test_seq_pos_bool():
    with raises(r"seq_pos must be None, an int"):
        Node("resid_pre", 0, seq_pos=True)


def test_iter_node_empty_list():
    with raises(r"IterNode needs a component name or a non-empty list"):
        IterNode([])


def test_iter_node_duplicate_names():
    with raises(r"IterNode lists component 'z' twice"):
        IterNode(["z", "q", "z"])


def test_iter_node_duplicate_via_alias():
    """An alias and its component are the same thing listed twice."""
    with raises(r"IterNode lists component 'pattern' twice"):
        IterNode(["pattern", "attn"])


def test_iter_node_full_hook_name_with_layer():
    with raises(r"not a hook name with a layer.*IterNode\('z', layers=\[3\]\)"):
        IterNode("blocks.3.attn.hook_z")


def test_iter_node_heads_on_component_without_heads():
    with raises(r"heads= restricts head components, but none of \['resid_pre'\] has heads"):
        IterNode("resid_pre", heads=[0])


def test_iter_node_neurons_on_component_without_neurons():
    with raises(r"neurons= restricts 'pre'/'post'"):
        IterNode("z", neurons=[0])


def test_iter_node_unknown_component_suggests():
    with raises(r"Did you mean 'attn_out'"):
        IterNode(["z", "atn_out"])


def test_iter_node_bad_seq_pos_string():
    with raises(r"seq_pos must be None, 'each' or a position spec; got 'all'"):
        IterNode("z", seq_pos="all")


def test_iter_node_repeated_layers():
    with raises(r"layers has repeated entries"):
        IterNode("z", layers=[1, 1])


# --- Node properties ---


@pytest.mark.parametrize(
    "hook, name, layer",
    [
        ("blocks.11.attn.hook_z", "z", 11),
        ("blocks.10.hook_resid_pre", "resid_pre", 10),
        ("blocks.123.mlp.hook_post", "post", 123),
        ("blocks.0.hook_q_input", "q_input", 0),
    ],
)
def test_full_hook_names_parse_any_layer(hook, name, layer):
    node = Node(hook)
    assert (node.name, node.layer) == (name, layer)


def test_node_is_frozen():
    node = Node("z", 1, head=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.layer = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.seq_pos = 1
    assert node.layer == 1


def test_node_equal_and_hashable():
    a, b = Node("z", 1, head=2, seq_pos=[1, 2, 3]), Node("z", 1, head=2, seq_pos=torch.tensor([1, 2, 3]))
    assert a == b and hash(a) == hash(b)
    assert len({a, b, Node("z", 1, head=3)}) == 2
    assert a != Node("z", 1, head=2, seq_pos=[1, 2, 4])
    assert Node("blocks.1.attn.hook_z", head=2) == Node("z", 1, head=2)


def test_node_normalises_tensor_seq_pos_to_tuple():
    assert Node("resid_pre", 0, seq_pos=torch.tensor([3, 4, 5])).seq_pos == (3, 4, 5)
    assert Node("resid_pre", 0, seq_pos=torch.tensor([[1, 2], [3, 4]])).seq_pos == ((1, 2), (3, 4))
    assert Node("resid_pre", 0, seq_pos=torch.tensor(-1)).seq_pos == -1
    assert isinstance(Node("resid_pre", 0, seq_pos=torch.tensor([3])).seq_pos, tuple)


# --- act_patch: checks against the model and the inputs ---


def test_layer_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {n} is out of range: expected 0 <= layer < {n}"):
        patch(small_model, Node("z", n, head=0))


def test_negative_layer_beyond_n_layers(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {-n - 1} is out of range"):
        patch(small_model, Node("resid_pre", -n - 1))


def test_head_out_of_range(small_model):
    n = small_model.cfg.n_heads
    with raises(rf"Head {n} is out of range for 'z': expected 0 <= head < {n}"):
        patch(small_model, Node("z", 0, head=n))


@pytest.mark.parametrize("name", ["k", "v", "k_input", "v_input"])
def test_kv_head_out_of_range_on_gqa(gqa_model, name):
    """A head index that is a valid query head but not a key/value head mentions key/value heads."""
    n_kv = n_kv_heads(gqa_model)
    assert n_kv < gqa_model.cfg.n_heads
    with raises(rf"Key/value head {n_kv} is out of range for '{name}'.*key/value head"):
        patch(gqa_model, Node(name, 0, head=n_kv))


def test_iter_node_heads_beyond_kv_heads_on_gqa(gqa_model):
    """heads=[3] is a valid query head but not a key/value head of k."""
    with raises(r"kv_heads contains 3, out of range.*2 key/value heads"):
        patch(gqa_model, IterNode(["q", "k"], heads=[3]))


def test_neuron_out_of_range(small_model):
    d_mlp = small_model.cfg.d_mlp
    with raises(rf"Neuron {d_mlp} is out of range for 'post': expected 0 <= neuron < {d_mlp}"):
        patch(small_model, Node("post", 0, neuron=d_mlp))


def test_negative_head(small_model):
    with raises(r"Head -1 is out of range"):
        patch(small_model, Node("z", 0, head=-1))


def test_seq_pos_1d_wrong_length(small_model):
    with raises(r"seq_pos has shape \(2,\).*expected shape \(3,\)"):
        patch(small_model, Node("resid_pre", 0, seq_pos=[1, 2]))


def test_seq_pos_2d_wrong_rows(small_model):
    with raises(r"seq_pos has shape \(2, 2\).*one row per prompt: expected shape \(3, k\)"):
        patch(small_model, Node("resid_pre", 0, seq_pos=[[1, 2], [3, 4]]))


@pytest.mark.parametrize("seq_pos", [7, -8, [0, 7, 1], [[0, 1], [2, 3], [4, 9]]])
def test_seq_pos_out_of_range(small_model, seq_pos):
    with raises(r"seq_pos contains position -?\d+, out of range for sequences of length 7"):
        patch(small_model, Node("resid_pre", 0, seq_pos=seq_pos))


def test_new_input_of_another_shape(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(3, 6\), but orig_input has \(3, 7\)"):
        act_patch(small_model, orig, Node("z", 0), logit_diff_metric(), new_input=new[:, :6])


def test_new_input_of_another_batch(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(2, 7\), but orig_input has \(3, 7\)"):
        act_patch(small_model, orig, Node("z", 0), logit_diff_metric(), new_input=new[:2])


def test_new_cache_missing_hook_suggests_closest(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new, names_filter=lambda name: name in ("blocks.1.attn.hook_q", "hook_embed"))
    with raises(
        r"new_cache has no activation 'blocks\.1\.attn\.hook_z'.*Closest cached name: 'blocks\.1\.attn\.hook_q'"
    ):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


def test_new_cache_wrong_batch(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new[:2])
    with raises(r"new_cache\['blocks\.1\.attn\.hook_z'\] has batch size 2, but the orig input has 3 prompts"):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


@pytest.mark.parametrize("length", [5, 14])
def test_new_cache_wrong_sequence_length(small_model, length):
    """A cache of prompts of another length is rejected up front, naming both lengths."""
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new.repeat(1, 2)[:, :length])
    with raises(rf"new_cache.*\b{length}\b.*\b7\b"):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


def test_new_cache_wrong_sequence_length_with_seq_pos(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new[:, :5])
    with raises(r"new_cache.*\b5\b.*\b7\b"):
        act_patch(small_model, orig, Node("z", 1, head=0, seq_pos=6), logit_diff_metric(), new_cache=cache)


def test_new_cache_entry_not_a_tensor(small_model):
    with raises(r"new_cache.*blocks\.0\.attn\.hook_z.*tensor"):
        patch(small_model, Node("z", 0, head=1), new_input=None, new_cache={"blocks.0.attn.hook_z": [1, 2]})


def test_new_cache_invalid_string(small_model):
    with raises(r"new_cache must be an ActivationCache, a dict or 'zero'; got 'mean'"):
        patch(small_model, Node("z", 0), new_input=None, new_cache="mean")


def test_new_cache_wrong_type(small_model):
    with raises(r"Expected an ActivationCache or a dict of tensors, got int"):
        patch(small_model, Node("z", 0), new_input=None, new_cache=3)


def test_metric_not_callable(small_model):
    with raises(r"patching_metric must be a callable, 'loss' or 'loss_per_token'; got int"):
        patch(small_model, Node("z", 0), metric=42)


def test_unknown_metric_string(small_model):
    with raises(r"Unknown metric 'logit_diff': expected a callable, 'loss' or 'loss_per_token'"):
        patch(small_model, Node("z", 0), metric="logit_diff")


def test_metric_returning_a_string(small_model):
    with raises(r"The metric returned str, which is not a number or tensor"):
        patch(small_model, IterNode("z", layers=[0]), metric=lambda logits: "x")


def test_metric_returning_different_shapes(small_model):
    calls = []

    def metric(logits):
        calls.append(1)
        diff = logits[:, -1, 5] - logits[:, -1, 6]
        return diff if len(calls) == 1 else diff.mean()

    with raises(r"The metric returned values of different shapes across the sweep: \[\(\), \(3,\)\]"):
        patch(small_model, IterNode("z", layers=[0]), metric=metric, batch_size=1)


def test_loss_metric_on_one_token(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"The 'loss' metrics need sequences of at least 2 tokens"):
        act_patch(small_model, orig[:, :1], Node("z", 0), "loss", new_input=new[:, :1])


def test_neither_new_input_nor_new_cache(small_model):
    with raises(r"Nothing to patch in: pass new_input.*new_cache"):
        patch(small_model, Node("z", 0), new_input=None)


def test_empty_node_list(small_model):
    with raises(r"patching_nodes must be a Node, a non-empty list of Nodes or an IterNode"):
        patch(small_model, [])


def test_string_as_patching_nodes(small_model):
    with raises(r"patching_nodes must be a Node, a non-empty list of Nodes or an IterNode"):
        patch(small_model, "z")


def test_iter_node_layer_restriction_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"layers contains {n}, out of range"):
        patch(small_model, IterNode("z", layers=[0, n]))


def test_iter_node_head_restriction_out_of_range(small_model):
    n = small_model.cfg.n_heads
    with raises(rf"heads contains {n}, out of range"):
        patch(small_model, IterNode("z", heads=[n]))


def test_iter_node_fixed_seq_pos_out_of_range(small_model):
    with raises(r"seq_pos contains position 9, out of range for sequences of length 7"):
        patch(small_model, IterNode("resid_pre", seq_pos=9))


def test_missing_hook_pos_embed_on_rotary_model(gqa_model):
    """The rotary model computes no positional embedding: say so, do not KeyError."""
    with raises(r"never fired|no hook"):
        patch(gqa_model, Node("pos_embed"))


def test_missing_hook_pos_embed_zero_ablation(gqa_model):
    with raises(r"never fired|no hook"):
        patch(gqa_model, Node("pos_embed"), new_input=None, new_cache="zero")


def test_non_transformer_lens_model():
    orig, new = make_inputs(None)
    with raises(r"Expected a TransformerLens .* model .*got Linear"):
        act_patch(torch.nn.Linear(3, 3), orig, Node("z", 0), logit_diff_metric(), new_input=new)


def test_non_transformer_lens_model_path_patch():
    orig, new = make_inputs(None)
    with raises(r"Expected a TransformerLens .* model .*got Linear"):
        path_patch(torch.nn.Linear(3, 3), orig, new, Node("z", 0), Node("resid_post", 1), logit_diff_metric())


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_bad_batch_size(small_model, batch_size):
    with raises(r"batch_size must be a positive int"):
        patch(small_model, IterNode("z", layers=[0]), batch_size=batch_size)


def test_bad_max_memory(small_model):
    with raises(r"max_memory must be a positive number of bytes, got 0"):
        patch(small_model, IterNode("z", layers=[0]), max_memory=0)


def test_empty_orig_input(small_model):
    """Prompts with no positions are rejected with a PatchingError, not a reshape error deep in the model."""
    orig, new = make_inputs(small_model)
    with raises(r"\(3, 0\)"):
        act_patch(small_model, orig[:, :0], Node("z", 0, head=1), logit_diff_metric(), new_input=new[:, :0])


def test_empty_positions_per_prompt(small_model):
    """A long (batch, 0) seq_pos either patches nothing or says so; it must not claim a float dtype."""
    orig, new = make_inputs(small_model)
    node = Node("z", 0, head=1, seq_pos=torch.zeros(3, 0, dtype=torch.long))
    metric = logit_diff_metric()
    try:
        result = act_patch(small_model, orig, node, metric, new_input=new)
    except PatchingError as error:
        assert "dtype" not in str(error), f"misleading message: {error}"
    else:
        with torch.no_grad():
            torch.testing.assert_close(result, metric(small_model(orig)))


def test_float_tokens(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"Token input must be an int tensor"):
        act_patch(small_model, orig.float(), Node("z", 0), logit_diff_metric(), new_input=new)


# --- path_patch ---


def test_path_patch_iter_node_both_sides(small_model):
    with raises(r"Only one of sender_nodes and receiver_nodes may be an IterNode"):
        ppatch(small_model, IterNode("z"), IterNode("q"))


def test_path_patch_per_node_seq_pos(small_model):
    with raises(r"has its own seq_pos, which path_patch does not allow.*seq_pos= argument"):
        ppatch(small_model, Node("z", 0, head=0, seq_pos=2), Node("resid_post", 1))


def test_path_patch_per_node_seq_pos_on_receiver_list(small_model):
    with raises(r"has its own seq_pos, which path_patch does not allow"):
        ppatch(small_model, Node("z", 0, head=0), [Node("resid_post", 1), Node("q", 2, head=0, seq_pos=[1, 2, 3])])


def test_path_patch_iter_node_fixed_seq_pos(small_model):
    with raises(r"an IterNode's seq_pos must be None or 'each'.*path_patch\(seq_pos=...\)"):
        ppatch(small_model, IterNode("z", seq_pos=3), Node("resid_post", 1))


def test_path_patch_each_plus_seq_pos(small_model):
    with raises(r"IterNode\(seq_pos='each'\) sweeps positions, so path_patch's seq_pos must be None"):
        ppatch(small_model, IterNode("z", seq_pos="each"), Node("resid_post", 1), seq_pos=2)


@pytest.mark.parametrize("sender", [Node("q", 0, head=0), Node("pattern", 0, head=0), Node("embed")])
def test_path_patch_invalid_sender(small_model, sender):
    with raises(rf"'{sender.name}' cannot be a sender in path patching\. Valid senders: z, attn_out"):
        ppatch(small_model, sender, Node("resid_post", 1))


@pytest.mark.parametrize("receiver", [Node("attn_out", 1), Node("mlp_out", 1), Node("post", 1)])
def test_path_patch_invalid_receiver(small_model, receiver):
    with raises(rf"'{receiver.name}' cannot be a receiver in path patching\. Valid receivers: q, k, v"):
        ppatch(small_model, Node("z", 0, head=0), receiver)


def test_path_patch_invalid_receiver_in_iter_node(small_model):
    with raises(r"'attn_out' cannot be a receiver"):
        ppatch(small_model, Node("z", 0, head=0), IterNode(["q", "attn_out"]))


def test_path_patch_seq_pos_wrong_shape(small_model):
    with raises(r"seq_pos has shape \(2,\).*expected shape \(3,\)"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=[1, 2])


def test_path_patch_seq_pos_out_of_range(small_model):
    with raises(r"seq_pos contains position 7, out of range"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=7)


def test_path_patch_seq_pos_float(small_model):
    with raises(r"seq_pos must hold integer positions"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=torch.tensor([1.0, 2.0, 3.0]))


def test_path_patch_kv_head_receiver_out_of_range(gqa_model):
    n_kv = n_kv_heads(gqa_model)
    with raises(rf"Key/value head {n_kv} is out of range for 'k'.*key/value head"):
        ppatch(gqa_model, Node("z", 0, head=0), Node("k", 2, head=n_kv))


def test_path_patch_new_input_of_another_shape(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(3, 5\), but orig_input has \(3, 7\)"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=new[:, :5])


def test_path_patch_neither_new_input_nor_new_cache(small_model):
    with raises(r"path_patch needs new_input or new_cache"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=None)


def test_path_patch_new_cache_invalid_string(small_model):
    with raises(r"new_cache must be .*; got 'mean'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=None, new_cache="mean")


def test_path_patch_orig_cache_zero_string(small_model):
    with raises(r"orig_cache must be an ActivationCache or a dict; got 'zero'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), orig_cache="zero")


def test_path_patch_new_cache_missing_hook(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new, names_filter=lambda name: name == "blocks.0.attn.hook_q")
    with raises(
        r"new_cache has no activation 'blocks\.0\.attn\.hook_z'.*Closest cached name: 'blocks\.0\.attn\.hook_q'"
    ):
        path_patch(
            small_model, orig, None, Node("z", 0, head=0), Node("resid_post", 1), logit_diff_metric(), new_cache=cache
        )


def test_path_patch_caches_wrong_sequence_length(small_model):
    orig, new = make_inputs(small_model)
    _, short_new = small_model.run_with_cache(new[:, :5])
    _, short_orig = small_model.run_with_cache(orig[:, :5])
    with raises(r"new_cache.*\b5\b.*\b7\b"):
        path_patch(
            small_model,
            orig,
            None,
            Node("z", 1, head=0),
            Node("resid_post", 2),
            logit_diff_metric(),
            new_cache=short_new,
        )
    with raises(r"orig_cache.*\b5\b.*\b7\b"):
        ppatch(small_model, Node("z", 1, head=0), Node("resid_post", 2), orig_cache=short_orig)


def test_path_patch_orig_cache_wrong_batch(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(orig[:2])
    with raises(r"orig_cache\[.*\] has batch size 2, but the orig input has 3 prompts"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), orig_cache=cache)


def test_path_patch_metric_not_callable(small_model):
    with raises(r"patching_metric must be a callable"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), metric=None)


def test_path_patch_bad_direct_includes_mlps(small_model):
    with raises(r"direct_includes_mlps must be True or False, got 'yes'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), direct_includes_mlps="yes")


def test_path_patch_layer_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {n} is out of range"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", n))


def test_path_patch_batch_size_zero(small_model):
    with raises(r"batch_size must be a positive int"):
        ppatch(small_model, IterNode("z", layers=[0]), Node("resid_post", 1), batch_size=0)
