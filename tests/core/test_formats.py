"""EAP-IG's graph JSON and MIB's submission folders: the names, order and layout checked against
hand-written files (tests/fixtures/formats, written from EAP-IG's `Graph.to_json` and MIB's
circuit-track README), exact round trips on the random test models, the grouped-query mapping,
and the refusals (with the closest valid name for a wrong one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import make_inputs, raises
from transformer_lens_patching import Circuit, Edge, EdgeGraph, EdgeScores, GraphNode, evaluate_circuit
from transformer_lens_patching._core.formats import (
    MIB_CIRCUIT_FRACTIONS,
    eap_ig_circuit,
    eap_ig_scores,
    read_mib_submission,
    to_eap_ig_json,
    write_mib_submission,
)
from transformer_lens_patching._methods.faithfulness import MIB_FRACTIONS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text().strip()


def head(layer, h, part=None, kv_head=False):
    return GraphNode("head", layer, head=h, input=part, kv_head=kv_head)


EMBED, LOGITS = GraphNode("embed"), GraphNode("logits")


def mlp(layer):
    return GraphNode("mlp", layer)


ONE_LAYER = EdgeGraph(n_layers=1, n_heads=1, n_kv_heads=1, has_mlps=True)
ONE_LAYER_SCORES = torch.tensor([0.5, -0.25, 0.125, 1.5, 0.0, -2.0, 0.75, -0.0625])
"""The hand-written file's scores, in this graph's order (EAP-IG's has `a0.h0->m0` before `input->logits`)."""
TWO_LAYERS = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=True)


def random_scores(graph: EdgeGraph, seed: int = 0, dtype=torch.float32) -> EdgeScores:
    values = torch.randn(len(graph), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return EdgeScores(graph, values, "atp", 0.25)


def test_the_hand_written_files_are_what_eap_ig_writes_byte_for_byte():
    """Key order, edge order, node membership and float spelling as EAP-IG's Graph.to_json (json.dump)."""
    scores = EdgeScores(ONE_LAYER, ONE_LAYER_SCORES, "atp", 0.0)
    assert [str(edge) for edge in ONE_LAYER.edges][:3] == [f"embed -> head 0.0 ({p})" for p in "qkv"]
    assert to_eap_ig_json(scores, d_model=4) == fixture("eap_ig_1l1h_scores.json")
    read = eap_ig_scores(fixture("eap_ig_1l1h_scores.json"), ONE_LAYER)
    assert read.scores.dtype == torch.float32 and torch.equal(read.scores, ONE_LAYER_SCORES)
    assert read.method == "imported" and math.isnan(read.unpatched)
    kept = [Edge(EMBED, head(0, 0, "v")), Edge(EMBED, mlp(0)), Edge(head(0, 0), LOGITS)]
    circuit = Circuit(ONE_LAYER, kept)  # mlp 0 is fed but feeds nothing: EAP-IG leaves that node out
    assert to_eap_ig_json(circuit, d_model=4, scores=scores) == fixture("eap_ig_1l1h_circuit.json")
    assert eap_ig_circuit(fixture("eap_ig_1l1h_circuit.json"), ONE_LAYER) == circuit


def test_gpt2_small_has_the_edges_of_mibs_example_file():
    """MIB's example importance file for GPT-2 small (circuits/ioi-eap-ig.json) has 32,491 edges, the first
    three `input->a0.h0<q|k|v>`, the last `m11->logits`: EAP-IG's graph of it is this library's."""
    graph = EdgeGraph(n_layers=12, n_heads=12, n_kv_heads=12, has_mlps=True)
    data = json.loads(to_eap_ig_json(Circuit.empty(graph), d_model=768))
    names = list(data["edges"])
    assert len(names) == len(graph) == 32491
    assert names[:3] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>"] and names[-1] == "m11->logits"
    assert data["cfg"] == {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 768}
    assert list(data["nodes"])[:2] == ["input", "a0.h0"] and list(data["nodes"])[-2:] == ["m11", "logits"]


def test_round_trips_are_exact(gpt2_model):
    graph = EdgeGraph.of(gpt2_model)
    scores = random_scores(graph)
    text = to_eap_ig_json(scores, d_model=64)
    read = eap_ig_scores(text, graph)
    assert read.graph == graph and read.scores.dtype == torch.float32 and torch.equal(read.scores, scores.scores)
    assert to_eap_ig_json(read, d_model=64) == text
    double = random_scores(graph, dtype=torch.float64)
    read = eap_ig_scores(to_eap_ig_json(double, d_model=64), graph, dtype=torch.float64)
    assert torch.equal(read.scores, double.scores)
    unscored = scores.scores.clone()
    unscored[[0, 5]] = math.nan
    back = eap_ig_scores(to_eap_ig_json(EdgeScores(graph, unscored, "exact", 0.0), d_model=64), graph).scores
    assert torch.equal(back.isnan(), unscored.isnan()) and torch.equal(back.nan_to_num(), unscored.nan_to_num())
    for circuit in (Circuit.from_scores(scores, 0.05), Circuit.full(graph), Circuit.empty(graph)):
        assert eap_ig_circuit(to_eap_ig_json(circuit, d_model=64), graph) == circuit
    circuit = Circuit.from_scores(scores, 0.05)
    both = to_eap_ig_json(circuit, d_model=64, scores=scores)
    assert eap_ig_circuit(both, graph) == circuit and torch.equal(eap_ig_scores(both, graph).scores, scores.scores)


def test_a_circuit_discovered_elsewhere_is_evaluated_exactly_here(gpt2_model):
    graph = EdgeGraph.of(gpt2_model)
    circuit = eap_ig_circuit(fixture("eap_ig_gpt2_like_circuit.json"), graph)
    by_hand = Circuit(
        graph,
        [
            Edge(EMBED, head(0, 1, "v")),
            Edge(head(0, 1), mlp(0)),
            Edge(mlp(0), head(3, 2, "q")),
            Edge(head(0, 1), head(3, 2, "k")),
            Edge(head(3, 2), mlp(5)),
            Edge(mlp(5), LOGITS),
            Edge(EMBED, LOGITS),
        ],
    )
    assert circuit == by_hand and circuit.pruned() == by_hand
    orig, new = make_inputs(gpt2_model, batch=2, seq_len=5)
    values = evaluate_circuit(gpt2_model, [circuit, by_hand], orig, lambda logits: logits[:, -1, 5].mean(), new)
    assert torch.equal(values[0], values[1])
    with raises("EAP-IG writes each edge as"):
        eap_ig_scores(fixture("eap_ig_gpt2_like_circuit.json"), graph)  # a circuit without scores


def test_a_partial_file_reads_as_eap_ig_loads_it():
    """Edges a file leaves out score 0 and are not in the graph; node entries do not matter."""
    text = fixture("eap_ig_2l2h_partial.json")
    scores = eap_ig_scores(text, TWO_LAYERS)
    listed = {
        Edge(EMBED, head(0, 1, "v")): 0.5,
        Edge(head(0, 1), mlp(0)): -0.25,
        Edge(mlp(0), head(1, 0, "q")): 1.25,
        Edge(head(1, 0), LOGITS): -1.0,
        Edge(EMBED, LOGITS): 0.375,
        Edge(head(0, 0), head(1, 1, "k")): -0.125,
        Edge(mlp(1), LOGITS): 2.0,
    }
    expected = torch.zeros(len(TWO_LAYERS))
    for edge, value in listed.items():
        expected[TWO_LAYERS.index(edge)] = value
    assert torch.equal(scores.scores, expected) and scores.top(1) == [Edge(mlp(1), LOGITS)]
    assert eap_ig_circuit(text, TWO_LAYERS) == Circuit(TWO_LAYERS, list(listed)[:4])


def test_parallel_blocks_have_no_edge_from_a_layers_heads_to_its_mlp():
    graph = EdgeGraph(n_layers=2, n_heads=1, n_kv_heads=1, has_mlps=True, parallel_attn_mlp=True)
    text = fixture("eap_ig_parallel.json")
    kept = [Edge(EMBED, head(0, 0, "q")), Edge(head(0, 0), mlp(1)), Edge(mlp(1), LOGITS)]
    assert eap_ig_circuit(text, graph) == Circuit(graph, kept)
    assert float(eap_ig_scores(text, graph).score(Edge(EMBED, mlp(0)))) == 1.0
    assert json.loads(to_eap_ig_json(Circuit.full(graph), d_model=4))["cfg"]["parallel_attn_mlp"] is True
    data = json.loads(text)
    data["edges"]["a0.h0->m0"] = {"score": 0.0, "in_graph": True}
    with raises("'a0.h0->m0'.*closest valid name is 'input->m0'"):
        eap_ig_circuit(json.dumps(data), graph)
    with raises("parallel_attn_mlp=True.*parallel_attn_mlp=False"):
        eap_ig_circuit(text, EdgeGraph(n_layers=2, n_heads=1, n_kv_heads=1, has_mlps=True))


def test_grouped_query_edges_are_each_query_heads_in_eap_ig(gqa_model):
    """EAP-IG ungroups the key/value heads: an edge into `kv head L.g` is one edge into each query
    head of group g, and a file is read only where the group agrees."""
    graph = EdgeGraph.of(gqa_model)
    assert (graph.n_heads, graph.n_kv_heads) == (6, 2)
    text = fixture("eap_ig_gqa_circuit.json")
    kept = [
        Edge(EMBED, head(1, 0, "k", kv_head=True)),
        Edge(EMBED, head(1, 1, "v", kv_head=True)),
        Edge(head(0, 2), head(1, 5, "q")),
        Edge(head(1, 4), LOGITS),
    ]
    circuit = eap_ig_circuit(text, graph)
    assert circuit == Circuit(graph, kept)
    assert float(eap_ig_scores(text, graph).score(kept[0])) == 0.5
    written = json.loads(to_eap_ig_json(circuit, d_model=48))
    assert [name for name, info in written["edges"].items() if info["in_graph"]] == [
        "input->a1.h0<k>",
        "input->a1.h1<k>",
        "input->a1.h2<k>",
        "input->a1.h3<v>",
        "input->a1.h4<v>",
        "input->a1.h5<v>",
        "a0.h2->a1.h5<q>",
        "a1.h4->logits",
    ]
    assert len(written["edges"]) > len(graph)
    scores = random_scores(graph)
    assert torch.equal(eap_ig_scores(to_eap_ig_json(scores, d_model=48), graph).scores, scores.scores)
    full = Circuit.from_scores(scores, 0.2)
    assert eap_ig_circuit(to_eap_ig_json(full, d_model=48), graph) == full
    split = json.loads(text)
    split["edges"]["input->a1.h1<k>"]["in_graph"] = False
    with raises(r"'input->a1.h0<k>' and 'input->a1.h1<k>' different memberships.*embed -> kv head 1.0 \(k\)"):
        eap_ig_circuit(json.dumps(split), graph)
    split = json.loads(text)
    split["edges"]["input->a1.h2<k>"]["score"] = 0.75
    with raises("'input->a1.h0<k>' and 'input->a1.h2<k>' different scores"):
        eap_ig_scores(json.dumps(split), graph)


@pytest.mark.parametrize(
    "name, closest",
    [
        ("input->a0.h2<q>", "input->a0.h0<q>"),  # no head 2
        ("a1.h0->m0", "a0.h0->m0"),  # written after m0 reads
        ("input->a0.h0", "input->a0.h0<q>"),  # a head child needs <q>, <k> or <v>
        ("m2->logits", "m0->logits"),  # no layer 2
        ("embed->logits", "input->logits"),  # EAP-IG calls the embeddings "input"
        ("head 0.1 -> mlp 1", "a0.h1->m1"),  # this library's name
    ],
)
def test_a_wrong_name_errors_with_the_closest_valid_one(name, closest):
    data = json.loads(fixture("eap_ig_2l2h_partial.json"))
    data["edges"][name] = {"score": 1.0, "in_graph": True}
    with raises(f"{name!r}.*closest valid name is {closest!r}"):
        eap_ig_scores(json.dumps(data), TWO_LAYERS)
    data = {"cfg": data["cfg"], "nodes": {}, "edges": {"nonsense": {"score": 1.0, "in_graph": True}}}
    with raises("names are 'parent->child', e.g. 'input->a0.h0<q>'"):
        eap_ig_scores(json.dumps(data), TWO_LAYERS)


def test_what_eap_ig_cannot_express_is_refused():
    with raises("no MLPs"):
        to_eap_ig_json(Circuit.empty(EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=False)), d_model=8)
    edge = Edge(EMBED, LOGITS)
    with raises(r"keeps embed -> logits at positions \[-1\] only"):
        to_eap_ig_json(Circuit(TWO_LAYERS, [edge], {edge: [-1]}), d_model=8)
    per_prompt = EdgeScores(TWO_LAYERS, torch.zeros(len(TWO_LAYERS), 3), "atp", torch.zeros(3))
    with raises("one score per edge.*one per prompt"):
        to_eap_ig_json(per_prompt, d_model=8)
    with raises("node 'm0' is in the graph with some of its neurons only"):
        eap_ig_circuit(fixture("eap_ig_neurons.json"), ONE_LAYER)
    node_level = json.loads(fixture("eap_ig_1l1h_scores.json"))
    node_level["nodes"]["m0"]["score"] = 0.5
    with raises("scores its nodes.*'m0'"):
        eap_ig_scores(json.dumps(node_level), ONE_LAYER)
    assert len(eap_ig_circuit(json.dumps(node_level), ONE_LAYER)) == 0
    with raises("n_layers=2, n_heads=2.*n_layers=1, n_heads=1"):
        eap_ig_scores(fixture("eap_ig_2l2h_partial.json"), ONE_LAYER)
    with raises("not JSON"):
        eap_ig_scores("{'cfg': 1}", ONE_LAYER)
    with raises("'cfg', 'nodes' and 'edges'; this has \\['cfg', 'edges'\\]"):
        eap_ig_scores(json.dumps({"cfg": {}, "edges": {}}), ONE_LAYER)
    with raises("'input->m0' is 1.5; EAP-IG writes each edge as"):
        eap_ig_scores(fixture("eap_ig_1l1h_scores.json").replace('{"score": 1.5, "in_graph": false}', "1.5"), ONE_LAYER)
    with raises("d_model=model.cfg.d_model"):
        to_eap_ig_json(Circuit.empty(ONE_LAYER), d_model=0)
    with raises("must share a graph"):
        to_eap_ig_json(Circuit.empty(ONE_LAYER), d_model=4, scores=random_scores(TWO_LAYERS))


def test_mib_importance_folders(tmp_path):
    scores = EdgeScores(ONE_LAYER, ONE_LAYER_SCORES, "atp", 0.0)
    written = write_mib_submission(tmp_path, scores, task="ioi", model="tiny", d_model=4)
    assert written == tmp_path / "ioi_tiny" and [p.name for p in written.iterdir()] == ["importances.json"]
    assert (written / "importances.json").read_text() == fixture("mib/importances/ioi_tiny/importances.json")
    read = read_mib_submission(FIXTURES / "mib" / "importances" / "ioi_tiny", ONE_LAYER)
    assert torch.equal(read.scores, ONE_LAYER_SCORES)
    assert torch.equal(read_mib_submission(written / "importances.json", ONE_LAYER).scores, ONE_LAYER_SCORES)
    assert write_mib_submission(tmp_path, scores, task="arc_easy", model="tiny", d_model=4).name == "arc-easy_tiny"


def test_mib_circuit_folders(tmp_path, gpt2_model, gqa_model):
    assert MIB_CIRCUIT_FRACTIONS == MIB_FRACTIONS[:-1]
    circuits = read_mib_submission(FIXTURES / "mib" / "circuits" / "arc-easy_tiny", TWO_LAYERS)
    assert [len(circuit) for circuit in circuits] == [0, 0, 0, 0, 0, 2, 4, 7, 11]
    assert circuits[5] == Circuit(TWO_LAYERS, [Edge(EMBED, head(0, 1, "v")), Edge(head(0, 1), LOGITS)])
    written = write_mib_submission(tmp_path, circuits, task="arc_easy", model="tiny", d_model=8)
    names = sorted(f"arc-easy_tiny_{fraction:g}.json" for fraction in MIB_CIRCUIT_FRACTIONS)
    assert sorted(p.name for p in written.iterdir()) == names
    assert read_mib_submission(written, TWO_LAYERS) == circuits
    assert "score" not in json.loads((written / "arc-easy_tiny_0.5.json").read_text())["edges"]["m1->logits"]

    graph = EdgeGraph.of(gpt2_model)
    scores = random_scores(graph)
    folder = write_mib_submission(tmp_path / "eap", scores, task="ioi", model="gpt2", d_model=64, kind="circuits")
    from_scores = [Circuit.from_scores(scores, fraction) for fraction in MIB_CIRCUIT_FRACTIONS]
    assert read_mib_submission(folder, graph) == from_scores
    assert torch.equal(eap_ig_scores((folder / "ioi_gpt2_0.1.json").read_text(), graph).scores, scores.scores)

    graph = EdgeGraph.of(gqa_model)
    scores = random_scores(graph)
    folder = write_mib_submission(tmp_path / "gqa", scores, task="ioi", model="qwen2.5", d_model=48, kind="circuits")
    total = len(json.loads(to_eap_ig_json(scores, d_model=48))["edges"])
    for fraction in MIB_CIRCUIT_FRACTIONS:
        kept = json.loads((folder / f"ioi_qwen2.5_{fraction:g}.json").read_text())["edges"].values()
        assert sum(info["in_graph"] for info in kept) <= int(fraction * total), fraction


def test_mib_refusals(tmp_path):
    circuits = read_mib_submission(FIXTURES / "mib" / "circuits" / "arc-easy_tiny", TWO_LAYERS)
    with raises("MIB takes 9 circuits"):
        write_mib_submission(tmp_path, circuits[:8], task="ioi", model="tiny", d_model=8)
    with raises("circuit 4 may keep at most 2.0% of EAP-IG's 46 edges, 0; this one keeps 2"):
        write_mib_submission(tmp_path, circuits[1:] + circuits[-1:], task="ioi", model="tiny", d_model=8)
    with raises("cannot have one; got 'gpt_2'"):
        write_mib_submission(tmp_path, circuits, task="ioi", model="gpt_2", d_model=8)
    with raises("kind must be 'importance' or 'circuits'"):
        write_mib_submission(tmp_path, random_scores(TWO_LAYERS), task="ioi", model="tiny", d_model=8, kind="both")
    write_mib_submission(tmp_path, random_scores(TWO_LAYERS), task="ioi", model="tiny", d_model=8)
    with raises(r"already holds \['importances.json'\]"):
        write_mib_submission(tmp_path, circuits, task="ioi", model="tiny", d_model=8)
    (tmp_path / "pt_tiny").mkdir()
    (tmp_path / "pt_tiny" / "importances.pt").write_bytes(b"")
    with raises("reads MIB's .json form only"):
        read_mib_submission(tmp_path / "pt_tiny", TWO_LAYERS)
    with raises("neither a MIB task/model folder nor a file"):
        read_mib_submission(tmp_path / "missing", TWO_LAYERS)
