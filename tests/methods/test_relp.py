"""RelP (`method="relp"`) beyond the per-layer reference of tests/oracles/test_relp_reference.py:
exact where the model is linear in the patch, edges and paths against autograd through RelP's
rules written as hooks, the invariants, and the refusals. (Every family: the support matrix.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, input_hook, linear_metric, logit_diff_metric, make_inputs, raises
from tests.methods.test_edges import naive_score, naive_sender_outputs, receivers_checked
from tests.oracles import induction_model
from tests.oracles.reference import full_cache
from tests.oracles.support_cells import relevance_hooks
from transformer_lens_patching import IterNode, Node, act_patch, attr_edges, attr_patch, attr_path_patch

BATCH = 3
CONSTANT_INPUTS = ("hook_q_input", "hook_k_input")


def relevance_gradient(model, orig, receiver, metric):
    """d metric / d (the receiver's own input) through RelP's rules written as hooks, with each
    head's query and key inputs held constant (the receiver's own input made a leaf after that)."""
    name, leaf = input_hook(model, receiver), {}

    def make_leaf(activation, hook):
        leaf["x"] = activation.detach().clone().requires_grad_(True)
        return leaf["x"]

    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with torch.enable_grad():
            hooks = [*relevance_hooks(model, CONSTANT_INPUTS), (name, make_leaf)]
            (gradient,) = torch.autograd.grad(metric(model.run_with_hooks(orig, fwd_hooks=hooks)), leaf["x"])
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    return gradient[:, :, receiver.head] if receiver.kind == "head" else gradient


def test_every_edge_is_its_receivers_relevance_gradient_times_its_senders_change(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    scores = attr_edges(model, orig, metric, new_input=new, method="relp")
    plain = attr_edges(model, orig, metric, new_input=new)
    assert scores.method == "relp"
    outputs = naive_sender_outputs(model, orig, new)
    checked = 0
    for receiver in receivers_checked(model, scores.graph):
        gradient = relevance_gradient(model, orig, receiver, metric)
        for edge in (edge for edge in scores.graph if edge.receiver == receiver):
            assert_close(scores.score(edge), naive_score(outputs[edge.sender], gradient, False))
            checked += 1
    assert checked > 100
    assert (scores.scores - plain.scores).abs().max() > 1e-3, "the rules change the scores"


def test_a_path_to_the_logits_is_its_edge(gpt2_model):
    """attr_path_patch(method="relp") from every head of layer 1 to the final residual stream: each
    head's estimate is its one edge to the logits in attr_edges(method="relp")."""
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    last = model.cfg.n_layers - 1
    paths = attr_path_patch(
        model, orig, new, IterNode("z", layers=[1]), Node("resid_post", last), metric, method="relp", estimate="delta"
    )["z"].as_tensor()
    edges = attr_edges(model, orig, metric, new_input=new, method="relp")
    expected = [
        edges.score(
            next(
                e
                for e in edges.graph
                if e.sender.kind == "head"
                and e.sender.layer == 1
                and e.sender.head == head
                and e.receiver.kind == "logits"
            )
        )
        for head in range(model.cfg.n_heads)
    ]
    assert_close(paths.reshape(-1), torch.tensor(expected))


@pytest.fixture(scope="module")
def induction():
    model = induction_model.build_induction_model()
    clean = induction_model.repeated_tokens(4, 5)
    return model, clean, induction_model.reverse_first_half(clean)


@pytest.mark.parametrize("component", ["z", "v", "pattern", "attn_out", "resid_post"])
def test_exact_where_the_metric_is_linear_in_the_patch(induction, component):
    """Attention-only, no norm, the last layer, a metric linear in the logits: no rule applies
    between the patch and the metric, so RelP is AtP, and both are exact."""
    model, clean, corrupted = induction
    sweep = IterNode(
        component, layers=[model.cfg.n_layers - 1], seq_pos=None if component in ("attn_out", "resid_post") else -1
    )
    exact = act_patch(model, corrupted, sweep, linear_metric, new_input=clean)[component].as_tensor()
    relp = attr_patch(model, corrupted, sweep, linear_metric, new_input=clean, method="relp")[component].as_tensor()
    assert exact.abs().max() > 0.1, "patching changes the metric"
    torch.testing.assert_close(relp, exact, rtol=1e-5, atol=1e-5)


def test_exact_with_the_pattern_held(induction):
    """The first layer reaches the logits directly, through the second layer's values and through
    its pattern (the induction head's keys). With that pattern held at the orig run's, the model is
    linear in the first layer's z: RelP, which holds it constant, is then exact; AtP is not."""
    model, clean, corrupted = induction
    pattern, z = "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z"
    held, new_z = full_cache(model, corrupted)[pattern], full_cache(model, clean)[z]
    expected = []
    for head in range(model.cfg.n_heads):

        def patched(activation, hook, head=head):
            activation = activation.clone()
            activation[:, :, head] = new_z[:, :, head]
            return activation

        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(pattern, lambda p, hook: held.clone()), (z, patched)])
        expected.append(linear_metric(logits))
    sweep = IterNode("z", layers=[0])
    relp = attr_patch(model, corrupted, sweep, linear_metric, new_input=clean, method="relp")["z"].as_tensor()
    atp = attr_patch(model, corrupted, sweep, linear_metric, new_input=clean)["z"].as_tensor()
    torch.testing.assert_close(relp.reshape(-1), torch.stack(expected), rtol=1e-5, atol=1e-4)
    assert (atp.reshape(-1) - torch.stack(expected)).abs().max() > 1e-2


def test_the_model_is_left_as_it_was(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    before = [(name, len(point.fwd_hooks)) for name, point in model.hook_dict.items()]
    flags = dict(vars(model.cfg))
    attr_edges(model, orig, logit_diff_metric(), new_input=new, method="relp")
    attr_patch(model, orig, IterNode(["z", "post"]), logit_diff_metric(), new_input=new, method="relp")
    assert [(name, len(point.fwd_hooks)) for name, point in model.hook_dict.items()] == before
    assert dict(vars(model.cfg)) == flags
    assert all(parameter.grad is None for parameter in model.parameters())


def test_bad_arguments_are_explained(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    with raises("steps is for method='ig'"):
        attr_patch(model, orig, IterNode("z"), metric, new_input=new, method="relp", steps=4)
    with raises("grad_drop is part of AtP"):
        attr_patch(model, orig, IterNode("z"), metric, new_input=new, method="relp", grad_drop=True, estimate="delta")
    with raises("method must be one of"):
        attr_edges(model, orig, metric, new_input=new, method="lrp")
