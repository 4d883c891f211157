"""Invariants that hold for any model, checked without a reference implementation."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs
from transformer_lens_patching import IterNode, Node, act_patch, path_patch


def metric_of(model, tokens, metric):
    with torch.no_grad():
        return metric(model(tokens))


def test_identical_new_input_changes_nothing(model):
    orig, _ = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    unpatched = metric_of(model, orig, metric)
    layers = [0, model.cfg.n_layers - 1]
    results = act_patch(model, orig, IterNode(["z", "resid_mid", "mlp_out"], layers=layers), metric, new_input=orig)
    for result in results.values():
        assert_close(result, unpatched.expand_as(result))
    for direct in (True, False):
        result = path_patch(
            model, orig, orig, IterNode("z", layers=layers), Node("resid_post", -1), metric, direct_includes_mlps=direct
        )["z"]
        assert_close(result, unpatched.expand_as(result))


@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "resid_post"])
def test_whole_residual_stream_gives_the_new_run(model, component):
    """Replacing the residual stream at every position leaves nothing of orig: the metric is new's."""
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    expected = metric_of(model, new, metric)
    for layer in (0, model.cfg.n_layers // 2, model.cfg.n_layers - 1):
        assert_close(act_patch(model, orig, Node(component, layer), metric, new_input=new), expected)


def test_iter_node_equals_looping_single_nodes(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    sweep = act_patch(
        model, orig, IterNode(["v", "post"], layers=[1], heads=[0, 1], neurons=[2, 9]), metric, new_input=new
    )
    for i, head in enumerate((0, 1)):
        assert_close(sweep["v"][0, i], act_patch(model, orig, Node("v", 1, head=head), metric, new_input=new))
    for i, neuron in enumerate((2, 9)):
        assert_close(sweep["post"][0, i], act_patch(model, orig, Node("post", 1, neuron=neuron), metric, new_input=new))
    receiver = Node("k", 3, head=0)
    for direct in (True, False):
        sweep = path_patch(
            model, orig, new, IterNode("z", layers=[0, 2]), receiver, metric, direct_includes_mlps=direct
        )["z"]
        for i, layer in enumerate((0, 2)):
            for head in range(model.cfg.n_heads):
                single = path_patch(
                    model, orig, new, Node("z", layer, head=head), receiver, metric, direct_includes_mlps=direct
                )
                assert_close(sweep[i, head], single)


def test_attn_out_equals_all_heads_z(model):
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    layer = 1
    all_heads = [Node("z", layer, head=h) for h in range(model.cfg.n_heads)]
    expected = act_patch(model, orig, Node("attn_out", layer), metric, new_input=new)
    assert_close(act_patch(model, orig, all_heads, metric, new_input=new), expected)
    assert_close(act_patch(model, orig, Node("z", layer), metric, new_input=new), expected)
    receiver = Node("resid_post", -1)
    for direct in (True, False):
        assert_close(
            path_patch(model, orig, new, all_heads, receiver, metric, direct_includes_mlps=direct),
            path_patch(model, orig, new, Node("attn_out", layer), receiver, metric, direct_includes_mlps=direct),
        )


def test_sender_after_receiver_has_no_effect(model):
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    unpatched = metric_of(model, orig, metric)
    for direct in (True, False):
        for receiver in (Node("q", 1, head=0), Node("resid_mid", 1), Node("pre", 1)):
            result = path_patch(
                model, orig, new, [Node("z", 2), Node("mlp_out", 1)], receiver, metric, direct_includes_mlps=direct
            )
            assert_close(result, unpatched)


def test_last_layer_head_to_logits_equals_activation_patching(model):
    """Nothing comes after the last layer's heads but its MLP, so with MLPs direct both methods agree."""
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    last = model.cfg.n_layers - 1
    for head in range(model.cfg.n_heads):
        node = Node("z", last, head=head)
        assert_close(
            path_patch(model, orig, new, node, Node("resid_post", last), metric),
            act_patch(model, orig, node, metric, new_input=new),
        )


def test_batched_equals_one_at_a_time(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    sweep = IterNode(["z", "resid_pre"], seq_pos="each", layers=[0, 2])
    one = act_patch(model, orig, sweep, metric, new_input=new, batch_size=1)
    many = act_patch(model, orig, sweep, metric, new_input=new, batch_size=7)
    for name in one:
        assert_close(many[name], one[name])
    for direct in (True, False):
        one = path_patch(
            model, orig, new, IterNode("z"), Node("v", 3, head=0), metric, batch_size=1, direct_includes_mlps=direct
        )
        many = path_patch(
            model, orig, new, IterNode("z"), Node("v", 3, head=0), metric, batch_size=5, direct_includes_mlps=direct
        )
        assert_close(many["z"], one["z"])


def test_zero_ablation_of_everything_upstream_is_not_the_clean_run(small_model):
    """A guard against a source mix-up: zero ablation must differ from resampling."""
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    zero = act_patch(model, orig, Node("z", 1), metric, new_cache="zero")
    resample = act_patch(model, orig, Node("z", 1), metric, new_input=new)
    assert (zero - resample).abs().max() > 1e-3


def test_sweeps_start_at_the_first_patched_layer(small_model):
    """Blocks before the first patch are not run again: block 0 runs once, for the orig residual stream."""
    model = small_model
    orig, _ = make_inputs(model)
    calls = []
    last = model.cfg.n_layers - 1
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: calls.append(act.shape[0]))]):
        act_patch(model, orig, IterNode(["z", "mlp_out"], layers=[last]), logit_diff_metric(), new_cache="zero")
    assert calls == [orig.shape[0]]
