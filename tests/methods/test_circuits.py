"""Circuits on a model: exact evaluation with every other edge ablated, faithfulness curves, exact
edge scores, the known circuit of the hand-set induction model, and their errors. (The Circuit
type itself is in tests/core/test_circuit.py.)"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.helpers import (
    TL_MAJOR,
    assert_close,
    input_hook,
    linear_metric,
    logit_diff_metric,
    make_inputs,
    n_kv,
    raises,
    receiver_node,
    sender_node,
)
from tests.oracles import induction_model, models
from tests.oracles.reference import full_cache
from transformer_lens_patching import (
    MIB_FRACTIONS,
    Circuit,
    Edge,
    EdgeGraph,
    GraphNode,
    IterNode,
    Node,
    act_patch,
    attr_edges,
    attr_path_patch,
    confirm_edges,
    evaluate_circuit,
    exact_edge_scores,
    faithfulness_curve,
    mean_ablation_cache,
    mib_faithfulness,
    path_patch,
    plan_circuit_evaluation,
)

BATCH = 3


def naive_ablated_outputs(model, cache) -> dict:
    """Each sender's output in a run's cache (a dict of activations, or None for zeros)."""
    outputs = {}
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            z = None if cache is None else cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            outputs[GraphNode("head", layer, head=head)] = 0.0 if z is None else z @ model.W_O[layer, head].detach()
        if not model.cfg.attn_only:
            outputs[GraphNode("mlp", layer)] = 0.0 if cache is None else cache[f"blocks.{layer}.hook_mlp_out"]
    outputs[GraphNode("embed")] = 0.0 if cache is None else cache["blocks.0.hook_resid_pre"]
    return outputs


def naive_circuit_logits(model, circuit: Circuit, orig, ablated: dict):
    """One forward pass; at each receiver's input hook, edge by edge and position by position,
    subtract the removed edge's sender output in this pass minus its ablated output."""
    graph, seq_len = circuit.graph, orig.shape[1]
    live = {}

    def record_embed(activation, hook):
        live[GraphNode("embed")] = activation.clone()

    def record_heads(layer):
        def hook(activation, hook):
            for head in range(model.cfg.n_heads):
                live[GraphNode("head", layer, head=head)] = activation[:, :, head] @ model.W_O[layer, head].detach()

        return hook

    def record_mlp(layer):
        def hook(activation, hook):
            live[GraphNode("mlp", layer)] = activation.clone()

        return hook

    def kept_at(edge, position):
        if edge not in circuit:
            return False
        where = circuit.positions.get(edge)
        return where is None or position in [p % seq_len for p in where]

    def subtract(receivers):
        def hook(activation, hook):
            out = activation.clone()
            for unit, receiver in receivers:
                for edge in (e for e in graph if e.receiver == receiver):
                    for position in range(seq_len):
                        if not kept_at(edge, position):
                            gone = ablated[edge.sender]
                            change = live[edge.sender][:, position] - (
                                gone if isinstance(gone, float) else gone[:, position]
                            )
                            if unit is None:
                                out[:, position] -= change
                            else:
                                out[:, position, unit] -= change
            return out

        return hook

    hooks = [("blocks.0.hook_resid_pre", record_embed)]
    by_hook: dict[str, list] = {}
    for receiver in graph.receivers:
        by_hook.setdefault(input_hook(model, receiver), []).append((receiver.head, receiver))
    for layer in range(model.cfg.n_layers):
        for part in ("q", "k", "v"):
            name = f"blocks.{layer}.hook_{part}_input"
            hooks.append((name, subtract(by_hook[name])))
        hooks.append((f"blocks.{layer}.attn.hook_z", record_heads(layer)))
        if not model.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_in", subtract(by_hook[f"blocks.{layer}.hook_mlp_in"])))
            hooks.append((f"blocks.{layer}.hook_mlp_out", record_mlp(layer)))
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    hooks.append((last, subtract(by_hook[last])))
    model.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            return model.run_with_hooks(orig, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(False)


def random_circuit(graph: EdgeGraph, fraction: float, seed: int, positions: bool = False) -> Circuit:
    rng = random.Random(seed)
    edges = [edge for edge in graph if rng.random() < fraction]
    where = {edge: [rng.randrange(-3, 7)] for edge in edges[::5]} if positions else None
    return Circuit(graph, edges, where)


# --- exact evaluation ---


def test_the_full_circuit_is_the_orig_run_exactly(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    value = evaluate_circuit(model, Circuit.full(EdgeGraph.of(model)), orig, metric, new_input=new)
    assert torch.equal(value, metric(model(orig)).detach())


def test_the_empty_circuit_is_the_new_run(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    value = evaluate_circuit(model, Circuit.empty(EdgeGraph.of(model)), orig, metric, new_input=new)
    assert_close(value, metric(model(new)).detach())
    assert (metric(model(new)) - metric(model(orig))).abs().min() > 0.01, "the two runs differ"


def edges_of_every_kind(model, graph: EdgeGraph) -> list[Edge]:
    last, kv = model.cfg.n_layers - 1, n_kv(model) != model.cfg.n_heads
    edges = [
        Edge(GraphNode("embed"), GraphNode("head", 1, head=2, input="q")),
        Edge(GraphNode("head", 0, head=1), GraphNode("head", 2, head=n_kv(model) - 1, input="k", kv_head=kv)),
        Edge(GraphNode("head", 1, head=3), GraphNode("head", 3, head=0, input="v", kv_head=kv)),
        Edge(GraphNode("mlp", 1), GraphNode("logits")),
        Edge(GraphNode("embed"), GraphNode("logits")),
        Edge(GraphNode("head", last, head=2), GraphNode("logits")),
        Edge(GraphNode("mlp", 0), GraphNode("head", last, head=1, input="q")),
    ]
    if not kv:  # the gated MLP's `pre` is only its gate, so path_patch has no receiver for its whole input
        edges += [
            Edge(GraphNode("head", 2, head=3), GraphNode("mlp", 2)),
            Edge(GraphNode("embed"), GraphNode("mlp", 0)),
        ]
    return edges


def test_removing_one_edge_is_path_patching_it(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    edges = edges_of_every_kind(model, graph)
    circuits = [Circuit(graph, set(graph.edges) - {edge}) for edge in edges]
    values = evaluate_circuit(model, circuits, orig, metric, new_input=new)
    assert values.dims == ("circuit", "batch")
    for edge, value in zip(edges, values.as_tensor()):
        expected = path_patch(
            model,
            orig,
            new,
            sender_node(graph, edge.sender),
            receiver_node(graph, edge.receiver),
            metric,
            direct_includes_mlps=False,
        )
        assert_close(value, expected)
    exact = exact_edge_scores(model, orig, metric, new_input=new, edges=edges)
    assert exact.method == "exact" and exact.per_prompt
    for edge, value in zip(edges, values.as_tensor()):
        assert_close(exact.score(edge), value - metric(model(orig)).detach())
    others = [graph.index(edge) for edge in graph if edge not in edges]
    assert torch.isnan(exact.scores[others]).all()


def test_exact_scores_in_chunks_are_those_of_one_call(small_model, monkeypatch):
    """Scoring the edges a few at a time (one evaluate_circuit call per chunk, the unpatched run in the
    first) gives every edge the score one call gives it."""
    from transformer_lens_patching._methods import circuit_discovery

    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    edges = edges_of_every_kind(model, graph)
    whole = exact_edge_scores(model, orig, metric, new_input=new, edges=edges)
    monkeypatch.setattr(circuit_discovery, "EDGES_PER_CALL", 3)
    chunked = exact_edge_scores(model, orig, metric, new_input=new, edges=edges)
    assert len(edges) > 2 * 3, "several chunks, the last one partial"
    torch.testing.assert_close(chunked.scores, whole.scores, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(chunked.unpatched), torch.as_tensor(whole.unpatched))


def test_removing_every_edge_into_a_receiver_is_patching_its_input(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    graph, last = EdgeGraph.of(model), model.cfg.n_layers - 1
    cases = [
        (GraphNode("head", 2, head=1, input="q"), Node("q_input", 2, head=1)),
        (GraphNode("head", 3, head=0, input="v", kv_head=n_kv(model) != model.cfg.n_heads), Node("v_input", 3, head=0)),
        (GraphNode("mlp", 1), Node("mlp_in", 1)),
        (GraphNode("logits"), Node("resid_post", last)),
    ]
    for receiver, node in cases:
        circuit = Circuit(graph, [edge for edge in graph if edge.receiver != receiver])
        assert_close(
            evaluate_circuit(model, circuit, orig, metric, new_input=new),
            act_patch(model, orig, node, metric, new_input=new),
        )


@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_equal_to_the_naive_reference(small_model, ablation):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    circuits = [
        random_circuit(graph, fraction, seed, positions=seed % 2 == 1) for seed, fraction in enumerate((0.02, 0.3, 0.9))
    ]
    if ablation == "resample":
        source, ablated = {"new_input": new}, naive_ablated_outputs(model, full_cache(model, new))
    elif ablation == "mean":
        _, new_cache = model.run_with_cache(new)
        cache = mean_ablation_cache(new_cache)
        source, ablated = (
            {"new_cache": cache},
            naive_ablated_outputs(model, {name: cache[name] for name in cache.keys()}),
        )
    else:
        source, ablated = {"new_cache": "zero"}, naive_ablated_outputs(model, None)
    values = evaluate_circuit(model, circuits, orig, metric, **source).as_tensor()
    for circuit, value in zip(circuits, values):
        assert_close(value, metric(naive_circuit_logits(model, circuit, orig, ablated)))


def test_stacked_circuits_equal_one_at_a_time(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    graph = EdgeGraph.of(model)
    circuits = [random_circuit(graph, fraction, seed) for seed, fraction in enumerate((0.0, 0.05, 0.5, 0.95, 1.0))]
    stacked = evaluate_circuit(model, circuits, orig, linear_metric, new_input=new)
    plan = plan_circuit_evaluation(model, circuits, orig, linear_metric, new_input=new)
    assert plan.variants_per_pass == len(circuits) and len(plan.passes) == 1
    single = evaluate_circuit(model, circuits, orig, linear_metric, new_input=new, batch_size=1)
    assert_close(stacked.as_tensor(), single.as_tensor())
    for circuit, value in zip(circuits, stacked.as_tensor()):
        assert_close(value, evaluate_circuit(model, circuit, orig, linear_metric, new_input=new))
    small = plan_circuit_evaluation(model, circuits, orig, linear_metric, new_input=new, max_memory=1)
    assert len(small.passes) == len(circuits)
    sharded = [small.shard(i, 2).run() for i in range(2)]
    assert_close(small.assemble(sharded).as_tensor(), stacked.as_tensor())
    assert torch.equal(plan.compute().as_tensor(), stacked.as_tensor())  # compute() is evaluate_circuit


def test_a_circuit_kept_at_some_positions_only(small_model):
    """Keeping every edge but at the last position only ablates what the earlier positions
    write into the receivers: at position -1 every receiver still reads the orig stream."""
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    graph = EdgeGraph.of(model)
    last_only = Circuit(graph, graph.edges, {edge: [-1] for edge in graph})
    everywhere_but_last = Circuit(graph, graph.edges, {edge: range(orig.shape[1] - 1) for edge in graph})
    values = evaluate_circuit(model, [last_only, everywhere_but_last], orig, metric, new_input=new).as_tensor()
    ablated = naive_ablated_outputs(model, full_cache(model, new))
    assert_close(values[0], metric(naive_circuit_logits(model, last_only, orig, ablated)))
    assert_close(values[1], metric(naive_circuit_logits(model, everywhere_but_last, orig, ablated)))
    assert abs(float(values[0]) - float(values[1])) > 1e-3


def test_the_model_is_left_as_it_was(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    flags = [p.requires_grad for p in model.parameters()]
    graph = EdgeGraph.of(model)
    model.evaluate_circuit(random_circuit(graph, 0.3, 0), orig, logit_diff_metric(), new_input=new)
    assert [p.requires_grad for p in model.parameters()] == flags and torch.is_grad_enabled()
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_evaluation_errors(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    with raises("needs a Circuit or a non-empty list"):
        evaluate_circuit(model, [], orig, metric, new_input=new)
    with raises("but this model's edge graph is"):
        evaluate_circuit(model, Circuit.full(EdgeGraph(2, 2, 2, has_mlps=True)), orig, metric, new_input=new)
    with raises("Nothing to patch in"):
        evaluate_circuit(model, Circuit.full(EdgeGraph.of(model)), orig, metric)
    with raises("same metric"):
        faithfulness_curve(model, attr_edges(model, orig, metric, new_input=orig), orig, metric, new_input=orig)
    scores = attr_edges(model, orig, metric, new_input=new)
    for sizes in ([0.5, 0.1], [0.002, 0.001, 1.0], [0.5], None, "0.5"):
        with raises("at least two circuit sizes in increasing order"):
            faithfulness_curve(model, scores, orig, metric, new_input=new, sizes=sizes)
    with torch.inference_mode(), raises("called under torch.inference_mode"):
        attr_edges(model, orig, metric, new_input=new)
    with raises("candidates must be an int"):
        confirm_edges(model, attr_edges(model, orig, metric, new_input=new), orig, metric, new_input=new, candidates=0)


# --- faithfulness ---


def test_faithfulness_curve_is_the_definition(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    scores = attr_edges(model, orig, metric, new_input=new)
    curve = faithfulness_curve(model, scores, orig, metric, new_input=new)
    graph = scores.graph
    assert curve.fractions == MIB_FRACTIONS and curve.method == "atp"
    full = float(metric(model(orig).detach()).mean())
    empty = float(metric(model(new).detach()).mean())
    assert curve.full == pytest.approx(full, abs=1e-5) and curve.empty == pytest.approx(empty, abs=1e-4)
    expected, areas, gaps = [], 0.0, 0.0
    for fraction, circuit in zip(MIB_FRACTIONS, curve.circuits):
        assert circuit == Circuit.from_scores(scores, fraction)
        assert len(circuit) <= int(fraction * len(graph))
        value = float(evaluate_circuit(model, circuit, orig, metric, new_input=new).mean())
        expected.append((value - empty) / (full - empty))
    for i in range(len(expected) - 1):
        width = MIB_FRACTIONS[i + 1] - MIB_FRACTIONS[i]
        areas += width * (expected[i] + expected[i + 1]) / 2
        gaps += width * (abs(1 - expected[i]) + abs(1 - expected[i + 1])) / 2
    assert curve.faithfulness == pytest.approx(expected, abs=1e-4)
    assert curve.area_under == pytest.approx(areas, abs=1e-4) and curve.area_from_1 == pytest.approx(gaps, abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    frame = curve.to_frame()
    columns = ["method", "ranking", "fraction", "requested_edges", "edges", "metric", "faithfulness"]
    assert list(frame.columns) == columns
    assert list(frame["edges"]) == list(curve.edge_counts) and "ranked by |score|: area under" in repr(curve)
    counts = faithfulness_curve(model, scores, orig, metric, new_input=new, sizes=[10, 100, len(graph)], prune=False)
    assert counts.edge_counts == (10, 100, len(graph)) and counts.fractions[0] == 10 / len(graph)


def test_mib_faithfulness_is_computed_as_mib_computes_it(gpt2_model):
    """As MIB's circuit track reads (evaluate_area_under_curve, then print_results): for each
    fraction p, the top int(p * edges) edges by MIB's score, pruned, evaluated; faithfulness
    (circuit - empty) / (clean - empty); trapezoids over the fractions. CPR is the area under the
    curve of signed ranking (MIB's score, highest first: the negative of ours, since ours is the
    change when the edge is removed), CMD the area between 1 and the curve of the |score| ranking."""
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    scores = attr_edges(model, orig, metric, new_input=new)
    graph, edges = scores.graph, list(scores.graph)
    clean = float(metric(model(orig).detach()).mean())
    empty = float(evaluate_circuit(model, Circuit.empty(graph), orig, metric, new_input=new).mean())
    mib_scores = -scores.scores.float().mean(1)  # per prompt: the mean over prompts, as MIB's mean=True
    areas = {}
    for absolute in (False, True):
        order = torch.argsort(mib_scores.abs() if absolute else mib_scores, descending=True, stable=True).tolist()
        faithfulness = []
        for fraction in MIB_FRACTIONS:
            circuit = Circuit(graph, [edges[i] for i in order[: int(fraction * len(edges))]]).pruned()
            value = float(evaluate_circuit(model, circuit, orig, metric, new_input=new).mean())
            faithfulness.append((value - empty) / (clean - empty))
        under = from_1 = 0.0
        for i in range(len(MIB_FRACTIONS) - 1):
            width = MIB_FRACTIONS[i + 1] - MIB_FRACTIONS[i]
            under += width * (faithfulness[i] + faithfulness[i + 1]) / 2
            from_1 += width * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
        areas[absolute] = (under, from_1, faithfulness)
    mib = mib_faithfulness(model, scores, orig, metric, new_input=new)
    assert mib.signed.faithfulness == pytest.approx(areas[False][2], abs=1e-4)
    assert mib.absolute.faithfulness == pytest.approx(areas[True][2], abs=1e-4)
    assert mib.cpr == pytest.approx(areas[False][0], abs=1e-4) and mib.cmd == pytest.approx(areas[True][1], abs=1e-4)
    assert (mib.signed.absolute, mib.absolute.absolute) == (False, True)
    assert mib.signed.circuits != mib.absolute.circuits, "the two rankings must differ here, or this test cannot fail"
    assert mib.cpr != pytest.approx(mib.absolute.area_under, abs=1e-3), "CPR must come from the signed ranking"
    assert list(mib.to_frame()["ranking"].unique()) == ["signed score", "|score|"] and "CPR" in repr(mib)
    for removed in ("cpr", "cmd"):
        with raises(f"FaithfulnessCurve.{removed} is gone.*mib_faithfulness"):
            getattr(mib.absolute, removed)


def test_confirmed_scores_are_exact_for_the_candidates(gqa_model):
    model = gqa_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    estimate = attr_edges(model, orig, metric, new_input=new)
    confirmed = confirm_edges(model, estimate, orig, metric, new_input=new, candidates=20)
    assert confirmed.method == "atp+exact"
    chosen = estimate.top(20)
    exact = exact_edge_scores(model, orig, metric, new_input=new, edges=chosen)
    for edge in estimate.graph:
        expected = exact.score(edge) if edge in chosen else estimate.score(edge)
        assert_close(confirmed.score(edge), expected)
    for edge in [edge for edge in chosen if edge.receiver.kind != "mlp"][:3]:  # a gated MLP has no whole-input node
        pair = path_patch(
            model,
            orig,
            new,
            sender_node(estimate.graph, edge.sender),
            receiver_node(estimate.graph, edge.receiver),
            metric,
            direct_includes_mlps=False,
        )
        assert_close(confirmed.score(edge), pair - metric(model(orig)).detach())


# --- a known circuit ---


@pytest.fixture(scope="module")
def induction():
    model = induction_model.build_induction_model()
    clean = induction_model.repeated_tokens(4, 5)
    return model, clean, induction_model.reverse_first_half(clean)


TRUE_EDGES = [
    Edge(GraphNode("embed"), GraphNode("head", 0, head=0, input="v")),  # the token the previous-token head copies
    Edge(GraphNode("head", 0, head=0), GraphNode("head", 1, head=0, input="k")),  # its key: the previous token
    Edge(GraphNode("embed"), GraphNode("head", 1, head=0, input="v")),  # its value: the token to predict
    Edge(GraphNode("head", 1, head=0), GraphNode("logits")),
]


@pytest.mark.skipif(
    TL_MAJOR >= 4, reason="TransformerLens 4 builds the induction model with boot_native: no per-head inputs"
)
def test_the_induction_circuit_is_recovered_exactly(induction):
    """Every edge outside the true circuit scores 0: decoy heads write where nothing reads,
    the previous-token head's position-only query and key do not change, nor does the
    induction head's query (the second repeat is the same in both runs). The top edges are
    the true ones, and the true circuit is as faithful as the model."""
    model, clean, corrupted = induction
    exact = exact_edge_scores(model, clean, induction_logit_metric(clean), new_input=corrupted)
    graph = exact.graph
    true = Circuit(graph, TRUE_EDGES)
    assert Circuit.from_scores(exact, len(TRUE_EDGES)) == true
    others = torch.tensor([graph.index(edge) for edge in graph if edge not in true])
    assert exact.scores[others].abs().max() < 1e-4
    assert (exact.scores[[graph.index(edge) for edge in TRUE_EDGES]].abs() > 1.0).all()
    curve = faithfulness_curve(
        model, exact, clean, induction_logit_metric(clean), new_input=corrupted, sizes=[1, len(TRUE_EDGES), len(graph)]
    )
    assert curve.faithfulness[1:] == pytest.approx((1.0, 1.0), abs=1e-5) and curve.faithfulness[0] < 0.5
    assert curve.circuits[1] == true


def induction_logit_metric(clean):
    """The clean answer's logit at each position of the second repeat, summed: what induction gives."""
    half = (clean.shape[1] - 1) // 2
    answers = clean[:, 2 : half + 1]

    def metric(logits):
        return logits[:, half + 1 : -1].gather(-1, answers.unsqueeze(-1)).sum()

    return metric


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 2 models have per-head inputs")
def test_a_boot_native_bridge_is_refused(induction):
    model, clean, corrupted = induction
    with raises("Circuit evaluation edits every head's q/k/v input.*boot_transformers"):
        evaluate_circuit(model, Circuit.full(EdgeGraph.of(model)), clean, linear_metric, new_input=corrupted)


# --- exact in float32 ---


def without_biases(model):
    """`model` with every bias set to zero (a copy)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.split(".")[-1] in ("bias", "b") or name.split(".")[-1].startswith("b_"):
                parameter.zero_()
    return model


@pytest.mark.parametrize("biased", [True, False], ids=["biased", "bias-free"])
def test_evaluation_in_float32_matches_float64(biased):
    """Zero, mean and resample ablation of a random circuit, of every edge but those into the
    logits, and of no edge: float32 agrees with float64 to 1e-4 (the fully ablated inputs are
    built from the ablated side, not by cancelling the live stream), on one thread as on two;
    on the bias-free model, the circuit of every edge but those into the logits reads exactly
    zero there, so its logits and the metric are exactly 0."""
    base = models.gpt2_like(n_layers=4)
    model32 = base if biased else without_biases(base)
    model64 = copy.deepcopy(model32).to(torch.float64)
    orig, new = make_inputs(model32, batch=BATCH)
    graph = EdgeGraph.of(model32)
    not_into_logits = Circuit(graph, [edge for edge in graph if edge.receiver.kind != "logits"])
    circuits = [random_circuit(graph, 0.1, seed=7), not_into_logits, Circuit.empty(graph)]
    metric = logit_diff_metric(per_prompt=True)

    def evaluated(model, ablation: str) -> torch.Tensor:
        if ablation == "zero":
            source = {"new_cache": "zero"}
        elif ablation == "mean":
            source = {"new_cache": mean_ablation_cache(model.run_with_cache(new)[1])}
        else:
            source = {"new_input": new}
        return evaluate_circuit(model, circuits, orig, metric, **source).as_tensor()

    threads = torch.get_num_threads()
    for ablation in ("zero", "mean", "resample"):
        wide = evaluated(model64, ablation)
        torch.set_num_threads(1)
        try:
            one_thread = evaluated(model32, ablation)
        finally:
            torch.set_num_threads(max(threads, 2))
        try:
            two_threads = evaluated(model32, ablation)
        finally:
            torch.set_num_threads(threads)
        for value in (one_thread, two_threads):
            torch.testing.assert_close(value.double(), wide, rtol=0, atol=1e-4)
        if not biased and ablation == "zero":
            assert torch.equal(one_thread[1], torch.zeros_like(one_thread[1])), one_thread[1]


# --- blocks that compute attention and MLP in parallel ---


def parallel_model():
    """A tiny random model whose blocks compute attention and MLP in parallel, each with its own
    norm: GPT-NeoX (TransformerLens 2: a HookedTransformer with parallel_attn_mlp). Blocks whose
    attention and MLP share one norm are tested in test_shared_norm.py."""
    torch.manual_seed(0)
    if TL_MAJOR >= 4:
        import warnings

        import transformers
        from transformer_lens.model_bridge import TransformerBridge

        config = transformers.GPTNeoXConfig(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=64,
            intermediate_size=128,
            vocab_size=models.VOCAB,
            max_position_embeddings=64,
            initializer_range=0.1,
        )
        config.architectures = ["GPTNeoXForCausalLM"]
        hf_model = transformers.GPTNeoXForCausalLM(config).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                "gpt_neox", hf_model=hf_model, tokenizer=models.tokenizer(), device="cpu"
            )
            bridge.enable_compatibility_mode()
        return bridge
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_mlp=128,
        d_vocab=models.VOCAB,
        n_ctx=64,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=8,
        parallel_attn_mlp=True,
        initializer_range=0.1,
        seed=0,
    )
    return HookedTransformer(config, tokenizer=models.tokenizer())


@pytest.fixture(scope="module")
def parallel():
    return parallel_model()


def test_parallel_blocks_have_no_edge_from_heads_to_their_own_mlp(parallel):
    graph = EdgeGraph.of(parallel)
    serial = EdgeGraph(graph.n_layers, graph.n_heads, graph.n_kv_heads, graph.has_mlps)
    assert graph.parallel_attn_mlp and graph != serial
    own_mlp = [
        edge
        for edge in serial
        if edge.sender.kind == "head" and edge.receiver.kind == "mlp" and edge.sender.layer == edge.receiver.layer
    ]
    assert len(own_mlp) == graph.n_layers * graph.n_heads
    assert set(graph.edges) == set(serial.edges) - set(own_mlp)
    with raises("computes attention and MLP in parallel, so an MLP reads its layer's input"):
        graph.index(own_mlp[0])
    assert Circuit.from_json(Circuit.full(graph).to_json()) == Circuit.full(graph)


def test_parallel_circuits_are_exact(parallel):
    """The full circuit is the orig run; random circuits equal the naive reference (which
    subtracts each removed edge of the graph at its receiver's input hook); removing one
    head -> logits edge is path patching it with direct_includes_mlps=False."""
    model = parallel
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    graph = EdgeGraph.of(model)
    with torch.no_grad():
        assert_close(evaluate_circuit(model, Circuit.full(graph), orig, metric, new_input=new), metric(model(orig)))
    circuits = [random_circuit(graph, fraction, seed) for seed, fraction in enumerate((0.1, 0.5, 0.9))]
    values = evaluate_circuit(model, circuits, orig, metric, new_input=new).as_tensor()
    ablated = naive_ablated_outputs(model, full_cache(model, new))
    for circuit, value in zip(circuits, values):
        assert_close(value, metric(naive_circuit_logits(model, circuit, orig, ablated)))
    last = model.cfg.n_layers - 1
    edge = Edge(GraphNode("head", 1, head=2), GraphNode("logits"))
    removed = evaluate_circuit(model, Circuit(graph, [e for e in graph if e != edge]), orig, metric, new_input=new)
    path = path_patch(
        model, orig, new, Node("z", 1, head=2), Node("resid_post", last), metric, direct_includes_mlps=False
    )
    assert_close(removed, path)
    scores = attr_edges(model, orig, metric, new_input=new)
    assert scores.graph == graph and scores.scores.shape[0] == len(graph)


def test_parallel_blocks_refuse_what_they_do_not_have(parallel):
    model = parallel
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    with raises("computes attention and MLP in parallel, both from the block's input, so there is no residual"):
        act_patch(model, orig, Node("resid_mid", 0), metric, new_input=new)
    with raises("path_patch with direct_includes_mlps=False adds each sender's write"):
        path_patch(
            model, orig, new, IterNode("z", layers=[1]), Node("pre", 1, neuron=3), metric, direct_includes_mlps=False
        )
    with raises("attr_path_patch adds each sender's write"):
        attr_path_patch(model, orig, new, IterNode("z", layers=[1]), Node("pre", 1, neuron=3), metric)
