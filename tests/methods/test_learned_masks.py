"""learn_edge_masks: its soft removal against evaluate_circuit and EAP, recovery of a circuit known by
construction, and its invariants and errors."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, make_inputs, model_state, raises
from tests.oracles import induction_model
from tests.oracles.test_known_circuit import answer_logit
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    LogitDiff,
    _tl,
    attr_edges,
    evaluate_circuit,
    exact_edge_scores,
    learn_edge_masks,
)
from transformer_lens_patching._core.wiring import Wiring
from transformer_lens_patching._methods.common import patched_in_source, prepare_runs
from transformer_lens_patching._methods.learned_masks import MaskedCircuits, kept_probability, sampled_mask, warm_start

BATCH = 3


def per_prompt_metric():
    return LogitDiff(torch.tensor([[5, 6]] * BATCH), per_prompt=True)


def masked(model, orig, new, metric):
    """The soft removal of learn_edge_masks on `model`, with its flags switched on for the caller."""
    graph = EdgeGraph.of(model)
    runs = prepare_runs(model, orig, metric, uncertainty=True)
    wiring = Wiring.of(model, graph, "a test")
    source, _ = patched_in_source(runs, new, None, wiring.sender_hooks)
    return graph, wiring, MaskedCircuits(runs, wiring, source(), None)


def test_binary_masks_are_evaluate_circuit(small_model):
    """Masks of 0 and 1 remove exactly the edges evaluate_circuit removes: its per-prompt values, for
    random circuits, the full one and the empty one."""
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = per_prompt_metric()
    graph, wiring, circuits = masked(model, orig, new, metric)
    generator = torch.Generator().manual_seed(0)
    kept = [torch.rand(len(graph), generator=generator) < share for share in (0.2, 0.5, 0.9)]
    kept += [torch.ones(len(graph), dtype=torch.bool), torch.zeros(len(graph), dtype=torch.bool)]
    with _tl.model_flags(model, _tl.flags_for(wiring.receiver_hooks)):
        soft = [circuits.values(mask.float()) for mask in kept]
    for mask, values in zip(kept, soft):
        exact = evaluate_circuit(model, Circuit.from_mask(graph, mask), orig, metric, new_input=new)
        assert_close(values, exact)


def test_the_gradient_of_the_full_circuit_is_minus_eap(small_model):
    """At every mask 1, d metric / d mask of an edge is its sender's change (orig - new) dotted with
    the gradient at its receiver's input: EAP's score with the sign turned."""
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = per_prompt_metric()
    graph, wiring, circuits = masked(model, orig, new, metric)
    mask = torch.ones(len(graph), requires_grad=True)
    with _tl.model_flags(model, _tl.flags_for(wiring.receiver_hooks)), torch.enable_grad():
        circuits.values(mask).sum().backward(inputs=[mask])
    eap = attr_edges(model, orig, metric, new_input=new)
    assert_close(mask.grad, -eap.scores.sum(-1))


def test_no_step_keeps_the_warm_start_s_ranking(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    eap = attr_edges(model, orig, per_prompt_metric(), new_input=new)
    learned = learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=new, steps=0)
    assert learned.method == "learned masks"
    assert Circuit.from_scores(learned, 50) == Circuit.from_scores(eap, 50)
    start = warm_start(eap)
    assert_close(-learned.scores, start - start.min() + 1)
    with torch.no_grad():
        full = float(per_prompt_metric()(model(orig)).mean())
    assert float(learned.unpatched) == pytest.approx(full, abs=1e-5)
    assert Circuit.from_scores(learned, 50, absolute=False) == Circuit.from_scores(eap, 50)


def test_the_model_is_left_as_it_was(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    before = model_state(model)
    eap = attr_edges(model, orig, per_prompt_metric(), new_input=new)
    learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=new, steps=2)
    assert model_state(model) == before
    assert all(parameter.grad is None for parameter in model.parameters())


NO_HEAD_INPUTS = pytest.mark.skipif(
    TL_MAJOR >= 4, reason="TransformerLens 4 builds the induction model with boot_native: no per-head inputs"
)


@pytest.fixture(scope="module")
def induction():
    model = induction_model.build_induction_model()
    orig = induction_model.repeated_tokens(6, 4, seed=0)
    return model, orig, induction_model.reverse_first_half(orig)


@pytest.fixture(scope="module")
def induction_circuit(induction):
    """The hand-set induction model's circuit: the edges whose exact score is nonzero (exact edge
    patching recovers it: ranked first, and alone faithful)."""
    model, orig, new = induction
    metric = answer_logit(orig, per_prompt=True)
    metric.dims = ("batch",)
    graph = EdgeGraph.of(model)
    exact = exact_edge_scores(model, orig, metric, new_input=new)
    true = Circuit(graph, [edge for edge in graph if abs(float(exact.score(edge).mean())) > 1e-4])
    assert 3 <= len(true) < len(graph) / 4
    assert Circuit.from_scores(exact, len(true)) == true
    faithful = evaluate_circuit(model, true, orig, metric, new_input=new).mean()
    with torch.no_grad():
        full = float(metric(model(orig)).mean())
    assert float(faithful) == pytest.approx(full, abs=1e-4)
    return metric, exact, true


@NO_HEAD_INPUTS
@pytest.mark.parametrize("start", ["exact", "ig"])
def test_learned_masks_keep_the_induction_circuit(induction, induction_circuit, start):
    """Warm-started from exact patching or EAP-IG (both rank the circuit first), the masks keep it
    first through 100 steps at a density of a fifth of the graph."""
    model, orig, new = induction
    metric, exact, true = induction_circuit
    scores = exact if start == "exact" else attr_edges(model, orig, metric, new_input=new, method="ig")
    learned = learn_edge_masks(model, scores, orig, metric, new_input=new, steps=100, density=0.2)
    assert Circuit.from_scores(learned, len(true)) == true


@NO_HEAD_INPUTS
def test_learned_masks_cannot_see_behind_a_saturated_softmax(induction, induction_circuit):
    """From EAP, which scores the previous-token head's edges 0 (the induction head's pattern is
    saturated, so their gradient vanishes), the masks learn nothing about them either: what they
    keep is the circuit less those two edges, as EAP's own top edges are."""
    model, orig, new = induction
    metric, _, true = induction_circuit
    eap = attr_edges(model, orig, metric, new_input=new)
    learned = learn_edge_masks(model, eap, orig, metric, new_input=new, steps=100, density=0.2)
    blind = {edge for edge in true if abs(float(eap.score(edge).mean())) < 1e-6}
    assert {str(edge) for edge in blind} == {"embed -> head 0.0 (v)", "head 0.0 -> head 1.0 (k)"}
    assert Circuit.from_scores(learned, len(true)).edges == sorted(set(true) - blind)


def test_the_density_is_the_expected_share_of_kept_edges():
    """kept_probability is P(mask > 0) of the hard-concrete distribution: checked by sampling."""
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    noise = torch.rand(200_000, 3, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    share = (sampled_mask(log_alpha, noise) > 0).float().mean(0)
    torch.testing.assert_close(share, kept_probability(log_alpha), atol=5e-3, rtol=0)


def test_bad_arguments_are_explained(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    eap = attr_edges(model, orig, per_prompt_metric(), new_input=new)
    with raises("learn_edge_masks keeps each prompt's metric at the full model's, so it needs a metric that is"):
        learn_edge_masks(model, eap, orig, lambda logits: logits[:, -1, 5].mean(), new_input=new, steps=1)
    with raises("EdgeScores of this model's graph"):
        learn_edge_masks(model, "eap", orig, per_prompt_metric(), new_input=new)
    with raises("steps must be a whole number"):
        learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=new, steps=-1)
    with raises("density must be a share of the edges"):
        learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=new, density=1.5)
    with raises("learning_rate must be a finite number above 0"):
        learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=new, learning_rate=float("nan"))
    with raises("leaves each prompt's metric as it is"):
        learn_edge_masks(model, eap, orig, per_prompt_metric(), new_input=orig, steps=1)
