"""Path patching, circuits and edge attribution on models that normalise each attention and MLP
output before adding it to the residual stream (Gemma-2, Gemma-3, OLMo-2): exact against the
two-pass algorithm and the first-order change written literally.

A head's write to the residual stream is not its z times W_O there, so path patching lets the model
compute each layer whose senders change, with every other head frozen at its orig output: the
post-norm sees the sender's change together with the rest of its layer's output, as the
definition (freeze, record, patch) does. Tiny random models: on TransformerLens 4 booted from
the `transformers` configs of Gemma-2 and OLMo-2, on TransformerLens 2 a HookedTransformer with
`use_normalization_before_and_after`.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, logit_diff_metric, n_kv, receiver_node, sender_node
from tests.oracles.models import booted_family, post_norm_hooked
from tests.oracles.reference import full_cache, naive_path_patch, split_qkv_input
from transformer_lens_patching import (
    Circuit,
    Edge,
    EdgeGraph,
    GraphNode,
    IterNode,
    Node,
    attr_edges,
    attr_path_patch,
    evaluate_circuit,
    mean_ablation_cache,
    path_patch,
)

ORIG = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
NEW = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(1))
LAYERS = 3
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
}


@functools.cache
def post_norm_model(family: str):
    """A tiny random post-norm model (3 layers, d_model 64, 4 heads, 2 key/value heads)."""
    if TL_MAJOR < 4:
        return post_norm_hooked(n_layers=LAYERS, seed=int(family == "olmo2")).eval()
    config_class, model_class, extra = FAMILIES[family]
    return booted_family(family, config_class, model_class, num_hidden_layers=LAYERS, initializer_range=0.5, **extra)


@pytest.fixture(params=list(FAMILIES))
def model(request):
    return post_norm_model(request.param)


@pytest.mark.parametrize("mlps_direct", [True, False])
def test_every_head_to_the_logits_is_the_literal_two_pass_algorithm(model, mlps_direct):
    metric = logit_diff_metric()
    ours = path_patch(
        model, ORIG, NEW, IterNode("z"), Node("resid_post", LAYERS - 1), metric, direct_includes_mlps=mlps_direct
    )["z"].as_tensor()
    for layer in range(LAYERS):
        for head in range(model.cfg.n_heads):
            expected = naive_path_patch(
                model,
                ORIG,
                NEW,
                [Node("z", layer, head=head)],
                [Node("resid_post", LAYERS - 1)],
                metric,
                mlps_direct=mlps_direct,
            )
            assert_close(ours[layer, head], expected)


def test_a_head_and_an_mlp_into_a_later_layer(model):
    """Senders in layer 0 (a head, the MLP's neurons) into layer 2's residual stream, its queries and
    its MLP's pre-activations, through the residual stream only: each layer between is computed by
    the model."""
    metric = logit_diff_metric()
    for sender in (Node("z", 0, head=1), Node("post", 0)):
        for receiver in (Node("resid_mid", 2), Node("q", 2, head=3), Node("pre", 2)):
            ours = path_patch(model, ORIG, NEW, sender, receiver, metric, direct_includes_mlps=False)
            expected = naive_path_patch(model, ORIG, NEW, [sender], [receiver], metric, mlps_direct=False)
            assert_close(ours, expected)


def test_patching_from_an_identical_run_changes_nothing(model):
    metric = logit_diff_metric()
    with torch.no_grad():
        unpatched = metric(model(ORIG))
    paths = path_patch(model, ORIG, ORIG, IterNode("z"), Node("resid_post", LAYERS - 1), metric)
    assert torch.equal(paths["z"].as_tensor(), unpatched.expand(LAYERS, model.cfg.n_heads))


# --- circuits: one mix of head outputs through the norm per receiver ---


def edges_of_every_kind(model) -> list[Edge]:
    kv = n_kv(model) != model.cfg.n_heads
    return [
        Edge(GraphNode("embed"), GraphNode("head", 1, head=2, input="q")),
        Edge(GraphNode("head", 0, head=1), GraphNode("head", 2, head=n_kv(model) - 1, input="k", kv_head=kv)),
        Edge(GraphNode("head", 1, head=3), GraphNode("head", 2, head=0, input="v", kv_head=kv)),
        Edge(GraphNode("mlp", 1), GraphNode("logits")),
        Edge(GraphNode("head", 2, head=2), GraphNode("logits")),
        Edge(GraphNode("head", 0, head=2), GraphNode("logits")),
        Edge(GraphNode("mlp", 0), GraphNode("head", 2, head=1, input="q")),
        Edge(GraphNode("head", 0, head=3), GraphNode("head", 2, head=1, input="q")),
    ]


def test_removing_one_edge_is_the_literal_two_pass_algorithm(model):
    """The circuit of every edge but one equals path patching that edge through the residual stream
    only, written literally: the model computes the sender's layer with its other heads frozen."""
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    edges = edges_of_every_kind(model)
    values = evaluate_circuit(model, [Circuit(graph, set(graph) - {e}) for e in edges], ORIG, metric, new_input=NEW)
    for edge, value in zip(edges, values.as_tensor()):
        sender, receiver = sender_node(graph, edge.sender), receiver_node(graph, edge.receiver)
        assert_close(value, naive_path_patch(model, ORIG, NEW, [sender], [receiver], metric, mlps_direct=False))


def test_removing_several_heads_of_a_layer_is_patching_them_together(model):
    """Heads 0.0 to 0.2 removed from the logits' input and from head 2.1's query: the norm of layer
    0 sees all three changed at once, as path patching the three together does."""
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    senders = [GraphNode("head", 0, head=h) for h in range(3)]
    for receiver in (GraphNode("logits"), GraphNode("head", 2, head=1, input="q")):
        circuit = Circuit(graph, set(graph) - {Edge(sender, receiver) for sender in senders})
        expected = naive_path_patch(
            model,
            ORIG,
            NEW,
            [sender_node(graph, sender) for sender in senders],
            [receiver_node(graph, receiver)],
            metric,
            mlps_direct=False,
        )
        assert_close(evaluate_circuit(model, circuit, ORIG, metric, new_input=NEW), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_circuits_are_exact_at_both_ends_and_in_float32(family):
    """The full circuit is the orig run bit for bit, an ablation from the orig run changes nothing
    bit for bit, the empty circuit and the circuit without the logits' edges are the new run (the
    logits read exactly the new run's senders' outputs), and zero, mean and resample ablation of a
    random circuit agree with float64 to 1e-4."""
    model = post_norm_model(family)
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    with torch.no_grad():
        own, own_new = metric(model(ORIG)), metric(model(NEW))
    no_logits = Circuit(graph, [edge for edge in graph if edge.receiver.kind != "logits"])
    rng = random.Random(3)
    some = Circuit(graph, [edge for edge in graph if rng.random() < 0.3])
    assert torch.equal(evaluate_circuit(model, Circuit.full(graph), ORIG, metric, new_input=NEW), own)
    assert torch.equal(evaluate_circuit(model, some, ORIG, metric, new_input=ORIG), own)
    ends = evaluate_circuit(model, [Circuit.empty(graph), no_logits], ORIG, metric, new_input=NEW).as_tensor()
    assert_close(ends, own_new.expand(2, -1))
    wide_model = post_norm_model.__wrapped__(family).to(torch.float64)
    for source in ({"new_cache": "zero"}, {"new_cache": "mean"}, {"new_input": NEW}):
        values = []
        for m in (model, wide_model):
            if source.get("new_cache") == "mean":
                source = {"new_cache": mean_ablation_cache(m.run_with_cache(NEW)[1])}
            values.append(evaluate_circuit(m, [some, no_logits], ORIG, metric, **source).as_tensor())
        torch.testing.assert_close(values[0].double(), values[1], rtol=0, atol=1e-4)


# --- edge attribution: the first-order change through the norm at the run's own outputs ---


def first_order(model, edge: Edge, fraction: float = 0.0) -> torch.Tensor:
    """d metric / d eps of the orig run whose embeddings are `fraction` of the way to the new
    run's, with the edge's receiver input moved by eps times the sender's change, literally: for
    a head, its layer's `ln1_post` applied to that run's attention output plus eps times the
    head's (z_new - z_orig) W_O, minus the norm of that output."""
    metric = logit_diff_metric()
    last = model.cfg.n_layers - 1
    orig, new = full_cache(model, ORIG), full_cache(model, NEW)
    sender, receiver = edge.sender, edge.receiver
    eps = torch.zeros((), requires_grad=True)
    live: dict[str, torch.Tensor] = {}
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: x + fraction * (new[hook.name] - orig[hook.name]))]
    if sender.kind == "head":
        z_name = f"blocks.{sender.layer}.attn.hook_z"
        hooks.append((z_name, lambda z, hook: live.setdefault("z", z.detach())))
    if receiver.kind == "logits":
        receiver_hook, unit = f"blocks.{last}.hook_resid_post", None
    elif receiver.kind == "mlp":
        receiver_hook, unit = f"blocks.{receiver.layer}.hook_mlp_in", None
    else:
        receiver_hook, unit = f"blocks.{receiver.layer}.hook_{receiver.input}_input", receiver.head

    def moved() -> torch.Tensor:
        if sender.kind == "embed":
            return eps * (new["blocks.0.hook_resid_pre"] - orig["blocks.0.hook_resid_pre"])
        if sender.kind == "mlp":
            name = f"blocks.{sender.layer}.hook_mlp_out"
            return eps * (new[name] - orig[name])
        w_o = model.blocks[sender.layer].attn.W_O
        b_o = getattr(model.blocks[sender.layer].attn, "b_O", None)
        before_norm = torch.einsum("bphe,hed->bpd", live["z"], w_o) + (0 if b_o is None else b_o)
        change = (new[z_name] - orig[z_name])[:, :, sender.head] @ w_o[sender.head]
        norm = model.blocks[sender.layer].ln1_post
        return norm(before_norm + eps * change) - norm(before_norm)

    def add(x, hook):
        x = x.clone()
        if unit is None:
            return x + moved()
        x[:, :, unit] = x[:, :, unit] + moved()
        return x

    with split_qkv_input(model, unit is not None):
        value = metric(model.run_with_hooks(ORIG, fwd_hooks=[*hooks, (receiver_hook, add)]))
    (derivative,) = torch.autograd.grad(value, eps)
    return derivative


def test_edge_scores_are_the_first_order_change_through_the_norm(model):
    """EAP of every kind of edge is the derivative written literally; EAP-IG the mean of those
    derivatives at the interpolated embeddings (the norm's Jacobian taken in each run)."""
    edges = edges_of_every_kind(model)
    eap = attr_edges(model, ORIG, logit_diff_metric(), new_input=NEW)
    assert_close(torch.stack([eap.score(edge) for edge in edges]), torch.stack([first_order(model, e) for e in edges]))
    steps = 3
    ig = attr_edges(model, ORIG, logit_diff_metric(), new_input=NEW, method="ig", steps=steps)
    expected = [sum(first_order(model, e, k / steps) for k in range(steps)) / steps for e in edges]
    assert_close(torch.stack([ig.score(edge) for edge in edges]), torch.stack(expected))


def test_attr_path_patch_agrees_with_edge_scores(model):
    """attr_path_patch of every head to the logits through the residual stream only (and of
    layer 0's heads into head 2.1's query) is EAP's score of those edges, for AtP and IG."""
    metric = logit_diff_metric()
    last = model.cfg.n_layers - 1
    for method in ("atp", "ig"):
        scores = attr_edges(model, ORIG, metric, new_input=NEW, method=method, steps=3 if method == "ig" else None)
        steps = {"steps": 3} if method == "ig" else {}
        into_logits = attr_path_patch(
            model, ORIG, NEW, IterNode("z"), Node("resid_post", last), metric, method=method, estimate="delta", **steps
        )["z"].as_tensor()
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                edge = Edge(GraphNode("head", layer, head=head), GraphNode("logits"))
                assert_close(into_logits[layer, head], scores.score(edge))
        into_query = attr_path_patch(
            model,
            ORIG,
            NEW,
            IterNode("z", layers=[0]),
            Node("q", 2, head=1),
            metric,
            method=method,
            estimate="delta",
            **steps,
        )["z"].as_tensor()
        for head in range(model.cfg.n_heads):
            edge = Edge(GraphNode("head", 0, head=head), GraphNode("head", 2, head=1, input="q"))
            assert_close(into_query[0, head], scores.score(edge))


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_a_neuron_s_write_goes_through_the_mlp_s_norm(model, method):
    """attr_path_patch of neuron 0.5 and of all of MLP 0's neurons into the final residual stream is
    the derivative written literally: `ln2_post` of the run's MLP output plus eps times the
    neurons' (post_new - post_orig) W_out, minus the norm of that output (for IG at each
    interpolated run, averaged)."""
    metric, last, steps = logit_diff_metric(), model.cfg.n_layers - 1, 3 if method == "ig" else 1
    orig, new = full_cache(model, ORIG), full_cache(model, NEW)
    post, w_out = "blocks.0.mlp.hook_post", model.blocks[0].mlp.W_out
    b_out = getattr(model.blocks[0].mlp, "b_out", None)

    def derivative(neurons: slice, fraction: float) -> torch.Tensor:
        eps, live = torch.zeros((), requires_grad=True), {}

        def add(x, hook):
            before_norm = live["post"] @ w_out + (0 if b_out is None else b_out)
            change = (new[post] - orig[post])[..., neurons] @ w_out[neurons]
            norm = model.blocks[0].ln2_post
            return x + norm(before_norm + eps * change) - norm(before_norm)

        hooks = [
            ("blocks.0.hook_resid_pre", lambda x, hook: x + fraction * (new[hook.name] - orig[hook.name])),
            (post, lambda x, hook: live.setdefault("post", x.detach())),
            (f"blocks.{last}.hook_resid_post", add),
        ]
        (grad,) = torch.autograd.grad(metric(model.run_with_hooks(ORIG, fwd_hooks=hooks)), eps)
        return grad

    options = {"method": method, "estimate": "delta"} | ({"steps": steps} if method == "ig" else {})
    for sender, neurons in ((Node("post", 0, neuron=5), slice(5, 6)), (Node("post", 0), slice(None))):
        ours = attr_path_patch(model, ORIG, NEW, sender, Node("resid_post", last), metric, **options)
        assert_close(ours, sum(derivative(neurons, k / steps) for k in range(steps)) / steps)


def test_one_prompt_at_a_time_scores_as_the_batch(model):
    """EAP of one prompt is that prompt's row of the batch's per-prompt scores (one prompt per
    gradient chunk once gave the norm's Jacobian a tensor whose rows shared memory)."""
    metric = logit_diff_metric(per_prompt=True)
    batch = attr_edges(model, ORIG, metric, new_input=NEW).scores
    alone = attr_edges(model, ORIG[:1], metric, new_input=NEW[:1]).scores
    assert_close(alone, batch[:, :1])
