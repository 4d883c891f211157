"""The edge graph's types: GraphNode, Edge and EdgeGraph (printing, comparing, sorting in forward
order, which edges exist) and EdgeScores (ranking, tables and JSON)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import logit_diff_metric, make_inputs, raises
from transformer_lens_patching import Edge, EdgeGraph, EdgeScores, GraphNode, attr_edges

BATCH = 3


def test_graph_nodes_print_compare_and_sort_in_forward_order():
    q, k = GraphNode("head", 5, head=1, input="q"), GraphNode("head", 3, head=1, input="k", kv_head=True)
    assert [
        str(n)
        for n in (GraphNode("embed"), GraphNode("head", 3, head=2), GraphNode("mlp", 5), q, k, GraphNode("logits"))
    ] == ["embed", "head 3.2", "mlp 5", "head 5.1 (q)", "kv head 3.1 (k)", "logits"]
    assert GraphNode("head", 3, head=2) == GraphNode("head", 3, head=2) and len({q, GraphNode("head", 5, 1, "q")}) == 1
    order = [
        GraphNode("embed"),
        GraphNode("head", 0, head=1, input="q"),
        GraphNode("head", 0, head=0, input="v"),
        GraphNode("head", 0, head=0),
        GraphNode("head", 0, head=1),
        GraphNode("mlp", 0),
        GraphNode("head", 1, head=0, input="q"),
        GraphNode("logits"),
    ]
    shuffled = order[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != order and sorted(shuffled) == order
    assert repr(k) == "GraphNode('head', 3, head=1, input='k', kv_head=True)"
    bad = [
        ({"kind": "attn"}, "kind must be one of"),
        ({"kind": "mlp"}, "takes a layer"),
        ({"kind": "head", "layer": 1}, "takes a head"),
        ({"kind": "logits", "layer": 2}, "takes no layer"),
        ({"kind": "mlp", "layer": 1, "input": "q"}, "Only head receivers have an input"),
        ({"kind": "head", "layer": 1, "head": 0, "input": "q", "kv_head": True}, "kv_head=True is for"),
    ]
    for fields, message in bad:
        with raises(message):
            GraphNode(**fields)


def test_edges_hash_print_and_sort_as_the_graph_lists_them():
    graph = EdgeGraph(n_layers=3, n_heads=4, n_kv_heads=2, has_mlps=True)
    per_layer = 4 + 2 * 2 + 1
    expected = (
        (3 * per_layer + 1)
        + sum(1 + (2 - layer) * per_layer + 1 for layer in range(3)) * 4
        + sum((2 - layer) * per_layer + 1 for layer in range(3))
    )
    assert len(graph) == expected == len(set(graph))
    shuffled = list(graph)
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled) == list(graph)
    edge = Edge(GraphNode("head", 0, head=3), GraphNode("head", 2, head=1, input="v", kv_head=True))
    assert str(edge) == "head 0.3 -> kv head 2.1 (v)" and repr(edge) == "Edge(head 0.3 -> kv head 2.1 (v))"
    assert graph[graph.index(edge)] == edge and edge in graph and {edge: 1}[Edge(edge.sender, edge.receiver)] == 1
    assert Edge(GraphNode("head", 1, head=0), GraphNode("mlp", 1)) in graph
    assert Edge(GraphNode("mlp", 1), GraphNode("head", 1, head=0, input="q")) not in graph
    with raises("writes after the receiver reads"):
        graph.index(Edge(GraphNode("mlp", 2), GraphNode("mlp", 2)))
    with raises("no node GraphNode\\('head', 5, head=0\\)"):
        graph.index(Edge(GraphNode("head", 5, head=0), GraphNode("logits")))
    with raises("cannot be the receiver"):
        Edge(GraphNode("embed"), GraphNode("head", 1, head=0))
    assert len(EdgeGraph(2, 2, 2, has_mlps=False)) == (2 * 6 + 1) + 2 * (6 + 1) + 2 * 1
    assert EdgeGraph(2, 2, 2, True) == EdgeGraph(2, 2, 2, True) != EdgeGraph(2, 2, 1, True)


@pytest.fixture(scope="module")
def per_prompt_scores(gqa_model):
    orig, new = make_inputs(gqa_model, batch=BATCH)
    return attr_edges(gqa_model, orig, logit_diff_metric(per_prompt=True), new_input=new)


def test_scores_rank_tabulate_and_round_trip_through_json(per_prompt_scores):
    scores = per_prompt_scores
    summed = EdgeScores(scores.graph, scores.scores.sum(1), "atp", float(scores.unpatched.sum()))
    order = sorted(range(len(scores.graph)), key=lambda i: -abs(float(scores.scores[i].mean())))
    assert scores.top(5) == [scores.graph[i] for i in order[:5]]
    strongest = sorted(range(len(scores.graph)), key=lambda i: -abs(float(summed.scores[i])))
    assert summed.top(3) == [scores.graph[i] for i in strongest[:3]]
    frame = summed.to_frame()
    assert list(frame.columns) == [
        "sender",
        "receiver",
        "sender_kind",
        "sender_layer",
        "sender_head",
        "receiver_kind",
        "receiver_layer",
        "receiver_head",
        "receiver_input",
        "kv_head",
        "score",
    ]
    row = frame.iloc[summed.graph.index(summed.top(1)[0])]
    assert row["score"] == pytest.approx(float(summed.score(summed.top(1)[0])))
    long = scores.to_frame()
    assert len(long) == len(scores.graph) * BATCH and long["batch"].tolist()[:BATCH] == list(range(BATCH))
    kv_row = long[(long["receiver_input"] == "k") & (long["batch"] == 1)].iloc[0]
    assert kv_row["kv_head"] and kv_row["receiver"].startswith("kv head")
    for original in (scores, summed):
        text = original.to_json()
        back = EdgeScores.from_json(text)
        assert back.graph == original.graph and torch.equal(back.scores, original.scores) and back.method == "atp"
        assert (
            torch.equal(back.unpatched, original.unpatched)
            if isinstance(original.unpatched, torch.Tensor)
            else back.unpatched == original.unpatched
        )
        assert json.loads(text)["edges"][0] == "embed -> head 0.0 (q)"
    assert "EdgeScores(atp: " in repr(scores) and f"{len(scores.graph)} edges x {BATCH} prompts" in repr(scores)
    changed = json.loads(summed.to_json())
    changed["edges"][0] = "embed -> logits"
    with raises("not those of its graph"):
        EdgeScores.from_json(json.dumps(changed))
    with raises("not the JSON of EdgeScores"):
        EdgeScores.from_json("{}")
    with raises("one row per edge"):
        EdgeScores(scores.graph, torch.zeros(3), "atp", 0.0)
