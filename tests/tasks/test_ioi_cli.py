"""The IOI analysis, its report files, the `tl-patch` command and the report in a real browser.

A small random GPT-2-shaped model of 30 layers (as deep as SmolLM2) with the whole SmolLM2
vocabulary runs the analysis quickly; its results are checked against literal
recomputations, and its report in headless Chromium. SmolLM2 itself runs the command once
(test_ioi_report_smollm2.py), and its findings are checked against reference-numbers.md.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import model_state
from tests.oracles import models
from tl_patch import main
from transformer_lens_patching import (
    MIB_FRACTIONS,
    Circuit,
    EdgeGraph,
    LogitDiff,
    Node,
    PatchingError,
    act_patch,
    attr_edges,
    attr_patch,
    eap_ig_circuit,
    eap_ig_scores,
    evaluate_circuit,
    path_patch,
)
from transformer_lens_patching._tasks.ioi.analysis import WORDS
from transformer_lens_patching._tasks.ioi.analysis import planned_ioi_steps as planned_steps
from transformer_lens_patching._tasks.job import figures as job_figures
from transformer_lens_patching._tasks.job import report_page
from transformer_lens_patching._tasks.job.figures import (
    circuit_figure,
    faithfulness_figure,
    logit_diff_figure,
    step_figure,
)
from transformer_lens_patching._tasks.job.report import as_json
from transformer_lens_patching.ioi import IOISettings, plan_ioi, run_ioi, write_report

STEPS = ["act_heads", "act_words", "path_logits", "path_queries", "path_values", "attr_neurons", "circuit"]
LAYERS = 30
SETTINGS = IOISettings(n_prompts=5, top_k=2, min_effect=0.0, fdr=0.99, top_neurons=6, circuit_candidates=5)
"""No effect threshold, and a false discovery rate near 1: with 5 prompts no p-value is below 1/16, so at
the job's 0.05 no head of these random weights could be named; this way the steps find heads and every step
that can runs."""


@pytest.fixture(scope="module")
def tiny_model(tok):
    return models.gpt2_like(n_layers=LAYERS, tok=tok, vocab=len(tok))


@pytest.fixture(scope="module")
def analysis(tiny_model):
    before = model_state(tiny_model)
    lines, bars = [], io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(bars):
        warnings.simplefilter("ignore")
        result = run_ioi(tiny_model, SETTINGS, "tiny", progress=True, log=lines.append)
    assert model_state(tiny_model) == before
    result.log, result.bars = lines, bars.getvalue()
    return result


def logit_diffs(logits, dataset):
    """IO - S logit at the end word of each prompt, one prompt at a time."""
    values = []
    for i in range(dataset.N):
        end = int(dataset.word_idx["end"][i])
        values.append(float(logits[i, end, dataset.io_token_ids[i]] - logits[i, end, dataset.s_token_ids[i]]))
    return torch.tensor(values)


def test_logit_diffs_are_read_at_each_prompts_end(analysis, tiny_model):
    with torch.no_grad():
        clean = logit_diffs(tiny_model(analysis.dataset.toks), analysis.dataset)
        corrupted = logit_diffs(tiny_model(analysis.corrupted.toks), analysis.dataset)
    torch.testing.assert_close(analysis.clean_logit_diff, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(analysis.corrupted_logit_diff, corrupted, rtol=1e-5, atol=1e-5)
    assert len(set(analysis.dataset.lengths.tolist())) > 1, "the prompts should differ in length (padding is tested)"
    # accuracy among IO and S: IO's logit above S's, a positive logit difference
    assert analysis.clean_accuracy == pytest.approx(float((clean > 0).float().mean()))
    assert analysis.corrupted_accuracy == pytest.approx(float((corrupted > 0).float().mean()))


def figures(analysis) -> int:
    """The report's figures: the logit differences, then each step that ran (the circuit step: its curves and graph)."""
    return (
        1
        + sum(bool(step.results) for step in analysis.steps)
        + 2 * sum(step.circuit is not None for step in analysis.steps)
    )


def test_steps_and_result_dims(analysis, tiny_model):
    assert [step.key for step in analysis.steps] == STEPS
    heads = analysis.step("act_heads").results
    assert sorted(heads) == ["k", "pattern", "q", "v", "z"]
    assert heads["z"].dims == ("layer", "head") and tuple(heads["z"].shape) == (LAYERS, 4)
    words = analysis.step("act_words").results
    for component in ("resid_pre", "attn_out", "mlp_out"):
        assert words[component].dims == ("seq_pos", "layer")
        assert words[component].coords["seq_pos"] == WORDS
    assert analysis.step("path_logits").results["z"].dims == ("layer", "head")


def test_each_step_is_announced_and_its_bars_are_labelled(analysis, tiny_model):
    """A header before each step, with what it patches; progress bars named by step (and word)."""
    headers = [line for line in analysis.log if line.startswith("step ")]
    assert [line.split(":")[0] for line in headers] == [f"step {i}/8" for i in range(1, 9)]
    assert headers[1] == f"step 2/8: activation patching of z, q, k, v, pattern for {LAYERS * 4} heads"
    assert headers[3] == f"step 4/8: path patching of {LAYERS * 4} heads -> logits"
    d_mlp = tiny_model.cfg.d_mlp
    assert (
        headers[6] == f"step 7/8: attribution patching of {LAYERS * d_mlp} MLP neurons, "
        "then activation patching of the 6 strongest"
    )
    edges = len(EdgeGraph.of(tiny_model))
    assert headers[7] == (
        f"step 8/8: edge attribution of {edges:,} edges, exact scores of the 5 strongest, faithfulness "
        "curves of 3 rankings"
    )
    ran = [number for number, step in enumerate(analysis.steps, start=2) if step.results]
    labels = [f"step {n}/8" for n in ran if n != 3] + [f"step 3/8 at {word}" for word in WORDS]
    for label in labels:
        assert f"\r{label}: " in analysis.bars, label
    assert len(set(re.findall(r"\r(step [^:]*): ", analysis.bars))) == len(labels), "no other bars"
    assert "act_patch:" not in analysis.bars and "path_patch:" not in analysis.bars


def test_the_time_estimate_comes_from_the_plans(analysis, tiny_model):
    """The estimate counts the work of every plan `plan_ioi` makes (the path steps and the
    neurons' exact patching at their upper bound), plus the neuron screen: four passes of
    every layer (the clean run, the corrupted run's forward, and its backward at twice that)."""
    (line,) = [line for line in analysis.log if "Estimated time" in line]
    plans = dict(plan_ioi(tiny_model, SETTINGS))
    confirmation = plans["attr_neurons, exact patching of the strongest (at most: neurons in the first layer)"]
    assert confirmation.n_cells == SETTINGS.top_neurons
    assert confirmation.layer_evaluations == SETTINGS.top_neurons * LAYERS, "every pass from the first layer"
    curves = plans["circuit, faithfulness curves"]
    assert curves.n_cells == 3 * (2 * len(MIB_FRACTIONS) + 2), "three rankings, each two curves with full and empty"
    assert plans["circuit, exact scores of the candidates"].n_cells == SETTINGS.circuit_candidates + 1
    choosing = plans["circuit, choosing on the scoring prompts"]
    assert choosing.n_cells == 3 * (len(MIB_FRACTIONS) + 2), "three rankings' signed curves, with full and empty"
    assert curves.inputs[0].shape[0] == 2 and choosing.inputs[0].shape[0] == 3, "5 prompts: 3 score, 2 held out"
    assert plans["circuit, exact scores of the candidates"].inputs[0].shape[0] == 3
    # Each method's corrupted run, EAP's and EAP-IG's 5 points' forward + backward: 20 passes of the 3 scoring
    # prompts, 12 of all 5.
    edge_screen = 12
    work = sum(plan.layer_evaluations for plan in plans.values()) + (4 + edge_screen) * LAYERS
    assert f"({work:,} layer evaluations" in line
    assert analysis.estimated_seconds > 0


def test_a_model_of_one_layer_skips_the_steps_back_from_the_name_movers(tok):
    """Every head of a one-layer model is in layer 0: no head can send to the name movers."""
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_ioi(
            models.gpt2_like(n_layers=1, tok=tok, vocab=len(tok)),
            IOISettings(n_prompts=3),
            "one layer",
            progress=False,
            log=lines.append,
        )
    for key in ("path_queries", "path_values"):
        step = result.step(key)
        assert step.results == {} and step.description.startswith("Skipped")
        assert any(line.endswith(step.description) for line in lines)


def cells(result):
    return [
        ((layer, head), float(result.sel(layer=layer, head=head)))
        for layer in result.coords["layer"]
        for head in result.coords["head"]
    ]


def significant_cells(step) -> set[tuple[int, int]]:
    """The (layer, head) cells of a step's z result that its recorded test found significant."""
    z, significant = step.results["z"], step.uncertainty["z"].significant
    assert z.dims == ("layer", "head") and significant.shape == z.shape
    layers, heads = z.coords["layer"], z.coords["head"]
    return {(layers[i], heads[j]) for i, j in significant.nonzero().tolist()}


def test_top_heads_are_the_extreme_significant_cells(analysis):
    """Each role's heads are its sign's largest effects among the significant heads; the others of
    that sign are counted as not significant."""
    assert set(analysis.step("act_heads").top) == {
        "restoring heads (z: raise the logit diff)",
        "opposing heads (z: lower it)",
    }, "both signs"
    left_out = 0
    for step in (step for step in analysis.steps if step.results and step.top):
        significant = significant_cells(step)
        left_out += step.results["z"].numel() - len(significant)
        for role, heads in step.top.items():
            sign = 1 if "raise" in role or "restoring" in role else -1
            values = sorted(cells(step.results["z"]), key=lambda cell: -sign * cell[1])
            of_sign = [(head, value) for head, value in values if sign * value > 0]
            expected = [(head, value) for head, value in of_sign if head in significant][: SETTINGS.top_k]
            assert [(h.layer, h.head) for h in heads] == [head for head, _ in expected]
            assert [h.value for h in heads] == pytest.approx([value for _, value in expected])
            assert all(h.significant is True and h.stderr > 0 and h.ci_low < h.ci_high for h in heads)
            assert step.not_significant[role] == sum(head not in significant for head, _ in of_sign)
    assert left_out, "the test leaves some heads out"


def run_small(tok, n_prompts=3, log=lambda line: None, **settings):
    model = models.gpt2_like(n_layers=2, tok=tok, vocab=len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ioi(model, IOISettings(n_prompts=n_prompts, **settings), "two layers", progress=False, log=log)


def test_a_threshold_leaves_out_weak_heads(tok):
    """--min-effect: no head below it is listed (and so none is carried into the next step); it
    is a floor on the size of the significant heads."""
    analysis = run_small(tok, min_effect=0.3, fdr=0.99)
    for step in (step for step in analysis.steps if step.results and step.top):
        for role, heads in step.top.items():
            sign = 1 if "raise" in role or "restoring" in role else -1
            strong = {head for head, value in cells(step.results["z"]) if sign * value >= 0.3}
            named = strong & significant_cells(step)
            assert {(h.layer, h.head) for h in heads} <= named
            assert len(heads) == min(len(named), 3)
            assert step.not_significant[role] == len(strong - named)


def test_with_no_head_above_the_threshold_the_steps_back_are_skipped(tok):
    analysis = run_small(tok, min_effect=100.0, fdr=0.99)
    assert all(heads == [] for step in analysis.steps for heads in step.top.values())
    assert analysis.step("path_queries").results == {}
    assert analysis.step("path_queries").description == (
        "Skipped: the previous step found no head with a significant effect of at least 10000%."
    )
    assert analysis.step("path_values").description == "Skipped: the previous step was skipped."


def test_too_few_prompts_name_no_head_and_the_report_says_why(tok, tmp_path):
    """With 3 prompts the sign-flip test's smallest p-value is 2/8: at the job's false discovery
    rate (0.05) no head is significant, so none is named however large its effect; the steps back
    from the name movers are skipped, and the log, the report and results.json say so."""
    lines = []
    analysis = run_small(tok, log=lines.append)
    assert analysis.settings.fdr == 0.05
    for key in ("act_heads", "path_logits"):
        step = analysis.step(key)
        assert all(heads == [] for heads in step.top.values())
        assert sum(step.not_significant.values()) == sum(abs(value) >= 0.05 for _, value in cells(step.results["z"]))
        assert step.uncertainty["z"].p_values.min() >= 0.25
    assert analysis.step("path_queries").description == (
        "Skipped: the previous step found no head with a significant effect of at least 5%."
    )
    assert any("reached the size floor but not significance" in line for line in lines)
    write_report(analysis, tmp_path)
    page = (tmp_path / "report.html").read_text()
    power = page.split('id="test-power"')[1].split("</p>")[0]
    assert "the smallest p-value the test can give is 0.25" in power and "no head can be significant" in power
    assert "Among the model's 8 heads" in power
    data = json.loads((tmp_path / "results.json").read_text())
    saved = data["steps"][0]
    assert saved["top"] == {role: [] for role in saved["top"]} and sum(saved["not_significant"].values()) > 0
    assert not any(saved["results"]["z"]["significant"][layer][head] for layer in range(2) for head in range(4))


@pytest.mark.parametrize("n_prompts", [1, 2, 4])
def test_few_prompts_run_and_report_with_the_error_bars_they_allow(tok, tmp_path, n_prompts):
    """One prompt has no spread: no error bars, no head significant, no circuit step (nothing to
    hold out). Two have Student's t intervals (their bootstrap has three distinct resamples), and
    halves of one prompt leave the circuit without bands or stability; four give halves of two."""
    analysis = run_small(tok, n_prompts=n_prompts)
    write_report(analysis, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is True
    logit_diff = data["clean_logit_diff"]
    assert (logit_diff["stderr"] is None) == (n_prompts == 1)
    assert logit_diff["ci_method"] == ("t" if n_prompts < 3 else "bootstrap")
    z = data["steps"][0]["results"]["z"]
    assert (z["ci_low"] is None) == (n_prompts == 1) and "p_values" in z
    circuit = data["steps"][-1].get("circuit")
    if n_prompts == 1:
        assert circuit is None
        return
    halves = n_prompts // 2
    assert (circuit["stability"] is None) == (halves < 2)
    assert ("faithfulness_ci_low" in circuit["curves"][0]["signed"]) == (halves >= 2)
    assert all(("stderr" in edge) == (halves >= 2) for edge in circuit["circuit_edges"])
    assert 'id="fig-faithfulness"' in (tmp_path / "report.html").read_text()


def test_heads_follow_from_the_previous_step(analysis):
    """Each path step receives at the heads the step before found (those after layer 0), from
    every head before the last of them; it is skipped when all of them are in layer 0."""
    found = analysis.step("path_logits").top["name movers (lower the logit diff)"]
    for key, role in (("path_queries", "S-inhibition heads"), ("path_values", "heads writing into them")):
        step = analysis.step(key)
        receivers = [head for head in found if head.layer > 0]
        if not receivers:
            assert step.results == {} and step.description.startswith("Skipped")
            return
        assert step.results["z"].coords["layer"] == tuple(range(max(h.layer for h in receivers)))
        assert all(f"{h.layer}.{h.head}" in step.description for h in receivers)
        found = step.top[role]


def test_patching_an_unchanged_word_restores_nothing(analysis):
    """Clean and corrupted prompts share every token but the names: patching the residual
    stream at the first layer at a shared word changes nothing (denoising value 0)."""
    words = analysis.step("act_words").results["resid_pre"]
    for word in ("S1+1", "end"):
        assert float(words.sel(seq_pos=word, layer=0)) == pytest.approx(0.0, abs=1e-5)


def test_step_results_equal_direct_calls(analysis, tiny_model):
    """A cell of each step recomputed by a direct act_patch / path_patch call with metrics written here."""
    ds, corrupted = analysis.dataset, analysis.corrupted
    clean_mean, corrupted_mean = analysis.clean_logit_diff.mean(), analysis.corrupted_logit_diff.mean()

    def mean_ld(logits):
        return logit_diffs(logits, ds).mean()

    restored = act_patch(
        tiny_model,
        corrupted.toks,
        Node("v", 1, head=2),
        lambda logits: (mean_ld(logits) - corrupted_mean) / (clean_mean - corrupted_mean),
        new_input=ds.toks,
    )
    assert float(restored) == pytest.approx(
        float(analysis.step("act_heads").results["v"].sel(layer=1, head=2)), abs=1e-5
    )
    s2 = act_patch(
        tiny_model,
        corrupted.toks,
        Node("mlp_out", 2, seq_pos=ds.word_idx["S2"]),
        lambda logits: (mean_ld(logits) - corrupted_mean) / (clean_mean - corrupted_mean),
        new_input=ds.toks,
    )
    assert float(s2) == pytest.approx(
        float(analysis.step("act_words").results["mlp_out"].sel(seq_pos="S2", layer=2)), abs=1e-5
    )
    damage = path_patch(
        tiny_model,
        ds.toks,
        corrupted.toks,
        Node("z", 1, head=3),
        Node("resid_post", tiny_model.cfg.n_layers - 1),
        lambda logits: (mean_ld(logits) - clean_mean) / (clean_mean - corrupted_mean),
    )
    assert float(damage) == pytest.approx(
        float(analysis.step("path_logits").results["z"].sel(layer=1, head=3)), abs=1e-5
    )


def restored_fraction(analysis):
    """The denoising metric, differentiable: the mean IO - S logit difference at each prompt's
    end, as a fraction of the way from the corrupted mean (0) to the clean mean (1)."""
    ds = analysis.dataset
    clean_mean, corrupted_mean = analysis.clean_logit_diff.mean(), analysis.corrupted_logit_diff.mean()
    rows, ends = torch.arange(ds.N), torch.as_tensor(ds.word_idx["end"])
    io, s = torch.as_tensor(ds.io_token_ids), torch.as_tensor(ds.s_token_ids)

    def metric(logits):
        mean_ld = (logits[rows, ends, io] - logits[rows, ends, s]).mean()
        return (mean_ld - corrupted_mean) / (clean_mean - corrupted_mean)

    return metric


def test_the_neuron_step_screens_every_neuron_and_patches_the_strongest_exactly(analysis, tiny_model):
    """Every neuron's estimate is attr_patch's of that neuron; the neurons patched exactly are
    the largest estimates in size (a sort here), and their exact values are act_patch's."""
    ds, corrupted = analysis.dataset, analysis.corrupted
    metric = restored_fraction(analysis)
    step = analysis.step("attr_neurons")
    estimates = step.results["post"]
    assert estimates.dims == ("layer", "neuron") and tuple(estimates.shape) == (LAYERS, tiny_model.cfg.d_mlp)
    alone = attr_patch(tiny_model, corrupted.toks, Node("post", 7, neuron=11), metric, new_input=ds.toks)
    assert float(estimates.sel(layer=7, neuron=11)) == pytest.approx(float(alone), abs=1e-5)
    cells = [
        ((layer, neuron), float(estimates.sel(layer=layer, neuron=neuron)))
        for layer in range(LAYERS)
        for neuron in range(tiny_model.cfg.d_mlp)
    ]
    strongest = [cell for cell, _ in sorted(cells, key=lambda cell: -abs(cell[1]))[: SETTINGS.top_neurons]]
    confirmed = step.confirmation.cells
    assert [(cell.coords["layer"], cell.coords["neuron"]) for cell in confirmed] == strongest
    for cell in confirmed[:3]:
        exact = act_patch(
            tiny_model,
            corrupted.toks,
            Node("post", cell.coords["layer"], neuron=cell.coords["neuron"]),
            metric,
            new_input=ds.toks,
        )
        assert cell.exact == pytest.approx(float(exact), rel=1e-4, abs=1e-5), "float32 noise over clean - corrupted"
    assert step.confirmation.unpatched == pytest.approx(0.0, abs=1e-5), "the corrupted run restores nothing"


def attention_only(tok, n_layers: int = 2):
    """A random attention-only model (no MLPs) with the whole SmolLM2 vocabulary."""
    config = dict(
        n_layers=n_layers,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_vocab=len(tok),
        n_ctx=64,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        act_fn="gelu_new",
        seed=0,
    )
    if models.TL_MAJOR >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_native(TransformerBridgeConfig(**config), tokenizer=tok).eval()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**config), tokenizer=tok).eval()


def post_norm(tok):
    """A random 2-layer model with post-norm blocks (Gemma-2's: each attention and MLP output
    normalised before it joins the residual stream), with the whole SmolLM2 vocabulary."""
    torch.manual_seed(0)
    if models.TL_MAJOR >= 4:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=64,
            head_dim=16,
            intermediate_size=128,
            vocab_size=len(tok),
            max_position_embeddings=64,
        )
        config.architectures = ["Gemma2ForCausalLM"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                "gemma2", hf_model=Gemma2ForCausalLM(config).eval(), tokenizer=tok, device="cpu"
            )
            bridge.enable_compatibility_mode()
        return bridge
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_key_value_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=len(tok),
        n_ctx=64,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        use_normalization_before_and_after=True,
        seed=0,
    )
    return HookedTransformer(config, tokenizer=tok).eval()


def test_a_post_norm_model_runs_every_step(tok):
    """On post-norm blocks (each attention and MLP output normalised before it joins the residual
    stream) the library plans every step of the job, the circuit's included, and each runs."""
    model = post_norm(tok)
    settings = IOISettings(n_prompts=3, top_neurons=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_ioi(model, settings, "post-norm", progress=False, log=lambda line: None)
    skipped = [step.key for step in result.steps if step.description.startswith("Skipped")]
    assert not set(skipped) - {"path_queries", "path_values"}, skipped  # those two follow the heads found
    assert result.step("circuit").circuit is not None and result.step("path_logits").results


def test_a_step_the_library_refuses_is_skipped_with_its_reason(tok, monkeypatch):
    """The job asks the library through its public plan functions: a step whose plans it refuses
    is not planned, and is skipped with the refusal as its reason (the path steps after a refused
    one say so); every other step runs."""
    import transformer_lens_patching as tlp

    def refused(what: str):
        def plan(*args, **kwargs):
            raise PatchingError(f"{what} is refused on this model, for this test.")

        return plan

    monkeypatch.setattr(tlp, "plan_path_patch", refused("Path patching"))
    monkeypatch.setattr(tlp, "plan_circuit_evaluation", refused("Circuit evaluation"))
    model = post_norm(tok)
    settings = IOISettings(n_prompts=3, top_neurons=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_ioi(model, settings, "refusing", progress=False, log=lambda line: None)
        planned = [name for name, _ in plan_ioi(model, settings)]
    for key, what in (("path_logits", "Path patching"), ("circuit", "Circuit evaluation")):
        step = result.step(key)
        assert step.results == {} and step.circuit is None
        assert step.description == f"Skipped: {what} is refused on this model, for this test.", key
        assert not [name for name in planned if name.startswith(key.split("_")[0])], planned
    for key in ("path_queries", "path_values"):
        assert result.step(key).description == "Skipped: the previous step was skipped."
    assert result.step("act_heads").results and result.step("attr_neurons").results


def test_one_prompt_leaves_none_to_hold_out(tiny_model):
    """The circuit step holds prompts out for faithfulness: with one prompt it is not planned, and says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not [name for name, _ in plan_ioi(tiny_model, IOISettings(n_prompts=1)) if name.startswith("circuit")]
        assert [name for name, _ in plan_ioi(tiny_model, IOISettings(n_prompts=2)) if name.startswith("circuit")]
        skipped = dict(planned_steps(tiny_model, IOISettings(n_prompts=1)))["circuit"]
    assert skipped.startswith("Skipped: it needs at least 2 prompts")


def test_the_circuit_step_evaluates_its_circuit_exactly(analysis, tiny_model):
    """Edges are scored, and the circuit chosen, on the even prompts; faithfulness is measured on
    the odd ones (held out). The circuit is the smallest of the best signed curve on the scoring
    prompts that reaches the faithfulness asked for there (or the most faithful one), and its
    reported faithfulness is that of an exact evaluation on the held-out prompts."""
    finding = analysis.step("circuit").circuit
    assert finding.scored_on == (0, 2, 4) and finding.held_out == (1, 3)
    held_out = list(finding.held_out)
    clean, corrupted = analysis.dataset.toks[held_out], analysis.corrupted.toks[held_out]
    metric = LogitDiff(analysis.dataset.answers[held_out], analysis.dataset.word_idx["end"][held_out])
    graph = EdgeGraph.of(tiny_model)
    full, empty, value = (
        evaluate_circuit(
            tiny_model, [Circuit.full(graph), Circuit.empty(graph), finding.circuit], clean, metric, new_input=corrupted
        )
        .as_tensor()
        .tolist()
    )
    assert finding.faithfulness == pytest.approx((value - empty) / (full - empty), abs=1e-4)
    assert [mib.signed.method for mib in finding.curves] == ["atp", "ig", "ig+exact"]
    assert finding.curves[0].signed.full == pytest.approx(full, abs=1e-4), "curves measured on the held-out prompts"
    scoring = list(finding.scored_on)
    clean_s, corrupted_s = analysis.dataset.toks[scoring], analysis.corrupted.toks[scoring]
    metric_s = LogitDiff(analysis.dataset.answers[scoring], analysis.dataset.word_idx["end"][scoring])
    eap = attr_edges(tiny_model, clean_s, metric_s, new_input=corrupted_s)
    assert torch.allclose(eap.scores, finding.scores[0].scores, atol=1e-5), "edges scored on the scoring prompts"
    chooser = finding.selection[finding.chosen]
    assert chooser.area_under == max(curve.area_under for curve in finding.selection)
    own = float(metric_s(tiny_model(clean_s).detach()))
    assert chooser.full == pytest.approx(own, abs=1e-4), "chosen on the scoring prompts"
    reaching = [c for c, f in zip(chooser.circuits, chooser.faithfulness) if f >= SETTINGS.circuit_faithfulness]
    most_faithful = chooser.circuits[chooser.faithfulness.index(max(chooser.faithfulness))]
    assert finding.circuit == (reaching[0] if reaching else most_faithful)
    assert finding.chosen_faithfulness == chooser.faithfulness[chooser.circuits.index(finding.circuit)]
    confirmed, ig = finding.scores[2], finding.scores[1]
    changed = [edge for edge in graph if not torch.equal(confirmed.score(edge), ig.score(edge).to(confirmed.scores))]
    assert len(changed) <= SETTINGS.circuit_candidates and set(changed) <= set(ig.top(SETTINGS.circuit_candidates))


def test_a_model_without_mlps_skips_the_neuron_step(tok):
    """No neurons to screen: the step says so, the by-word step leaves out mlp_out, and the
    time estimate plans no neuron patching."""
    model = attention_only(tok)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_ioi(model, IOISettings(n_prompts=3), "attention only", progress=False, log=lines.append)
    step = result.step("attr_neurons")
    assert step.results == {} and step.confirmation is None
    assert step.description == "Skipped: this model has no MLP neurons to patch (it is attention-only)."
    assert "step 7/8: attribution patching of MLP neurons" in lines and any(
        line.endswith(step.description) for line in lines
    )
    assert sorted(result.step("act_words").results) == ["attn_out", "resid_pre"]
    assert not [name for name, _ in plan_ioi(model, IOISettings(n_prompts=3)) if name.startswith("attr_neurons")]


@pytest.fixture(scope="module")
def report_folder(analysis, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    write_report(analysis, folder)
    return folder


def test_the_report_files_share_their_permissions(report_folder):
    """results.json (written through a temporary file) is as readable as the other files: report.html,
    results.csv, and the circuit and edge scores in EAP-IG's format."""
    modes = {path.name: path.stat().st_mode & 0o777 for path in report_folder.iterdir()}
    assert modes.keys() == {"report.html", "results.json", "results.csv", "circuit.json", "edge_scores.json"}
    assert len(set(modes.values())) == 1, modes


def test_json_and_csv_hold_every_result(analysis, report_folder):
    data = json.loads((report_folder / "results.json").read_text())
    assert [step["key"] for step in data["steps"]] == STEPS
    assert data["clean_logit_diff"]["per_prompt"] == pytest.approx(analysis.clean_logit_diff.tolist())
    for step, saved in zip(analysis.steps, data["steps"]):
        for name, result in step.results.items():
            assert saved["results"][name]["dims"] == list(result.dims)
            assert torch.tensor(saved["results"][name]["values"]) == pytest.approx(result.as_tensor())
    confirmed = analysis.step("attr_neurons").confirmation.cells
    saved = data["steps"][STEPS.index("attr_neurons")]["confirmation"]
    assert [(c["coords"], c["estimate"], c["exact"]) for c in saved["cells"]] == [
        (c.coords, pytest.approx(c.estimate), pytest.approx(c.exact)) for c in confirmed
    ]
    assert saved["top_k_overlap"] == analysis.step("attr_neurons").confirmation.top_k_overlap
    with (report_folder / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0])[-6:] == ["value", "stderr", "ci_low", "ci_high", "p_value", "significant"]
    assert len(rows) == sum(r.numel() for step in analysis.steps for r in step.results.values()) + len(confirmed)
    exact_rows = [r for r in rows if r["component"] == "post exact"]
    assert [(int(r["layer"]), int(r["neuron"]), float(r["value"])) for r in exact_rows] == [
        (c.coords["layer"], c.coords["neuron"], pytest.approx(c.exact)) for c in confirmed
    ]
    row = next(r for r in rows if r["step"] == "path_logits" and r["layer"] == "1" and r["head"] == "3")
    assert float(row["value"]) == pytest.approx(float(analysis.step("path_logits").results["z"].sel(layer=1, head=3)))
    saved = data["steps"][STEPS.index("path_logits")]["results"]["z"]
    assert float(row["stderr"]) == pytest.approx(saved["stderr"][1][3])
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(
        (saved["ci_low"][1][3], saved["ci_high"][1][3])
    )
    assert float(row["p_value"]) == pytest.approx(saved["p_values"][1][3])
    assert row["significant"] == str(saved["significant"][1][3])
    assert all(r["stderr"] == "" and r["ci_low"] == "" for r in exact_rows), "exact patching keeps no per-prompt values"


def test_every_value_has_its_error_bars_in_json(analysis, report_folder):
    """Every result of every step carries its standard error and 95% interval, cell by cell; the
    results of heads their p-values and significance. The logit differences' mean carries them too:
    the standard error is the per-prompt values' sample standard deviation over sqrt(n)."""
    data = json.loads((report_folder / "results.json").read_text())
    for key in ("clean_logit_diff", "corrupted_logit_diff"):
        saved = data[key]
        per_prompt = torch.tensor(saved["per_prompt"], dtype=torch.float64)
        assert saved["stderr"] == pytest.approx(float(per_prompt.std() / len(per_prompt) ** 0.5), rel=1e-5)
        assert saved["ci_low"] < saved["mean"] < saved["ci_high"] and saved["ci_level"] == 0.95
        assert saved["n_prompts"] == SETTINGS.n_prompts
    for step in data["steps"]:
        for name, result in step["results"].items():
            values = torch.tensor(result["values"])
            for key in ("stderr", "ci_low", "ci_high"):
                assert torch.tensor(result[key]).shape == values.shape, (step["key"], name, key)
            assert (torch.tensor(result["stderr"]) >= 0).all()
            assert (torch.tensor(result["ci_low"]) <= torch.tensor(result["ci_high"])).all()
            assert result["ci_method"] == ("t" if values.numel() > 10_000 else "bootstrap")
            heads = "head" in result["dims"] or "kv_head" in result["dims"]
            assert ("p_values" in result) == heads and ("significant" in result) == heads, (step["key"], name)
            if heads:
                p_values = torch.tensor(result["p_values"])
                assert p_values.shape == values.shape and (p_values >= 1 / 16).all() and (p_values <= 1).all()


def benjamini_hochberg(p_values: list[float], fdr: float) -> list[bool]:
    """Which p-values Benjamini-Hochberg rejects at `fdr`: those up to the largest rank k whose p <= fdr k / m."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    m = len(p_values)
    passing = [rank for rank, i in enumerate(order, start=1) if p_values[i] <= fdr * rank / m]
    largest = max(passing, default=0)
    return [order.index(i) < largest for i in range(m)]


def test_heads_named_are_significant_after_fdr_control_and_large_enough(report_folder):
    """From results.json alone: each listed head is significant, by the saved p-values and a
    Benjamini-Hochberg control recomputed here over all the step's heads, at least --min-effect in
    size and of its role's sign; the heads of that sign that reach the floor but are not
    significant are counted."""
    data = json.loads((report_folder / "results.json").read_text())
    for step in (step for step in data["steps"] if step["top"]):
        z = step["results"]["z"]
        flat_p = [p for row in z["p_values"] for p in row]
        rejected = benjamini_hochberg(flat_p, SETTINGS.fdr)
        assert [s for row in z["significant"] for s in row] == rejected, step["key"]
        for role, heads in step["top"].items():
            sign = 1 if "raise" in role or "restoring" in role else -1
            for head in heads:
                layer, index = z["coords"]["layer"].index(head["layer"]), z["coords"]["head"].index(head["head"])
                assert head["significant"] is True and z["significant"][layer][index] is True
                assert head["p_value"] == pytest.approx(z["p_values"][layer][index])
                assert sign * head["value"] > 0 and abs(head["value"]) >= SETTINGS.min_effect
                assert head["ci_low"] < head["ci_high"] and head["stderr"] > 0
            floor = [
                z["significant"][i][j]
                for i in range(len(z["coords"]["layer"]))
                for j in range(len(z["coords"]["head"]))
                if sign * z["values"][i][j] > 0 and abs(z["values"][i][j]) >= SETTINGS.min_effect
            ]
            assert step["not_significant"][role] == floor.count(False)


def test_a_heads_p_value_is_the_exact_sign_flip_test_of_its_per_prompt_changes(analysis, tiny_model):
    """The strongest named head's p-value, recomputed here: each prompt's logit difference with
    the head patched, less the corrupted run's, and the share of the 2^5 sign patterns whose mean
    is at least as far from 0."""
    import itertools

    ds, corrupted = analysis.dataset, analysis.corrupted
    step = analysis.step("act_heads")
    head = next(heads[0] for heads in step.top.values() if heads)
    with torch.no_grad():
        unpatched = logit_diffs(tiny_model(corrupted.toks), ds)
    patched = act_patch(
        tiny_model,
        corrupted.toks,
        Node("z", head.layer, head=head.head),
        lambda logits: logit_diffs(logits, ds),
        new_input=ds.toks,
    )
    changes = (torch.as_tensor(patched).double() - unpatched.double()).tolist()
    observed = abs(sum(changes))
    extreme = sum(
        abs(sum(sign * change for sign, change in zip(signs, changes))) >= observed * (1 - 1e-6)
        for signs in itertools.product((1, -1), repeat=len(changes))
    )
    assert head.p_value == pytest.approx(extreme / 2 ** len(changes))


def test_the_circuit_is_saved_and_shown(analysis, report_folder, tiny_model, monkeypatch):
    """results.json and the EAP-IG files hold the circuit, its curves and the named heads' membership;
    the report lists every edge of the circuit and draws every one (a circuit of more than
    `DRAWN_EDGES`: its strongest, and it says so)."""
    finding = analysis.step("circuit").circuit
    saved = json.loads((report_folder / "results.json").read_text())["steps"][STEPS.index("circuit")]["circuit"]
    assert Circuit.from_json(json.dumps(saved["circuit"])) == finding.circuit
    graph = EdgeGraph.of(tiny_model)
    assert eap_ig_circuit((report_folder / "circuit.json").read_text(), graph) == finding.circuit
    scores = finding.scores[finding.chosen]
    read_back = eap_ig_scores((report_folder / "edge_scores.json").read_text(), graph)
    torch.testing.assert_close(read_back.scores, scores.scores.to(read_back.scores.dtype), rtol=1e-6, atol=0)
    assert [c["signed"]["faithfulness"] for c in saved["curves"]] == [
        pytest.approx(list(c.signed.faithfulness)) for c in finding.curves
    ]
    assert [c["absolute"]["faithfulness"] for c in saved["curves"]] == [
        pytest.approx(list(c.absolute.faithfulness)) for c in finding.curves
    ]
    assert [(c["cpr"], c["cmd"]) for c in saved["curves"]] == [
        (pytest.approx(c.cpr), pytest.approx(c.cmd)) for c in finding.curves
    ]
    assert (saved["scored_on"], saved["held_out"]) == ([0, 2, 4], [1, 3])
    named = [
        (step.key, head)
        for step in analysis.steps
        if step.key.startswith("path_")
        for heads in step.top.values()
        for head in heads
    ]
    kept = set(finding.circuit.heads)
    assert [h["in_circuit"] for h in saved["named_heads"]] == [(h.layer, h.head) in kept for _, h in named]
    page = (report_folder / "report.html").read_text()
    table = page.split('id="circuit-edges"')[1].split("</table>")[0]
    assert table.count("<tr><td>") == len(finding.circuit) > 1
    assert "<th>in resampled circuits</th>" in table and "<th>standard error</th>" in table
    listed = [abs(float(cell)) for cell in re.findall(r"<tr><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td>", table)]
    assert listed == sorted(listed, reverse=True), "strongest first"
    monkeypatch.setattr(job_figures, "DRAWN_EDGES", len(finding.circuit))
    figure = circuit_figure(finding)
    assert figure.layout.title.text.startswith(f"All {len(finding.circuit):,} edges of the circuit")
    assert len(figure.data[-2].hovertext) == len(finding.circuit), "one line per edge (no grouped heads here)"
    cap = len(finding.circuit) - 1
    monkeypatch.setattr(job_figures, "DRAWN_EDGES", cap)
    monkeypatch.setattr(report_page, "DRAWN_EDGES", cap)
    capped = circuit_figure(finding)
    assert capped.layout.title.text.startswith(f"The {cap:,} strongest of {len(finding.circuit):,} edges")
    drawn = {text.split("<br>")[0] for text in capped.data[-2].hovertext}
    left_out = [edge for edge in finding.circuit.edges if str(edge) not in drawn]
    strength = [abs(float(scores.score(edge))) for edge in finding.circuit.edges]
    assert len(left_out) == 1 and abs(float(scores.score(left_out[0]))) == min(strength), "the weakest is left out"
    section = report_page._circuit(finding)
    assert f"The figure draws the {cap:,} strongest edges" in section
    assert section.split('id="circuit-edges"')[1].count("<tr><td>") == len(finding.circuit), "the table has all"
    heads = page.split('id="named-heads"')[1].split("</table>")[0]
    assert heads.count("<tr><td>") == len(named) and heads.count("<td>yes</td>") == sum(
        h["in_circuit"] for h in saved["named_heads"]
    )


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's correlation of values without ties: Pearson's of their ranks."""
    ranks = [torch.tensor(values, dtype=torch.float64).argsort().argsort().double() for values in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def strongest(values: list[float], k: int) -> set[int]:
    return set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])


def test_the_estimators_agreement_with_the_exact_scores_is_saved_and_shown(analysis, report_folder, tiny_model):
    """The candidates (EAP-IG's strongest edges, scored exactly) have EAP's and EAP-IG's estimates
    and their exact scores: each estimator's Spearman correlation and top-k overlap with the exact
    scores over them (no forward pass), in results.json, the report and the step's description."""
    finding = analysis.step("circuit").circuit
    saved = json.loads((report_folder / "results.json").read_text())["steps"][STEPS.index("circuit")]["circuit"]
    eap, ig, confirmed = finding.scores
    candidates = finding.candidate_edges
    assert len(candidates) == finding.candidates == SETTINGS.circuit_candidates
    changed = [
        edge
        for edge in EdgeGraph.of(tiny_model)
        if not torch.equal(confirmed.score(edge), ig.score(edge).to(confirmed.scores))
    ]
    assert set(changed) == set(candidates), "the candidates are the edges scored exactly"
    agreement = saved["agreement"]
    k = min(10, (len(candidates) + 1) // 2)
    assert agreement["top_k"] == k
    assert [edge["edge"] for edge in agreement["edges"]] == [str(edge) for edge in candidates]
    exact = [float(confirmed.score(edge)) for edge in candidates]
    assert [edge["exact"] for edge in agreement["edges"]] == pytest.approx(exact)
    page = (report_folder / "report.html").read_text()
    table = page.split('id="estimator-agreement"')[1].split("</table>")[0]
    for row, name, scores in zip(agreement["estimators"], ("EAP", "EAP-IG (5 steps)"), (eap, ig), strict=True):
        estimate = [float(scores.score(edge)) for edge in candidates]
        assert [edge["estimates"][name] for edge in agreement["edges"]] == pytest.approx(estimate)
        assert row["estimator"] == name and row["method"] == scores.method
        assert row["spearman"] == pytest.approx(rank_correlation(estimate, exact))
        assert row["top_k_overlap"] == len(strongest(estimate, k) & strongest(exact, k))
        cells = f"<tr><td>{name}</td><td>{row['spearman']:.2f}</td><td>{row['top_k_overlap']} of {k}</td></tr>"
        assert cells in table
        assert f"{name}: Spearman {row['spearman']:.2f}, top-{k} overlap {row['top_k_overlap']} of {k}" in (
            analysis.step("circuit").description
        )


def test_the_circuits_stability_and_bands_are_saved_and_shown(analysis, report_folder, tiny_model):
    """The circuit found again on 50 bootstrap resamples of the scoring prompts (from the chosen
    ranking's per-prompt scores, no forward pass): each of its edges' inclusion frequency and the
    mean Jaccard overlap, in results.json and the report; every faithfulness curve with its 95%
    band (table, JSON and figure); the exactly confirmed scores keep their per-prompt values, and
    their means are the exact scores, recomputed here."""
    finding = analysis.step("circuit").circuit
    saved = json.loads((report_folder / "results.json").read_text())["steps"][STEPS.index("circuit")]["circuit"]
    stability = finding.stability
    assert stability.circuit == finding.circuit, "the same ranking, the same size"
    assert saved["stability"]["n_resamples"] == 50 and 0 <= saved["stability"]["mean_jaccard"] <= 1
    assert saved["stability"]["mean_jaccard"] == pytest.approx(float(stability.jaccard.mean()))
    edges = saved["circuit_edges"]
    assert [edge["edge"] for edge in edges] == saved["circuit"]["edges"]
    graph = finding.circuit.graph
    assert [edge["inclusion"] for edge in edges] == pytest.approx(
        [float(stability.inclusion[graph.index(edge)]) for edge in finding.circuit.edges]
    )
    assert all(0 <= edge["inclusion"] <= 1 and edge["ci_low"] <= edge["ci_high"] for edge in edges)
    for curve in saved["curves"]:
        for ranking in ("signed", "absolute"):
            band = curve[ranking]
            assert len(band["faithfulness_ci_low"]) == len(band["faithfulness"]) == len(band["faithfulness_stderr"])
            assert all(low <= high for low, high in zip(band["faithfulness_ci_low"], band["faithfulness_ci_high"]))
    low, high = saved["faithfulness_ci"]
    assert low <= high and saved["ci_level"] == 0.95
    page = (report_folder / "report.html").read_text()
    assert f"mean Jaccard index of <b>{stability.mean_jaccard:.2f}</b>" in page
    table = page.split('id="faithfulness"')[1].split("</table>")[0]
    assert table.count("<small>") == 3 * 2 * len(MIB_FRACTIONS), "an interval under every faithfulness"
    figure = faithfulness_figure(finding)
    bands = [trace for trace in figure.data if trace.fill == "toself"]
    assert len(bands) == 6 and all(len(band.x) == 2 * len(MIB_FRACTIONS) for band in bands)
    confirmed = finding.scores[2]
    assert confirmed.samples is not None and confirmed.samples.n == len(finding.scored_on)
    scoring = list(finding.scored_on)
    changed = next(
        edge
        for edge in graph
        if not torch.equal(confirmed.score(edge), finding.scores[1].score(edge).to(confirmed.scores))
    )
    kept = torch.ones(len(graph), dtype=torch.bool)
    kept[graph.index(changed)] = False
    metric = LogitDiff(analysis.dataset.answers[scoring], analysis.dataset.word_idx["end"][scoring])
    without, full = evaluate_circuit(
        tiny_model,
        [Circuit.from_mask(graph, kept), Circuit.full(graph)],
        analysis.dataset.toks[scoring],
        metric,
        new_input=analysis.corrupted.toks[scoring],
    ).tolist()
    assert float(confirmed.score(changed)) == pytest.approx(without - full, abs=1e-4)


def test_the_report_suggests_how_many_prompts_a_tighter_interval_takes(analysis, report_folder):
    """The strongest head's effect (step 2, z): the prompts its observed spread suggests for a
    95% interval of +-0.1, (1.96 sd / 0.1)^2 with sd the spread of its per-prompt influence."""
    z = analysis.step("act_heads").results["z"]
    strongest = int(z.as_tensor().abs().argmax())
    layer, head = z.coords["layer"][strongest // z.shape[1]], z.coords["head"][strongest % z.shape[1]]
    cell = z.sel(layer=layer, head=head)
    expected = int(cell.prompts_for(0.1))
    assert expected == pytest.approx((1.959964 * float(cell.stderr) * math.sqrt(SETTINGS.n_prompts) / 0.1) ** 2, abs=1)
    page = (report_folder / "report.html").read_text()
    note = page.split('id="prompts-needed"')[1].split("</p>")[0]
    assert f"head {layer}.{head}" in note and f"about <b>{expected}</b> prompts" in note


def test_report_html_is_self_contained(analysis, report_folder):
    page = (report_folder / "report.html").read_text()
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page), "no script or stylesheet is fetched"
    assert "Plotly" in page.split("</head>")[0], "plotly.js is inside the page"
    assert page.count('class="figure"') == figures(analysis)


def test_report_names_versions_threshold_and_answers(analysis, report_folder):
    import importlib.metadata

    page = (report_folder / "report.html").read_text()
    data = json.loads((report_folder / "results.json").read_text())
    expected = {
        "transformer_lens": importlib.metadata.version("transformer_lens"),
        "torch": torch.__version__,
        "transformer_lens_patching": importlib.metadata.version("transformer_lens_patching"),
    }
    assert {name: data["versions"][name] for name in expected} == expected
    versions = page.split('id="versions"')[1].split("</table>")[0]
    assert all(f"<td>{version}</td>" in versions for version in expected.values())
    assert data["complete"] is True and data["missing_steps"] == [] and "missing-steps" not in page
    assert "at least 0% of the clean - corrupted logit difference" in page
    table = page.split('id="confirmed-neurons"')[1].split("</table>")[0]
    confirmed = analysis.step("attr_neurons").confirmation.cells
    assert table.count("<tr><td>") == SETTINGS.top_neurons
    assert f"<tr><td>{confirmed[0].coords['layer']}</td><td>{confirmed[0].coords['neuron']}</td>" in table
    assert f"<td>{confirmed[0].exact_change:+.1%}</td>" in table
    for prompt in analysis.dataset.prompts[:5]:
        assert page.count(f"<mark>{prompt.io}</mark></td>") >= 2, "the answer is marked in both prompts"


def test_per_prompt_figure_pairs_clean_and_corrupted(analysis):
    figure = logit_diff_figure(analysis)
    traces = {trace.name: trace for trace in figure.data if trace.name}
    rows = [f"prompt {i}" for i in range(analysis.dataset.N)]
    for name, values, prompts in (
        ("clean", analysis.clean_logit_diff, analysis.dataset),
        ("corrupted", analysis.corrupted_logit_diff, analysis.corrupted),
    ):
        assert list(traces[name].y) == rows
        assert list(traces[name].x) == pytest.approx(values.tolist())
        assert list(traces[name].customdata) == prompts.sentences, "each point shows its own prompt on hover"
    joins = next(trace for trace in figure.data if trace.mode == "lines")
    pairs = [value for i in range(0, len(joins.x), 3) for value in joins.x[i : i + 2]]
    expected = zip(analysis.corrupted_logit_diff.tolist(), analysis.clean_logit_diff.tolist())
    assert pairs == pytest.approx([value for pair in expected for value in pair])
    data = json.loads(json.dumps(as_json(analysis)))
    for name in ("clean", "corrupted"):
        mean, saved = traces[f"{name} mean"], data[f"{name}_logit_diff"]
        assert list(mean.y) == ["mean (95% CI)"] and list(mean.x) == pytest.approx([saved["mean"]])
        assert mean.error_x.array[0] == pytest.approx(saved["ci_high"] - saved["mean"])
        assert mean.error_x.arrayminus[0] == pytest.approx(saved["mean"] - saved["ci_low"])


def test_head_heatmaps_name_each_head_on_hover(analysis):
    figure = step_figure(analysis.step("act_heads"))
    z = next(trace for trace in figure.data if trace.name == "z")
    assert z.text[23][3] == "23.3" and z.hovertemplate.startswith("head %{text}")
    assert list(figure.layout.yaxis.tickvals) == list(range(LAYERS)), "a tick per layer"


def test_the_neuron_figure_plots_estimate_against_exact(analysis):
    confirmation = analysis.step("attr_neurons").confirmation
    points = next(trace for trace in step_figure(analysis.step("attr_neurons")).data if trace.mode == "markers")
    assert list(points.x) == pytest.approx([cell.estimated_change for cell in confirmation.cells])
    assert list(points.y) == pytest.approx([cell.exact_change for cell in confirmation.cells])
    first = confirmation.cells[0].coords
    assert points.text[0] == f"L{first['layer']} N{first['neuron']}"


def rendered_in_chromium(page: Path) -> subprocess.CompletedProcess:
    """The DOM headless Chromium renders from `page` (its stderr holds the page's console); a test
    without Chromium is skipped, and fails under CI, where .ci/run installs it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    return subprocess.run(
        [browser, *arguments, "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_report_renders_in_headless_chromium(analysis, report_folder):
    run = rendered_in_chromium(report_folder / "report.html")
    assert run.returncode == 0, run.stderr[-2000:]
    rendered = re.findall(r'class="[^"]*js-plotly-plot[^"]*"', run.stdout)
    assert len(rendered) == figures(analysis), "every figure is drawn by plotly.js"
    assert run.stdout.count("main-svg") >= 2 * figures(analysis)
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "the page logs nothing to the console (no errors, no warnings)"
    for step in (step for step in analysis.steps if step.results and step.confirmation is None):
        drawn = run.stdout.split(f'id="fig-{step.key}"')[1].split('id="fig-')[0]
        for index, (name, result) in enumerate(step.results.items()):
            axis = "y" if index == 0 else f"y{index + 1}"
            ticks = re.findall(rf'<g class="{axis}tick"><text[^>]*data-unformatted="([^"]*)"', drawn)
            assert ticks == [str(layer) for layer in result.coords["layer"]], f"{step.key} {name}: a tick per layer"


def test_cli_explains_an_unloadable_model(capsys, tmp_path):
    status = main(["ioi", "--model", "gpt2", "--quiet", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("tl-patch: error: Cannot load model 'gpt2'") and "--model smollm2" in error
    assert "Traceback" not in error


def test_module_entry_point_prints_help():
    run = subprocess.run(
        [sys.executable, "-m", "transformer_lens_patching", "ioi", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0 and "--n-prompts" in run.stdout and "--out" in run.stdout
