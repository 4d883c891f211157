"""Circuits and edge attribution on parallel blocks whose attention and MLP read one shared norm of
the layer's input (Phi, Falcon, Cohere), exact against references written literally.

There the MLP's own input (the residual stream it reads) has no hook: only its norm,
`mlp.hook_in`, does. An edge into MLP m is removed by giving the MLP the norm of the residual
stream with the sender's change taken out; its first-order score pulls the gradient at
`mlp.hook_in` back through that norm. The references below do exactly that by hand, with the
model's own `ln1`. Tiny random models booted from the `transformers` configs (TransformerLens 4:
a TransformerLens 2 HookedTransformer has a hook for the MLP's own input in parallel blocks).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, logit_diff_metric, receiver_node, sender_node
from tests.oracles.models import booted_family
from tests.oracles.reference import full_cache, naive_path_patch
from transformer_lens_patching import Circuit, Edge, EdgeGraph, GraphNode, attr_edges, evaluate_circuit

pytestmark = pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 2 parallel blocks hook the MLP's own input")

ORIG = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
NEW = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(1))
LAYERS = 3
FAMILIES = {
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_key_value_heads=4)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(pad_token_id=0, logit_scale=0.25)),
}


def mlp_norm(model, layer: int) -> tuple[str, torch.nn.Module]:
    """The hook of the residual stream an MLP reads, and the norm the model applies to it."""
    return f"blocks.{layer}.hook_resid_pre", model.blocks[layer].ln1


@functools.cache
def shared_norm_model(family: str):
    config_class, model_class, extra = FAMILIES[family]
    return booted_family(family, config_class, model_class, num_hidden_layers=LAYERS, initializer_range=0.5, **extra)


@pytest.fixture(params=list(FAMILIES))
def model(request):
    return shared_norm_model(request.param)


EDGES_INTO_MLPS = [
    Edge(GraphNode("embed"), GraphNode("mlp", 0)),
    Edge(GraphNode("head", 0, head=1), GraphNode("mlp", 1)),
    Edge(GraphNode("mlp", 0), GraphNode("mlp", 2)),
    Edge(GraphNode("head", 1, head=3), GraphNode("mlp", 2)),
]


def sender_change(model, edge: Edge, orig: dict, new: dict) -> torch.Tensor:
    """The sender's new write to the residual stream minus its orig one, (batch, pos, d_model)."""
    sender = edge.sender
    if sender.kind == "embed":
        return new["blocks.0.hook_resid_pre"] - orig["blocks.0.hook_resid_pre"]
    if sender.kind == "mlp":
        name = f"blocks.{sender.layer}.hook_mlp_out"
        return new[name] - orig[name]
    name = f"blocks.{sender.layer}.attn.hook_z"
    return (new[name] - orig[name])[:, :, sender.head] @ model.blocks[sender.layer].attn.W_O[sender.head]


def mlp_input_replaced(model, edge: Edge) -> torch.Tensor:
    """The metric of the orig run whose MLP (the edge's receiver) reads `ln1` of the layer's input
    with the sender's change taken out, by hand."""
    orig, new = full_cache(model, ORIG), full_cache(model, NEW)
    layer = edge.receiver.layer
    residual_hook, norm = mlp_norm(model, layer)
    residual = orig[residual_hook] + sender_change(model, edge, orig, new)
    hook = (f"blocks.{layer}.mlp.hook_in", lambda x, hook: norm(residual))
    with torch.no_grad():
        return logit_diff_metric(per_prompt=True)(model.run_with_hooks(ORIG, fwd_hooks=[hook]))


def test_removing_one_edge_is_the_run_with_that_change_taken_out(model):
    """Edges into MLPs against the MLP's input replaced by hand; edges into heads and the logits
    against the two-pass algorithm written literally."""
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    into_heads = [
        Edge(GraphNode("mlp", 0), GraphNode("head", 2, head=1, input="q")),
        Edge(GraphNode("head", 1, head=2), GraphNode("logits")),
    ]
    edges = EDGES_INTO_MLPS + into_heads
    values = evaluate_circuit(model, [Circuit(graph, set(graph) - {e}) for e in edges], ORIG, metric, new_input=NEW)
    for edge, value in zip(edges, values.as_tensor()):
        if edge.receiver.kind == "mlp":
            expected = mlp_input_replaced(model, edge)
        else:
            sender, receiver = sender_node(graph, edge.sender), receiver_node(graph, edge.receiver)
            expected = naive_path_patch(model, ORIG, NEW, [sender], [receiver], metric, mlps_direct=False)
        assert_close(value, expected)


def test_the_full_circuit_and_the_empty_one(model):
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    with torch.no_grad():
        own, own_new = metric(model(ORIG)), metric(model(NEW))
    some = Circuit(graph, [edge for i, edge in enumerate(graph) if i % 3 == 0])
    assert torch.equal(evaluate_circuit(model, Circuit.full(graph), ORIG, metric, new_input=NEW), own)
    assert_close(evaluate_circuit(model, some, ORIG, metric, new_input=ORIG), own)
    assert_close(evaluate_circuit(model, Circuit.empty(graph), ORIG, metric, new_input=NEW), own_new)


def first_order(model, edge: Edge, fraction: float = 0.0) -> torch.Tensor:
    """d metric / d eps of the orig run whose embeddings are `fraction` of the way to the new
    run's, with the receiving MLP reading `ln1` of its layer's input in that run plus eps times
    the sender's change, literally."""
    orig, new = full_cache(model, ORIG), full_cache(model, NEW)
    change, layer = sender_change(model, edge, orig, new), edge.receiver.layer
    residual_hook, norm = mlp_norm(model, layer)
    eps, live = torch.zeros((), requires_grad=True), {}

    def interpolated(x, hook):
        x = x + fraction * (new[hook.name] - orig[hook.name])
        if hook.name == residual_hook:
            live["residual"] = x.detach()
        return x

    hooks = [
        ("blocks.0.hook_resid_pre", interpolated),
        (residual_hook, lambda x, hook: live.setdefault("residual", x.detach())),
        (f"blocks.{layer}.mlp.hook_in", lambda x, hook: norm(live["residual"] + eps * change)),
    ]
    value = logit_diff_metric()(model.run_with_hooks(ORIG, fwd_hooks=hooks))
    (derivative,) = torch.autograd.grad(value, eps)
    return derivative


def test_edge_scores_into_mlps_pull_the_gradient_back_through_the_norm(model):
    """EAP of edges into MLPs is the derivative written literally; EAP-IG the mean of those
    derivatives at the interpolated embeddings (the norm's Jacobian taken in each run)."""
    metric = logit_diff_metric()
    eap = attr_edges(model, ORIG, metric, new_input=NEW)
    expected = torch.stack([first_order(model, edge) for edge in EDGES_INTO_MLPS])
    assert_close(torch.stack([eap.score(edge) for edge in EDGES_INTO_MLPS]), expected)
    steps = 3
    ig = attr_edges(model, ORIG, metric, new_input=NEW, method="ig", steps=steps)
    expected = [sum(first_order(model, edge, k / steps) for k in range(steps)) / steps for edge in EDGES_INTO_MLPS]
    assert_close(torch.stack([ig.score(edge) for edge in EDGES_INTO_MLPS]), torch.stack(expected))
