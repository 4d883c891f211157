"""Sites (a Node resolved against a model's shape) and the component table they are built from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transformer_lens_patching import Node
from transformer_lens_patching._core.components import COMPONENTS
from transformer_lens_patching._core.sites import resolve_node


def small_shape():
    """A model's shape without a model: 2 layers of 4 heads, 2 key/value heads."""
    from transformer_lens_patching._tl import ModelShape

    return ModelShape(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=16, d_vocab=10, has_mlps=True)


def test_a_site_changes_nothing_when_used():
    site = resolve_node(Node("z", 1, head=2, seq_pos=[1, 0]), small_shape(), 2, 4, torch.device("cpu"))
    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
    site.index(0, 2, torch.device("cpu"))
    site.index(2, 2, torch.device("meta"))
    assert {f.name: getattr(site, f.name) for f in dataclasses.fields(site)} == fields
    assert all(not isinstance(value, (dict, list, set)) for value in fields.values()), "a site holds nothing mutable"
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.unit = 3


def test_the_table_says_which_components_have_heads():
    with_heads = {name for name, component in COMPONENTS.items() if component.has_heads}
    assert with_heads == {"q", "k", "v", "z", "result", "pattern", "attn_scores", "q_input", "k_input", "v_input"}
    assert {name for name, c in COMPONENTS.items() if c.unit == "kv_head"} == {"k", "v", "k_input", "v_input"}
