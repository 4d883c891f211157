"""Edge attribution's EAP-IG on activations (`attr_edges(method="ig-activations")`) and its scores
per position (`attr_edges(per_position=True)`, `EdgePositionScores`), against naive references
written with plain hooks and torch.autograd: one forward pass per interpolation point and group of
senders, and the dot products position by position. (EAP and EAP-IG on the inputs are in
test_edges.py, circuit evaluation in test_circuits.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, assert_close_at_scale, input_hook, logit_diff_metric, make_inputs
from tests.methods.test_circuits import naive_ablated_outputs, naive_circuit_logits
from tests.methods.test_edges import naive_gradient, naive_score, naive_sender_outputs, receivers_checked
from tests.oracles.reference import full_cache
from transformer_lens_patching import (
    Circuit,
    EdgePositionScores,
    EdgeScores,
    GraphNode,
    LogitDiff,
    attr_edges,
    evaluate_circuit,
    faithfulness_curve,
    mean_ablation_cache,
)

BATCH = 3


# --- naive references ---


def group_hook(sender: GraphNode) -> str:
    """The hook of a sender's group: the embeddings, a layer's heads all together, or a layer's MLP."""
    if sender.kind == "embed":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{sender.layer}.attn.hook_z" if sender.kind == "head" else f"blocks.{sender.layer}.hook_mlp_out"


def written(model, sender: GraphNode, change):
    """What a change of the sender's group activation writes into the residual stream for that sender."""
    if sender.kind == "head":
        return change[:, :, sender.head] @ model.W_O[sender.layer, sender.head].detach()
    return change


def naive_gradients(model, orig, receivers, metric, per_prompt: bool, replaced=None) -> dict:
    """d metric / d (each receiver's own input), (batch, pos, d_model), from one forward pass of orig
    and one backward pass (one per prompt, each prompt's own, for a per-prompt metric), with the
    activation of `replaced`'s hook (a (name, tensor) pair) replaced by that tensor. Each input
    hook adds a zero that requires grad: the gradient with respect to it is the gradient with
    respect to the input, and the gradients of earlier receivers still flow through it."""
    zeros: dict = {}

    def add_zero(name):
        def hook(activation, hook):
            zeros[name] = torch.zeros_like(activation, requires_grad=True)
            return activation + zeros[name]

        return hook

    names = sorted({input_hook(model, receiver) for receiver in receivers})
    hooks = [(name, add_zero(name)) for name in names]
    if replaced is not None:
        hooks.insert(0, (replaced[0], lambda activation, hook: replaced[1].clone()))
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with torch.enable_grad():
            value = metric(model.run_with_hooks(orig, fwd_hooks=hooks))
            leaves = [zeros[name] for name in names]
            if per_prompt:
                rows = [torch.autograd.grad(value[b], leaves, retain_graph=True) for b in range(orig.shape[0])]
                grads = [torch.stack([row[i][b] for b, row in enumerate(rows)]) for i in range(len(names))]
            else:
                grads = list(torch.autograd.grad(value, leaves))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    by_name = dict(zip(names, grads))
    return {
        receiver: by_name[input_hook(model, receiver)][:, :, receiver.head]
        if receiver.kind == "head"
        else by_name[input_hook(model, receiver)]
        for receiver in receivers
    }


def naive_ig_activation_scores(model, graph, orig, metric, per_prompt: bool, receivers, ablated, steps: int) -> dict:
    """EAP-IG on activations, as it reads: for each group of senders g and k = 0 .. steps - 1, the
    orig run with g's activation replaced by orig_g + (k / steps) * delta_g, delta_g = ablated_g -
    orig_g; each receiver's gradient averaged over g's runs; an edge s -> r scores s's write of
    delta_g dotted with r's mean gradient, summed over positions (and prompts, for a scalar metric).
    `ablated(name)` is the ablated activation at a hook. (The k = 0 run is the orig run, whichever
    the group: it runs once.) On the 12-layer model, the groups of a spread of layers only."""
    before = full_cache(model, orig)
    orig_run = naive_gradients(model, orig, receivers, metric, per_prompt)
    layers = range(model.cfg.n_layers) if model.cfg.n_layers <= 4 else (0, 2, 4, 5, 9, model.cfg.n_layers - 1)
    senders = [sender for sender in graph.senders if sender.kind == "embed" or sender.layer in layers]
    scores = {}
    for name in dict.fromkeys(group_hook(sender) for sender in senders):
        edges = [edge for edge in graph if group_hook(edge.sender) == name and edge.receiver in receivers]
        delta = ablated(name) - before[name]
        targets = list(dict.fromkeys(edge.receiver for edge in edges))
        mean = {receiver: orig_run[receiver] / steps for receiver in targets}
        for k in range(1, steps):
            point = before[name] + (k / steps) * delta
            gradients = naive_gradients(model, orig, targets, metric, per_prompt, replaced=(name, point))
            for receiver in targets:
                mean[receiver] = mean[receiver] + gradients[receiver] / steps
        for edge in edges:
            scores[edge] = naive_score(written(model, edge.sender, delta), mean[edge.receiver], per_prompt)
    return scores


def check_against(scores, expected: dict, at_least: int) -> None:
    for edge, value in expected.items():
        assert_close_at_scale(scores.score(edge), value)
    assert len(expected) >= at_least


# --- EAP-IG on activations ---


def check_ig_on_activations(model, per_prompt: bool) -> None:
    steps = 3
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt)
    scores = attr_edges(model, orig, metric, new_input=new, method="ig-activations", steps=steps)
    assert isinstance(scores, EdgeScores) and scores.method == "ig-activations"
    assert scores.scores.shape == ((len(scores.graph), BATCH) if per_prompt else (len(scores.graph),))
    after = full_cache(model, new)
    receivers = receivers_checked(model, scores.graph)
    expected = naive_ig_activation_scores(
        model, scores.graph, orig, metric, per_prompt, receivers, lambda name: after[name], steps
    )
    check_against(scores, expected, at_least=100)
    with torch.no_grad():
        assert_close(scores.unpatched, metric(model(orig)))


def test_ig_on_activations_averages_each_groups_gradients_over_its_interpolated_activation(small_model):
    check_ig_on_activations(small_model, per_prompt=False)


def test_ig_on_activations_for_a_per_prompt_metric(gqa_model):
    check_ig_on_activations(gqa_model, per_prompt=True)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ig_on_activations_with_an_ablation_cache(gqa_model, ablation):
    model, steps = gqa_model, 3
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    if ablation == "zero":
        cache, ablated = "zero", lambda name: 0.0
    else:
        _, new_cache = model.run_with_cache(new)
        cache = mean_ablation_cache(new_cache)
        ablated = lambda name: cache[name]  # noqa: E731
    scores = attr_edges(model, orig, metric, new_cache=cache, method="ig-activations", steps=steps)
    graph = scores.graph
    expected = naive_ig_activation_scores(model, graph, orig, metric, False, list(graph.receivers), ablated, steps)
    check_against(scores, expected, at_least=len(graph))


def test_ig_on_activations_of_the_embeddings_is_ig_on_the_inputs(gqa_model):
    """The embeddings' group is the residual stream entering layer 0, which method="ig"
    interpolates too: their edges score the same under both."""
    model = gqa_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    on_activations = attr_edges(model, orig, metric, new_input=new, method="ig-activations", steps=4)
    on_inputs = attr_edges(model, orig, metric, new_input=new, method="ig", steps=4)
    embed = [on_activations.graph.index(edge) for edge in on_activations.graph if edge.sender.kind == "embed"]
    assert_close_at_scale(on_activations.scores[embed], on_inputs.scores[embed])
    others = [i for i in range(len(on_activations.graph)) if i not in embed]
    assert (on_activations.scores[others] - on_inputs.scores[others]).abs().max() > 1e-4, "other groups differ"


def test_ig_on_activations_in_one_step_is_atp(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    atp = attr_edges(model, orig, metric, new_input=new)
    one = attr_edges(model, orig, metric, new_input=new, method="ig-activations", steps=1)
    assert torch.equal(one.scores, atp.scores) and torch.equal(one.unpatched, atp.unpatched)


def test_ig_on_activations_of_an_identical_input_is_zero(gqa_model):
    orig, _ = make_inputs(gqa_model, batch=BATCH)
    metric = logit_diff_metric(per_prompt=True)
    same = attr_edges(gqa_model, orig, metric, new_input=orig, method="ig-activations", steps=3).scores
    assert torch.equal(same, torch.zeros_like(same))


# --- scores per position ---


def test_scores_per_position_are_each_positions_dot_product(gqa_model):
    """EAP per position on every edge of the grouped-query model (scalar metric), and for a
    per-prompt metric on the edges into the logits."""
    model = gqa_model
    orig, new = make_inputs(model, batch=BATCH)
    seq_len = orig.shape[1]
    metric = logit_diff_metric()
    scores = attr_edges(model, orig, metric, new_input=new, per_position=True)
    graph = scores.graph
    assert isinstance(scores, EdgePositionScores) and scores.method == "atp"
    assert scores.scores.shape == (len(graph), seq_len)
    outputs = naive_sender_outputs(model, orig, new)
    for receiver in graph.receivers:
        gradient = naive_gradient(model, orig, receiver, metric, False)
        for edge in (edge for edge in graph if edge.receiver == receiver):
            row = scores.score(edge)
            assert row.shape == (seq_len,)
            assert_close(row, (outputs[edge.sender] * gradient).sum((0, 2)))
    with torch.no_grad():
        assert_close(scores.unpatched, metric(model(orig)))

    metric = logit_diff_metric(per_prompt=True)
    per_prompt = attr_edges(model, orig, metric, new_input=new, per_position=True)
    assert per_prompt.scores.shape == (len(graph), seq_len, BATCH)
    gradient = naive_gradient(model, orig, GraphNode("logits"), metric, True)
    for edge in (edge for edge in graph if edge.receiver.kind == "logits"):
        expected = (outputs[edge.sender] * gradient).sum(2).T  # (seq_len, batch)
        assert_close(per_prompt.scores[graph.index(edge)], expected)


def check_sums(model, method: str, per_prompt: bool) -> None:
    orig, new = make_inputs(model, batch=BATCH)
    steps = 2 if method.startswith("ig") else None
    metric = logit_diff_metric(per_prompt)
    positions = attr_edges(model, orig, metric, new_input=new, method=method, steps=steps, per_position=True)
    whole = attr_edges(model, orig, metric, new_input=new, method=method, steps=steps)
    assert isinstance(positions, EdgePositionScores)
    assert positions.method == whole.method == method
    assert positions.scores.shape == (*whole.scores.shape[:1], orig.shape[1], *whole.scores.shape[1:])
    total = positions.total()
    assert isinstance(total, EdgeScores) and total.graph == whole.graph and total.method == method
    assert total.scores.shape == whole.scores.shape
    assert_close_at_scale(total.scores, whole.scores)
    assert_close(total.unpatched, whole.unpatched)
    assert_close(positions.unpatched, whole.unpatched)


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_scores_per_position_sum_to_the_scores(small_model, method):
    check_sums(small_model, method, per_prompt=False)
    if method == "atp":
        check_sums(small_model, method, per_prompt=True)


def test_scores_per_position_with_uncertainty_are_the_means_over_prompts(gqa_model):
    model = gqa_model
    orig, new = make_inputs(model, batch=BATCH)
    answers = torch.tensor([[5, 6]] * BATCH)
    uncertain = attr_edges(model, orig, LogitDiff(answers), new_input=new, per_position=True, uncertainty=True)
    assert uncertain.scores.shape == (len(uncertain.graph), orig.shape[1])
    per_prompt = attr_edges(model, orig, LogitDiff(answers, per_prompt=True), new_input=new, per_position=True)
    assert_close(uncertain.scores, per_prompt.scores.mean(-1))
    mean = attr_edges(model, orig, LogitDiff(answers), new_input=new, per_position=True)
    assert_close(uncertain.scores, mean.scores)
    whole = attr_edges(model, orig, LogitDiff(answers), new_input=new, uncertainty=True)
    assert_close(uncertain.total().scores, whole.scores)


@pytest.mark.parametrize("method", ["relp", "ig-activations"])
def test_scores_per_position_sum_to_the_scores_for_the_other_methods(gqa_model, method):
    check_sums(gqa_model, method, per_prompt=False)


def test_the_strongest_pairs_and_a_circuit_of_them(gqa_model):
    """`top(n)` ranks (edge, position) pairs by |score|; `Circuit.from_scores` keeps each chosen
    edge at the positions where it was chosen, and evaluating that circuit is the naive one-pass
    evaluation that ablates every other (edge, position)."""
    model, n = gqa_model, 60
    orig, new = make_inputs(model, batch=BATCH)
    seq_len = orig.shape[1]
    metric = logit_diff_metric()
    scores = attr_edges(model, orig, metric, new_input=new, per_position=True)
    graph = scores.graph
    order = scores.scores.abs().flatten().argsort(descending=True, stable=True)[:n].tolist()
    chosen = [(graph.edges[i // seq_len], i % seq_len) for i in order]
    top = scores.top(n)
    assert len(top) == n
    assert [(edge, position % seq_len) for edge, position in top] == chosen
    strengths = [abs(float(scores.score(edge)[position])) for edge, position in top]
    assert strengths == sorted(strengths, reverse=True)

    circuit = Circuit.from_scores(scores, n, prune=False)
    kept = {}
    for edge, position in chosen:
        kept.setdefault(edge, set()).add(position)
    assert set(circuit.edges) == set(kept)
    for edge in circuit.edges:
        where = circuit.positions.get(edge)
        assert (set(range(seq_len)) if where is None else {p % seq_len for p in where}) == kept[edge], edge
    assert any(len(where) < seq_len for where in kept.values()), "some edge is kept at some positions only"

    value = evaluate_circuit(model, circuit, orig, metric, new_input=new)
    ablated = naive_ablated_outputs(model, full_cache(model, new))
    assert_close(value, metric(naive_circuit_logits(model, circuit, orig, ablated)))
    everywhere = evaluate_circuit(model, Circuit(graph, circuit.edges), orig, metric, new_input=new)
    assert abs(float(value) - float(everywhere)) > 1e-4, "the positions matter"


def test_a_faithfulness_curve_of_position_aware_circuits(gqa_model):
    """`faithfulness_curve` of scores per position counts (edge, position) pairs: each point is the
    position-aware circuit `Circuit.from_scores` makes at that size, evaluated exactly."""
    model = gqa_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    scores = attr_edges(model, orig, metric, new_input=new, per_position=True)
    sizes, pairs = [5, 40, 200], len(scores.graph) * orig.shape[1]
    curve = faithfulness_curve(model, scores, orig, metric, new_input=new, sizes=sizes, prune=False)
    assert curve.fractions == tuple(size / pairs for size in sizes)
    assert list(curve.to_frame()["requested_edges"]) == sizes
    for size, circuit, value in zip(sizes, curve.circuits, curve.values):
        assert circuit == Circuit.from_scores(scores, size, prune=False)
        assert_close(torch.tensor(value), evaluate_circuit(model, circuit, orig, metric, new_input=new).float())
