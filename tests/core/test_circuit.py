"""The Circuit type: comparing, hashing, printing, JSON and masks, pruning to what connects the
embeddings to the logits, choosing edges from scores, and its errors. (Running circuits on a
model, evaluate_circuit and faithfulness, is in tests/methods/test_circuits.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import raises
from transformer_lens_patching import Circuit, Edge, EdgeGraph, EdgeScores, GraphNode


def small_graph(kv: int = 2) -> EdgeGraph:
    return EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=kv, has_mlps=True)


def head(layer, h, part=None, kv_head=False):
    return GraphNode("head", layer, head=h, input=part, kv_head=kv_head)


def test_circuits_compare_hash_print_and_round_trip():
    graph = small_graph()
    a = Edge(head(0, 1), head(1, 0, "k"))
    b = Edge(GraphNode("embed"), head(0, 1, "q"))
    circuit = Circuit(graph, [a, b], {a: [-1, 2, 2]})
    assert circuit == Circuit(graph, [b, a], {a: (2, -1)}) and hash(circuit) == hash(
        Circuit(graph, {a, b}, {a: [2, -1]})
    )
    assert circuit != Circuit(graph, [a, b]) and len({circuit, Circuit(graph, [a, b])}) == 2
    assert circuit.edges == [b, a] and list(circuit) == [b, a] and a in circuit and len(circuit) == 2
    assert circuit.positions == {a: (-1, 2)} and circuit.heads == [(0, 1)]
    assert (
        repr(circuit) == f"Circuit(2 of {len(graph)} edges: embed -> head 0.1 (q), head 0.1 -> head 1.0 (k) at [-1, 2])"
    )
    assert Circuit.from_json(circuit.to_json()) == circuit
    assert json.loads(circuit.to_json())["edges"] == ["embed -> head 0.1 (q)", "head 0.1 -> head 1.0 (k)"]
    frame = circuit.to_frame()
    assert list(frame["sender"]) == ["embed", "head 0.1"] and list(frame["positions"]) == [None, (-1, 2)]
    assert repr(Circuit.empty(graph)) == f"Circuit(0 of {len(graph)} edges)" and len(Circuit.full(graph)) == len(graph)
    mask = torch.zeros(len(graph), dtype=torch.bool)
    mask[[graph.index(a), graph.index(b)]] = True
    assert Circuit.from_mask(graph, mask) == Circuit(graph, [a, b]) and torch.equal(Circuit(graph, [a, b]).mask, mask)
    assert {node for edge in (a, b) for node in (edge.sender, edge.receiver)} == set(circuit.nodes)


def test_kept_mask():
    graph = small_graph()
    a = Edge(head(0, 1), head(1, 0, "k"))
    mask = Circuit(graph, graph.edges[1:], {a: [-1]}).kept_mask(4)
    senders, receivers = list(graph.senders), list(graph.receivers)
    first = graph.edges[0]
    assert mask.shape == (4, len(senders), len(receivers))
    assert not mask[:, senders.index(first.sender), receivers.index(first.receiver)].any()
    assert mask[:, senders.index(a.sender), receivers.index(a.receiver)].tolist() == [False, False, False, True]
    assert mask[:, senders.index(GraphNode("mlp", 1)), receivers.index(GraphNode("mlp", 0))].all(), "not an edge"
    assert Circuit.full(graph).kept_mask(4).shape == (1, len(senders), len(receivers))


def test_pruning_keeps_only_edges_from_the_embeddings_to_the_logits():
    graph = small_graph()
    chain = [
        Edge(GraphNode("embed"), head(0, 0, "v")),
        Edge(head(0, 0), GraphNode("mlp", 0)),
        Edge(GraphNode("mlp", 0), GraphNode("logits")),
    ]
    dangling_out = Edge(head(0, 1), head(1, 1, "q"))  # head 0.1 has no input, head 1.1 no output
    dead_end = Edge(GraphNode("embed"), head(1, 0, "q"))  # head 1.0 writes nowhere
    circuit = Circuit(graph, [*chain, dangling_out, dead_end])
    assert circuit.pruned() == Circuit(graph, chain)
    fed = Edge(GraphNode("embed"), head(0, 1, "k"))
    to_logits = Edge(head(1, 1), GraphNode("logits"))
    assert Circuit(graph, [*chain, dangling_out, fed, to_logits]).pruned() == Circuit(
        graph, [*chain, dangling_out, fed, to_logits]
    )
    assert Circuit(graph, [dangling_out]).pruned() == Circuit.empty(graph)


def test_pruning_on_a_grouped_query_graph():
    """A key/value head's input feeds every query head that shares it."""
    graph = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2, has_mlps=False)
    into_kv = Edge(GraphNode("embed"), head(1, 1, "k", kv_head=True))  # feeds heads 1.2 and 1.3
    out_of_3 = Edge(head(1, 3), GraphNode("logits"))
    out_of_1 = Edge(head(1, 1), GraphNode("logits"))
    assert Circuit(graph, [into_kv, out_of_3, out_of_1]).pruned() == Circuit(graph, [into_kv, out_of_3])


def test_circuits_from_scores():
    graph = small_graph()
    values = torch.linspace(-1, 1, len(graph))
    values[3] = float("nan")
    scores = EdgeScores(graph, values, "atp", 0.0)
    assert Circuit.from_scores(scores, 2, prune=False).edges == sorted(
        [graph[0], graph[len(graph) - 1]], key=graph.index
    )
    assert Circuit.from_scores(scores, 1, absolute=False, prune=False).edges == [graph[0]]
    assert len(Circuit.from_scores(scores, 0.5, prune=False)) == len(graph) // 2
    assert graph[3] not in Circuit.from_scores(scores, len(graph) - 1, prune=False)
    assert scores.top(len(graph))[-1] == graph[3], "unscored edges rank last"
    pruned = Circuit.from_scores(scores, 10)
    assert pruned == Circuit.from_scores(scores, 10, prune=False).pruned()


def json_with(graph, **fields) -> str:
    """The JSON of the full circuit of `graph` with some fields replaced."""
    return json.dumps({**json.loads(Circuit.full(graph).to_json()), **fields})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g, e: Circuit("graph", []), "needs the model's EdgeGraph"),
        (lambda g, e: Circuit(g, [Edge(GraphNode("embed"), head(5, 0, "q"))]), "is not an edge of"),
        (
            lambda g, e: Circuit(g, [e], {Edge(GraphNode("embed"), GraphNode("logits")): [1]}),
            "not one of the circuit's",
        ),
        (lambda g, e: Circuit(g, [e], {e: []}), "non-empty collection of ints"),
        (lambda g, e: Circuit(g, [e], {e: [1.5]}), "non-empty collection of ints"),
        (lambda g, e: Circuit(g, [e], {e: [9]}).kept_mask(4), "at position 9, but the prompts have 4 tokens"),
        (lambda g, e: Circuit.from_scores(EdgeScores(g, torch.zeros(len(g)), "atp", 0.0), 1.5), r"in \[0, 1\]"),
        (lambda g, e: Circuit.from_scores(EdgeScores(g, torch.zeros(len(g)), "atp", 0.0), len(g) + 1), "between 0"),
        (lambda g, e: Circuit.from_scores("scores", 3), "needs EdgeScores"),
        (lambda g, e: Circuit.from_mask(g, torch.ones(len(g))), "bool tensor of shape"),
        (lambda g, e: Circuit.from_mask(g, torch.ones(3, dtype=torch.bool)), "bool tensor of shape"),
        (lambda g, e: Circuit.from_mask("graph", torch.ones(3, dtype=torch.bool)), "needs the model's EdgeGraph"),
        (lambda g, e: Circuit.from_json("{}"), "not the JSON of Circuit.to_json"),
        (
            lambda g, e: Circuit.from_json(Circuit(g, [e]).to_json().replace("head 0.1 (q)", "head 0.9 (q)")),
            "edges its graph does not have",
        ),
        (lambda g, e: Circuit.from_json(json_with(g, edges=None)), "its edges are None"),
        (lambda g, e: Circuit.from_json(json_with(g, edges=5)), "its edges are 5"),
        (lambda g, e: Circuit.from_json(json_with(g, positions=[])), r"its positions are \[\]"),
        (
            lambda g, e: Circuit.from_json(json_with(g, positions={"embed -> logits": 3})),
            "the positions of 'embed -> logits' are 3",
        ),
    ],
)
def test_circuit_errors(call, message):
    graph = small_graph()
    with raises(message):
        call(graph, Edge(GraphNode("embed"), head(0, 1, "q")))
