"""Uncertainty of edge scores, circuits and rankings: the per-prompt values kept by `attr_edges`,
`faithfulness_curve` and `confirm` with `uncertainty=True` against the per-prompt metric's own
results, the curve's standard error against the delta method written out here, and the
stability of circuits where the answer is known (prompts that all agree, an edge far stronger
than the rest)."""

import math

import pytest
import torch

from tests.helpers import counted, make_inputs, raises

BATCH = 8


@pytest.fixture(scope="module")
def setting(gpt2_model):
    from transformer_lens_patching import LogitDiff, calibrate, denoising_metric

    orig, new = make_inputs(gpt2_model, batch=BATCH, seq_len=6)
    answers = torch.tensor([[5, 6]] * BATCH)
    clean, corrupted = calibrate(gpt2_model, LogitDiff(answers), new, orig)
    return orig, new, answers, denoising_metric(LogitDiff(answers), clean, corrupted), clean, corrupted


def test_edge_scores_are_the_means_of_the_per_prompt_metrics_scores(gpt2_model, setting):
    from transformer_lens_patching import LogitDiff, attr_edges

    orig, new, answers, metric, clean, corrupted = setting
    per_prompt = attr_edges(gpt2_model, orig, LogitDiff(answers, per_prompt=True), new_input=new).scores
    scores = attr_edges(gpt2_model, orig, metric, new_input=new, uncertainty=True)
    scale = (clean.samples.values - corrupted.samples.values).mean()
    torch.testing.assert_close(scores.samples.values, per_prompt.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.scores.double(), per_prompt.double().mean(1) / scale, rtol=1e-4, atol=1e-6)
    plain = attr_edges(gpt2_model, orig, metric, new_input=new)
    torch.testing.assert_close(scores.scores, plain.scores, rtol=1e-4, atol=1e-6)
    ratio = per_prompt.double().mean(1, keepdim=True) / scale
    scales = clean.samples.values - corrupted.samples.values
    influence = (per_prompt.double() - ratio * scales) / scale
    expected = influence.std(1) / math.sqrt(BATCH)
    torch.testing.assert_close(scores.stderr.double(), expected, rtol=1e-4, atol=1e-7)


def test_resampled_scores_are_the_scores_of_the_resampled_prompts(gpt2_model, setting):
    """What circuit stability resamples: a subset's scores from the per-prompt ones equal
    attr_edges run again on that subset alone."""
    from transformer_lens_patching import LogitDiff, attr_edges

    orig, new, answers, _, _, _ = setting
    scores = attr_edges(gpt2_model, orig, LogitDiff(answers), new_input=new, uncertainty=True)
    subset = torch.tensor([6, 1, 3, 1])
    again = attr_edges(gpt2_model, orig[subset], LogitDiff(answers[subset]), new_input=new[subset])
    torch.testing.assert_close(scores.samples.subset(subset).estimate().float(), again.scores, rtol=1e-4, atol=1e-6)


def test_edge_attribution_runs_the_same_layers_with_uncertainty(gpt2_model, setting):
    from transformer_lens_patching import attr_edges

    orig, new, _, metric, _, _ = setting
    with counted(gpt2_model, BATCH) as without:
        attr_edges(gpt2_model, orig, metric, new_input=new)
    with counted(gpt2_model, BATCH) as with_uncertainty:
        attr_edges(gpt2_model, orig, metric, new_input=new, uncertainty=True)
    assert without == with_uncertainty


def test_faithfulness_band_against_the_delta_method_written_out(gpt2_model, setting):
    from transformer_lens_patching import Circuit, LogitDiff, attr_edges, evaluate_circuit, faithfulness_curve

    orig, new, answers, metric, _, _ = setting
    scores = attr_edges(gpt2_model, orig, metric, new_input=new, uncertainty=True)
    sizes = [0.05, 0.2, 1.0]
    curve = faithfulness_curve(gpt2_model, scores, orig, metric, new_input=new, sizes=sizes, uncertainty=True)
    plain = faithfulness_curve(gpt2_model, scores, orig, metric, new_input=new, sizes=sizes)
    torch.testing.assert_close(torch.tensor(curve.faithfulness), torch.tensor(plain.faithfulness), atol=1e-4, rtol=0)
    graph = scores.graph
    circuits = [*curve.circuits, Circuit.full(graph), Circuit.empty(graph)]
    values = evaluate_circuit(gpt2_model, circuits, orig, LogitDiff(answers, per_prompt=True), new_input=new)
    values = values.as_tensor().double()
    full, empty = values[-2], values[-1]
    ratio = (values[:-2].mean(1) - empty.mean()) / (full.mean() - empty.mean())
    influence = (values[:-2] - empty - ratio[:, None] * (full - empty)) / (full - empty).mean()
    expected = influence.std(1) / math.sqrt(BATCH)
    stderr = torch.tensor(curve.faithfulness_stderr, dtype=torch.float64)
    torch.testing.assert_close(stderr, expected, rtol=1e-3, atol=1e-6)
    low, high = curve.faithfulness_ci(method="t")
    assert all(lo <= f <= hi for lo, f, hi in zip(low, curve.faithfulness, high))
    assert curve.faithfulness_ci(seed=3) == curve.faithfulness_ci(seed=3)
    from transformer_lens_patching import plots

    bars = plots.faithfulness_curves(curve).data[0].error_y
    low, high = curve.faithfulness_ci()
    torch.testing.assert_close(torch.tensor(bars.arrayminus), torch.tensor(curve.faithfulness) - torch.tensor(low))
    assert plots.faithfulness_curves(plain).data[0].error_y.array is None


def _scores_with(per_prompt: torch.Tensor, graph):
    from transformer_lens_patching import EdgeScores
    from transformer_lens_patching._stats import PromptSamples

    samples = PromptSamples(per_prompt, baseline=torch.zeros(per_prompt.shape[1]))
    return EdgeScores(graph, samples.estimate().float(), "atp", 0.0, samples)


def test_circuits_are_stable_when_every_prompt_agrees(gpt2_model):
    from transformer_lens_patching import Circuit, EdgeGraph, circuit_stability

    graph = EdgeGraph.of(gpt2_model)
    strength = torch.randn(len(graph), generator=torch.Generator().manual_seed(0))
    scores = _scores_with(strength[:, None].repeat(1, 6), graph)
    for method in ("bootstrap", "halves"):
        stability = circuit_stability(scores, 40, method=method, n_resamples=10)
        assert stability.circuit == Circuit.from_scores(scores, 40)
        assert torch.equal(stability.inclusion, stability.circuit.mask.float())
        assert torch.equal(stability.jaccard, torch.ones(10))
    frequency = scores.top_stability(25, n_resamples=20)
    expected = torch.zeros(len(graph))
    expected[[graph.index(edge) for edge in scores.top(25)]] = 1
    assert torch.equal(frequency, expected)


def test_an_edge_far_stronger_than_noise_is_always_found_and_noise_rarely(gpt2_model):
    from transformer_lens_patching import EdgeGraph, circuit_stability

    graph = EdgeGraph.of(gpt2_model)
    noise = torch.randn(len(graph), 16, generator=torch.Generator().manual_seed(1))
    strong = graph.index(graph.edges[-1])
    noise[strong] += 100.0
    scores = _scores_with(noise, graph)
    stability = circuit_stability(scores, 5, prune=False, n_resamples=50)
    assert stability.inclusion[strong] == 1.0
    assert float(stability.inclusion.sum()) == pytest.approx(5.0)
    others = torch.cat([stability.inclusion[:strong], stability.inclusion[strong + 1 :]])
    assert float(others.max()) < 0.5, "pure noise is not stable"
    # 16 prompts: no sign-flip p-value is below 2 / 2**16, too coarse for FDR over thousands of
    # edges; the t-test's is not limited so.
    assert not scores.significant().any()
    found = scores.significant(test="t")
    assert found[strong] and int(found.sum()) <= 0.05 * len(graph)


def test_confirm_says_how_stable_the_top_k_is(gpt2_model, setting):
    from transformer_lens_patching import IterNode, attr_patch, confirm

    orig, new, answers, metric, _, _ = setting
    nodes = IterNode(["z", "post"], layers=[0, 5])
    for uncertainty in (False, True):
        estimates = attr_patch(gpt2_model, orig, nodes, metric, new_input=new, uncertainty=uncertainty)
        checked = confirm(gpt2_model, estimates, orig, nodes, metric, new_input=new, top_k=4)
        frequencies = [cell.top_k_frequency for cell in checked.cells]
        if uncertainty:
            assert all(0 < f <= 1 for f in frequencies)
            assert "top_k_frequency" in checked.to_frame().columns
        else:
            assert frequencies == [None] * 4


def test_stability_needs_per_prompt_scores(gpt2_model, setting):
    from transformer_lens_patching import attr_edges, circuit_stability

    orig, new, _, metric, _, _ = setting
    scores = attr_edges(gpt2_model, orig, metric, new_input=new)
    with raises("uncertainty=True"):
        circuit_stability(scores, 10)
    with raises("uncertainty=True"):
        _ = scores.stderr
    with raises("method must be one of"):
        circuit_stability(attr_edges(gpt2_model, orig, metric, new_input=new, uncertainty=True), 10, method="jack")
