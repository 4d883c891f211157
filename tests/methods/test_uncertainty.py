"""Uncertainty over prompts (issue 24): per-prompt values equal single-prompt runs, intervals cover
the population value of 256 prompts at their level on subsets of 16, standard errors are their
formulas, Benjamini-Hochberg controls false discoveries, uncertainty costs no forward pass, seeds
reproduce intervals, TransformerLens 4's own statistics agree, and misuse is refused."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from tests.helpers import assert_close, counted, make_inputs, raises
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    IterNode,
    Node,
    PatchResult,
    act_patch,
    attr_patch,
    attr_path_patch,
    evaluate_circuit,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)
from transformer_lens_patching._stats import PromptSamples, significant
from transformer_lens_patching.metrics import LogitDiff, LogitsAt, PromptMean, calibrate, denoising_metric

N_PROMPTS, SUBSET, SUBSETS = 256, 16, 500
LAYERS = [0, 5, 11]
COVERAGE_TOLERANCE = 0.04
"""How far from 95% the coverage of 95% intervals may be (Monte-Carlo error is under 1%)."""


def last_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[:, -1].double()


def literal_logit_diff(model, tokens, answers) -> torch.Tensor:
    """Each prompt's right-minus-wrong logit at the last position, from the model's own forward."""
    logits = last_logits(model, tokens)
    rows = torch.arange(len(tokens))
    return logits[rows, answers[:, 0]] - logits[rows, answers[:, 1]]


@pytest.fixture(scope="module")
def population(gpt2_model):
    """256 prompts, answers chosen so that clean and corrupted differ (the ratio's scale is far from
    0), act_patch of every head of three layers with a plain and a denoising logit difference."""
    model = gpt2_model
    corrupted, clean = make_inputs(model, batch=N_PROMPTS, seq_len=6)
    gap = last_logits(model, clean)[:, :2000] - last_logits(model, corrupted)[:, :2000]
    answers = torch.stack([gap.argmax(-1), gap.argmin(-1)], dim=1)
    metric = LogitDiff(answers)
    nodes = IterNode("z", layers=LAYERS)
    plain = act_patch(model, corrupted, nodes, metric, new_input=clean, uncertainty=True)["z"]
    ratio_metric = denoising_metric(metric, *calibrate(model, metric, clean, corrupted))
    ratio = act_patch(model, corrupted, nodes, ratio_metric, new_input=clean, uncertainty=True)["z"]
    return {
        "corrupted": corrupted,
        "clean": clean,
        "answers": answers,
        "plain": plain,
        "ratio": ratio,
        "clean_ld": literal_logit_diff(model, clean, answers),
        "corrupted_ld": literal_logit_diff(model, corrupted, answers),
    }


def covered(low, high, truth) -> torch.Tensor:
    return ((low <= truth) & (truth <= high)).double()


def assert_coverage(method: str, coverage: float) -> None:
    assert 0.95 - COVERAGE_TOLERANCE <= coverage <= 0.95 + COVERAGE_TOLERANCE, (method, coverage)


def test_per_prompt_values_are_single_prompt_runs(gpt2_model, population):
    plain, corrupted, clean, answers = (population[k] for k in ("plain", "corrupted", "clean", "answers"))
    assert plain.dims == ("layer", "head") and plain.n_prompts == N_PROMPTS
    assert plain.per_prompt.dims == ("layer", "head", "batch")
    for p in (0, 137):
        one = act_patch(
            gpt2_model,
            corrupted[p : p + 1],
            IterNode("z", layers=LAYERS),
            LogitDiff(answers[p : p + 1]),
            new_input=clean[p : p + 1],
        )["z"]
        assert_close(plain.per_prompt[..., p], one)
    # the unpatched run p_values test against is the corrupted run's logit difference
    assert_close(plain.samples.baseline, population["corrupted_ld"])


def test_intervals_of_a_mean_cover_the_population_mean(population):
    """Subsets of 16 prompts drawn with replacement from the 256 (independent draws from that
    population, as the intervals assume); 500 subsets x 12 cells = 6000 intervals per method,
    pooled over the cells."""
    values = population["plain"].per_prompt.as_tensor().double()  # (layer, head, prompt)
    truth = values.mean(-1)
    assert_close(population["plain"], truth)
    draws = torch.randint(0, N_PROMPTS, (SUBSETS, SUBSET), generator=torch.Generator().manual_seed(0))
    subsets = PromptSamples(values[..., draws])  # cells (layer, head, subset), 16 prompts each
    target = truth.unsqueeze(-1).expand(-1, -1, SUBSETS)
    for method in ("t", "bootstrap"):
        assert_coverage(method, float(covered(*subsets.ci(0.95, method, n_resamples=1000, seed=1), target).mean()))
    # a check that can fail: 50% intervals do not cover 95% of the time
    half = float(covered(*subsets.ci(0.5, "t"), target).mean())
    assert abs(half - 0.5) <= COVERAGE_TOLERANCE, half


def test_intervals_of_a_ratio_cover_the_population_ratio(population):
    """As for the mean, on the denoising metric: each prompt is drawn with its calibration values.
    300 subsets x 12 cells = 3600 intervals per method, pooled over the cells."""
    ratio, clean_ld, corrupted_ld = population["ratio"], population["clean_ld"], population["corrupted_ld"]
    values = population["plain"].per_prompt.as_tensor().double()  # the patched logit differences
    scale = clean_ld - corrupted_ld
    assert scale.mean() > 5 * scale.std() / math.sqrt(SUBSET)  # far from 0 on every subset
    truth = (values.mean(-1) - corrupted_ld.mean()) / scale.mean()
    torch.testing.assert_close(ratio.as_tensor().double(), truth, rtol=1e-5, atol=1e-5)
    generator = torch.Generator().manual_seed(1)
    hits = {"t": [], "bootstrap": []}
    for index in range(300):
        subset = ratio.samples.subset(torch.randint(0, N_PROMPTS, (SUBSET,), generator=generator))
        for method, cover in hits.items():
            cover.append(covered(*subset.ci(0.95, method, n_resamples=1000, seed=index), truth))
    for method, cover in hits.items():
        assert_coverage(method, float(torch.stack(cover).mean()))


def test_stderr_of_a_mean_and_of_a_ratio_are_their_formulas(population):
    plain, ratio = population["plain"], population["ratio"]
    values = plain.per_prompt.as_tensor().double()
    assert_close(plain.stderr, values.std(-1, unbiased=True) / math.sqrt(N_PROMPTS))
    # the delta method for (mean(v) - mean(o)) / mean(s), o the corrupted run, s clean - corrupted
    offset = population["corrupted_ld"]
    scale = population["clean_ld"] - offset
    estimate = (values.mean(-1, keepdim=True) - offset.mean()) / scale.mean()
    influence = (values - offset - estimate * scale) / scale.mean()
    torch.testing.assert_close(ratio.stderr.double(), influence.std(-1) / math.sqrt(N_PROMPTS), rtol=1e-4, atol=1e-7)
    # ignoring the calibration's own noise would give another number
    naive = (values / scale.mean()).std(-1) / math.sqrt(N_PROMPTS)
    assert not torch.allclose(ratio.stderr.double(), naive, rtol=1e-2)
    assert PromptSamples(torch.tensor([1.0, 2.0, 3.0, 6.0])).stderr().item() == pytest.approx(math.sqrt(14 / 3) / 2)


def literal_bh(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg's step-up rule: reject the k smallest, k the largest i with p_(i) <= i alpha / m."""
    ordered = sorted(p.tolist())
    m = len(ordered)
    k = max((i for i in range(1, m + 1) if ordered[i - 1] <= i * alpha / m), default=0)
    return p <= ordered[k - 1] if k else torch.zeros(m, dtype=torch.bool)


def test_benjamini_hochberg_and_bonferroni_are_their_rules():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.rand(30, generator=generator).double() ** 3
        assert torch.equal(significant(p, 0.05, "fdr_bh"), literal_bh(p, 0.05))
        assert torch.equal(significant(p, 0.05, "bonferroni"), p <= 0.05 / 30)
        assert torch.equal(significant(p, 0.05, None), p <= 0.05)


def noisy_samples(generator, effects: torch.Tensor, n: int = 20) -> PromptSamples:
    """Values = baseline + effect + noise symmetric about 0 (heteroscedastic across prompts)."""
    baseline = torch.randn(n, generator=generator).double()
    noise = torch.randn(len(effects), n, generator=generator).double() * (0.5 + torch.rand(n, generator=generator))
    return PromptSamples(baseline + effects.unsqueeze(-1) + noise, baseline=baseline)


def test_benjamini_hochberg_controls_false_discoveries():
    """200 repeats of 50 cells x 20 prompts. All nulls true: a false discovery proportion is 1 when
    anything is found, so FDR = P(any discovery) <= alpha; 200 repeats estimate it to a standard
    error of sqrt(0.05 * 0.95 / 200) = 0.015, and we allow 3 of those. Without correction the same
    check fails (P(any) = 1 - 0.95**50 = 0.92)."""
    alpha, repeats, tolerance = 0.05, 200, 3 * math.sqrt(0.05 * 0.95 / 200)
    generator = torch.Generator().manual_seed(0)
    any_found, uncorrected_found, false_proportions, power = [], [], [], []
    effects = torch.cat([torch.zeros(40), torch.full((10,), 1.5)]).double()
    for repeat in range(repeats):
        p = noisy_samples(generator, torch.zeros(50)).p_values(n_permutations=2000, seed=repeat)
        any_found.append(bool(significant(p, alpha, "fdr_bh").any()))
        uncorrected_found.append(bool(significant(p, alpha, None).any()))
        p = noisy_samples(generator, effects).p_values(n_permutations=2000, seed=repeat)
        found = significant(p, alpha, "fdr_bh")
        false_proportions.append(float(found[:40].sum()) / max(1, int(found.sum())))
        power.append(float(found[40:].double().mean()))
    assert sum(any_found) / repeats <= alpha + tolerance
    assert sum(uncorrected_found) / repeats > 0.8
    # with 40 of 50 nulls, BH's bound is alpha * 40 / 50; false proportions are in [0, 1], so the
    # same 3-standard-error allowance holds
    assert sum(false_proportions) / repeats <= alpha * 40 / 50 + tolerance
    assert sum(power) / repeats > 0.9


def test_patching_from_an_identical_run_has_no_effect_and_no_significant_cell(gpt2_model):
    orig, _ = make_inputs(gpt2_model, batch=20, seq_len=6)
    metric = LogitDiff(torch.tensor([[5, 6]]).expand(20, 2))
    result = act_patch(gpt2_model, orig, IterNode("z", layers=LAYERS), metric, new_input=orig, uncertainty=True)["z"]
    effects = result.samples.values - result.samples.baseline
    assert effects.abs().max() < 1e-5
    assert not result.significant().any() and not result.significant(correction=None).any()


def test_uncertainty_runs_no_more_layers(gpt2_model):
    orig, new = make_inputs(gpt2_model, batch=4, seq_len=6)
    metric = LogitDiff(torch.tensor([[5, 6]]).expand(4, 2))
    last = gpt2_model.cfg.n_layers - 1
    calls = {
        "z sweep": lambda u: act_patch(gpt2_model, orig, IterNode("z"), metric, new_input=new, uncertainty=u),
        "path sweep": lambda u: path_patch(
            gpt2_model, orig, new, IterNode("z", layers=LAYERS), Node("resid_post", last), metric, uncertainty=u
        ),
    }
    for name, call in calls.items():
        call(False)  # a model's first call probes its architecture once
        counts = []
        for uncertainty in (False, True):
            with counted(gpt2_model, 4) as count:
                call(uncertainty)
            counts.append(dict(count))
        assert counts[0] == counts[1], name
    plans = [
        plan_act_patch(gpt2_model, orig, IterNode("z"), metric, new_input=new, uncertainty=u) for u in (False, True)
    ]
    assert plans[0].layer_evaluations == plans[1].layer_evaluations
    paths = [
        plan_path_patch(
            gpt2_model, orig, new, IterNode("z", layers=LAYERS), Node("resid_post", last), metric, uncertainty=u
        )
        for u in (False, True)
    ]
    assert paths[0].layer_evaluations == paths[1].layer_evaluations


def test_seeds_reproduce_intervals_and_default_results_are_unchanged(gpt2_model):
    orig, new = make_inputs(gpt2_model, batch=20, seq_len=6)
    metric = LogitDiff(torch.tensor([[5, 6]]).expand(20, 2))
    nodes = IterNode("z", layers=LAYERS)
    result = act_patch(gpt2_model, orig, nodes, metric, new_input=new, uncertainty=True)["z"]
    for method in ("bootstrap", "percentile"):
        first, again = result.ci(method=method, seed=3), result.ci(method=method, seed=3)
        other = result.ci(method=method, seed=4)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, other))
        assert (first[0] <= result).all() and (result <= first[1]).all()
    assert all(torch.equal(a, b) for a, b in zip(result.ci(method="t", seed=3), result.ci(method="t", seed=4)))
    default = act_patch(gpt2_model, orig, nodes, metric, new_input=new)["z"]
    assert default.samples is None
    torch.testing.assert_close(result.as_tensor(), default.as_tensor(), rtol=0, atol=1e-6)
    node = Node("z", 3, head=0)
    plain = act_patch(gpt2_model, orig, node, metric, new_input=new)
    assert type(plain) is torch.Tensor and plain.ndim == 0
    torch.testing.assert_close(
        act_patch(gpt2_model, orig, node, metric, new_input=new, uncertainty=True).as_tensor(), plain, rtol=0, atol=1e-6
    )


def test_statistics_agree_with_transformer_lens_own(gpt2_model):
    statistics = pytest.importorskip("transformer_lens.utilities.statistics", reason="TransformerLens 4.3 only")
    orig, new = make_inputs(gpt2_model, batch=10, seq_len=6)
    metric = LogitDiff(torch.tensor([[5, 6]]).expand(10, 2))
    result = act_patch(gpt2_model, orig, IterNode("z", layers=LAYERS), metric, new_input=new, uncertainty=True)["z"]
    values = result.per_prompt.as_tensor().double()
    assert_close(result.stderr, statistics.standard_error(values))
    differences = result.samples.values - result.samples.baseline
    expected = statistics.sign_flip_permutation_pvalue(differences)  # exact: 10 prompts <= 12
    assert expected.dtype == torch.float64 and (expected < 1).any()
    assert torch.equal(result.p_values().double(), expected)


def test_misuse_is_refused(gpt2_model):
    orig, new = make_inputs(gpt2_model, batch=4, seq_len=6)
    answers = torch.tensor([[5, 6]]).expand(4, 2)
    node = Node("z", 3, head=0)
    for metric in (lambda logits: logits[:, -1, 5].mean(), LogitsAt([5, 6], reduce=lambda x: x.mean())):
        with raises(r"mean over prompts.*PromptMean\(function\)"):
            act_patch(gpt2_model, orig, node, metric, new_input=new, uncertainty=True)
    circuit = evaluate_circuit(
        gpt2_model, Circuit.full(EdgeGraph.of(gpt2_model)), orig, LogitDiff(answers), new_input=new, uncertainty=True
    )
    assert circuit.stderr.ndim == 0
    with raises("no per-prompt values of the unpatched run"):
        circuit.p_values()
    result = act_patch(gpt2_model, orig, node, LogitDiff(answers), new_input=new, uncertainty=True)
    with raises("level must be between 0 and 1"):
        result.ci(1.5)
    with raises("correction must be one of"):
        result.significant(correction="holm")
    plain = act_patch(gpt2_model, orig, IterNode("z", layers=LAYERS), LogitDiff(answers), new_input=new)["z"]
    with raises("uncertainty=True"):
        plain.ci()
    # the fix the message names works: PromptMean of the per-prompt function
    mean = PromptMean(lambda logits: logits[:, -1, 5] - logits[:, -1, 6])
    assert_close(act_patch(gpt2_model, orig, node, mean, new_input=new, uncertainty=True), result)


def test_node_results_and_selections_keep_their_samples(gpt2_model):
    orig, new = make_inputs(gpt2_model, batch=8, seq_len=6)
    metric = LogitDiff(torch.tensor([[5, 6]]).expand(8, 2))
    node = act_patch(gpt2_model, orig, Node("z", 3, head=0), metric, new_input=new, uncertainty=True)
    assert isinstance(node, PatchResult) and node.dims == () and node.n_prompts == 8
    values = node.per_prompt.as_tensor().double()
    assert_close(node.stderr, values.std() / math.sqrt(8))
    sweep = act_patch(gpt2_model, orig, IterNode("z", layers=LAYERS), metric, new_input=new, uncertainty=True)["z"]
    cell = sweep.sel(layer=5, head=2)
    assert isinstance(cell, PatchResult) and cell.samples is not None and cell.dims == ()
    assert_close(cell.stderr, sweep.stderr[1, 2])
    assert_close(cell.per_prompt, sweep.per_prompt[1, 2])
    row = sweep.sel(layer=11)
    assert row.dims == ("head",) and row.samples is not None
    assert_close(row.stderr, sweep.stderr[2])
    assert torch.equal(row.p_values(), sweep.p_values()[2])


def test_attribution_keeps_the_per_prompt_metrics_estimates(gpt2_model):
    """attr_patch and attr_path_patch: the per-prompt values are the estimates of the per-prompt
    metric, their means the default result, at the same work; "value" estimates are tested against
    the orig run's own logit difference, "delta" estimates against 0."""
    for function in (attr_patch, attr_path_patch):
        if "uncertainty" not in inspect.signature(function).parameters:
            pytest.skip(f"{function.__name__} does not take uncertainty yet")
    orig, new = make_inputs(gpt2_model, batch=8, seq_len=6)
    answers = torch.tensor([[5, 6]]).expand(8, 2)
    metric, per_prompt_metric = LogitDiff(answers), LogitDiff(answers, per_prompt=True)
    senders, receiver = IterNode("z", layers=LAYERS), Node("resid_post", gpt2_model.cfg.n_layers - 1)
    calls = {
        "attr_patch": lambda m, **kw: attr_patch(gpt2_model, orig, senders, m, new_input=new, **kw),
        "attr_path_patch": lambda m, **kw: attr_path_patch(gpt2_model, orig, new, senders, receiver, m, **kw),
    }
    orig_ld = literal_logit_diff(gpt2_model, orig, answers)
    for name, call in calls.items():
        per_prompt = call(per_prompt_metric)["z"].as_tensor()
        assert per_prompt.shape[-1] == 8, name
        for estimate, baseline in (("value", orig_ld), ("delta", torch.zeros(8))):
            kept = call(metric, estimate=estimate, uncertainty=True)["z"]
            expected = per_prompt if estimate == "value" else per_prompt - orig_ld.float()
            assert_close(kept.per_prompt, expected)
            assert_close(kept, call(metric, estimate=estimate)["z"])
            assert_close(kept.stderr, expected.double().std(-1) / math.sqrt(8))
            assert_close(kept.samples.baseline, baseline)
        with counted(gpt2_model, 8) as plain:
            call(metric)
        with counted(gpt2_model, 8) as kept:
            call(metric, uncertainty=True)
        assert plain == kept, name
    with raises("grad_drop"):
        attr_patch(gpt2_model, orig, IterNode("z"), metric, new_input=new, grad_drop=True, uncertainty=True)
