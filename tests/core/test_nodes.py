"""Node and IterNode: what they accept, the PatchingError (with a suggestion where one helps) for
anything else, and how they compare, hash and parse hook names. Checks against a model (layers,
heads and positions that the model or the prompts do not have) are act_patch's and path_patch's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import raises
from transformer_lens_patching import IterNode, Node, PatchingError

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
