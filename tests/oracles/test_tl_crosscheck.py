"""act_patch sweeps against TransformerLens 4's own `patching.get_act_patch_*` helpers, and
attr_patch / attr_edges against its attribution-patching helpers (`attribution_patch`)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, logit_diff_metric, make_inputs
from transformer_lens_patching import IterNode, act_patch, attr_patch

pytestmark = pytest.mark.skipif(TL_MAJOR < 4, reason="the helpers cross-checked here are TransformerLens 4.3's")


@pytest.fixture
def setup(gpt2_model):
    orig, new = make_inputs(gpt2_model)
    with torch.no_grad():
        _, new_cache = gpt2_model.run_with_cache(new)
    return gpt2_model, orig, new, new_cache, logit_diff_metric()


@pytest.mark.parametrize(
    "component, helper",
    [
        ("z", "get_act_patch_attn_head_out_all_pos"),
        ("q", "get_act_patch_attn_head_q_all_pos"),
        ("k", "get_act_patch_attn_head_k_all_pos"),
        ("v", "get_act_patch_attn_head_v_all_pos"),
        ("pattern", "get_act_patch_attn_head_pattern_all_pos"),
    ],
)
def test_heads_all_positions(setup, component, helper):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    ours = act_patch(model, orig, IterNode(component), metric, new_input=new)[component]
    assert ours.dims == ("layer", "head")
    with torch.no_grad():
        assert_close(ours, getattr(patching, helper)(model, orig, new_cache, metric))


def test_heads_by_position(setup):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    ours = act_patch(model, orig, IterNode("z", seq_pos="each"), metric, new_input=new)["z"]
    with torch.no_grad():
        theirs = patching.get_act_patch_attn_head_out_by_pos(model, orig, new_cache, metric)
    assert_close(ours.permute_dims("layer", "seq_pos", "head"), theirs)


def test_block_every(setup):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    names = ["resid_pre", "attn_out", "mlp_out"]
    ours = act_patch(model, orig, IterNode(names, seq_pos="each"), metric, new_input=new)
    with torch.no_grad():
        theirs = patching.get_act_patch_block_every(model, orig, new_cache, metric)
    for index, name in enumerate(names):
        assert ours[name].dims == ("seq_pos", "layer")
        assert_close(ours[name].permute_dims("layer", "seq_pos"), theirs[index])


# TransformerLens 4.3's `attribution_patch(model, clean, corrupt, metric_fn)` takes the gradient
# in the *corrupt* run and scores `(a_clean - a_corrupt) . gradient`: its corrupt run is our
# orig run (whose activations are patched, where the gradient is taken) and its clean run our
# new run, so its score is our estimate="delta", with the same sign. It scores each prompt pair
# on its own, with `metric_fn` of that one prompt's logits, and averages the pairs; our metric
# is the mean over the prompts of the same per-prompt metric, whose gradient gives each
# prompt's own term its 1 / batch, so our estimate is that average. It scores every position
# apart (our seq_pos="each") and knows only the token embedding, head outputs (`z`) and MLP
# outputs as nodes. Its edges are ours (the same senders, receivers and reach), scored at
# each position apart: ours sum over positions. Its embedding writer is the token embedding
# alone and ours the residual stream entering layer 0; they differ by the position
# embedding, the same in both runs, so their differences are equal.


def _tl_attribution(model, orig, new, metric, granularity: str):
    from transformer_lens.tools.analysis import attribution_patching

    config = attribution_patching.EdgeAttributionConfig(granularity=granularity)
    return attribution_patching.attribution_patch(model, new, orig, metric, config)


def test_attr_patch_equals_tl_node_attribution(setup):
    model, orig, new, _, metric = setup
    ours = attr_patch(
        model, orig, IterNode(["embed", "z", "mlp_out"], seq_pos="each"), metric, new_input=new, estimate="delta"
    )
    assert ours["z"].dims == ("seq_pos", "layer", "head") and ours["mlp_out"].dims == ("seq_pos", "layer")
    theirs = {name: torch.full(ours[name].shape, float("nan")) for name in ours}
    for node, score in _tl_attribution(model, orig, new, metric, "node").node_scores.items():
        if node.kind == "embed":
            theirs["embed"][node.position] = score
        elif node.kind == "attn_head_out":
            theirs["z"][node.position, node.layer, node.head] = score
        else:
            theirs["mlp_out"][node.position, node.layer] = score
    for name in ours:
        assert_close(ours[name], theirs[name])


def _graph_node(node):
    """TransformerLens' attribution `Node` as our GraphNode (positions dropped)."""
    from transformer_lens_patching import GraphNode

    if node.kind in ("embed", "logits"):
        return GraphNode(node.kind)
    if node.kind in ("mlp_out", "mlp_in"):
        return GraphNode("mlp", node.layer)
    receiver_input = None if node.kind == "attn_head_out" else node.kind.removesuffix("_input")
    return GraphNode("head", node.layer, head=node.head, input=receiver_input)


def test_attr_edges_equals_tl_edge_attribution(gpt2_model):
    from transformer_lens_patching import Edge, attr_edges

    model, metric = gpt2_model, logit_diff_metric()
    orig, new = make_inputs(model, batch=2, seq_len=4)  # its edges are Python objects per position: keep it small
    ours = attr_edges(model, orig, metric, new_input=new)
    theirs = torch.zeros(len(ours.graph), dtype=torch.float64)
    positions = torch.zeros(len(ours.graph), dtype=torch.long)
    for (writer, reader), score in _tl_attribution(model, orig, new, metric, "edge").edge_scores.items():
        index = ours.graph.index(Edge(_graph_node(writer), _graph_node(reader)))
        theirs[index] += score
        positions[index] += 1
    assert (positions == orig.shape[1]).all(), "every edge of ours is theirs at every position, and no other"
    assert_close(ours.scores, theirs)
