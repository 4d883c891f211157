"""The job's circuit step: score every edge, evaluate circuits exactly, pick one.

As MIB does, the prompts are split: every edge of the model's graph is scored on half of
them (`split`), by EAP and EAP-IG (`attr_edges`), and the EAP-IG ranking's strongest
candidates are re-scored exactly (`confirm_edges`); faithfulness is measured on the other,
held-out half. Each ranking gets MIB's CPR and CMD (`mib_faithfulness`: circuits at MIB's
sizes, every one evaluated exactly on the held-out clean prompts with every other edge
resampled from their corrupted twins). The circuit is chosen on the scoring prompts alone:
of the ranking whose signed curve has the largest area there, the smallest circuit whose
faithfulness there reaches the faithfulness asked for; its held-out faithfulness is reported
next to it. The candidates' exact scores also measure how well each estimator ranks them
(`CircuitFinding.agreement`, no forward pass).

Every number keeps its per-prompt values (`uncertainty=True`, no extra forward pass): the edge
scores (the exact ones too), so that the circuit can be found again on bootstrap resamples of the
scoring prompts (`tlp.circuit_stability`: how often each edge is in it), and the curves, whose
faithfulness at each size gets a confidence band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import transformer_lens_patching as tlp

from ...metrics import LogitDiff
from ...results import PatchResult
from .uncertainty import CI_LEVEL, CI_RESAMPLES, ci_method

IG_STEPS = 5
"""The integrated-gradients points of the EAP-IG ranking."""
RANKINGS = ("EAP", f"EAP-IG ({IG_STEPS} steps)", "EAP-IG, candidates confirmed exactly")
"""The rankings the step compares, in the order of `CircuitFinding.curves`."""
ESTIMATORS = RANKINGS[:2]
"""The rankings by estimates alone (EAP, EAP-IG), whose agreement with the exact scores the step measures."""
AGREEMENT_TOP = 10
"""The k of the estimators' top-k overlap with the exact scores (half the candidates where fewer than 20)."""
STABILITY_RESAMPLES = 50
"""The bootstrap resamples of the scoring prompts on which the circuit is found again."""
EDGE_SCREEN_PASSES = 2 + 3 * (1 + IG_STEPS)
"""The edge scores' work in forward passes of the scoring prompts, for the time estimate: the
corrupted run for each method, and a forward and a backward pass (about two forwards) for
EAP and for each of EAP-IG's points."""


@dataclass(frozen=True)
class CircuitFinding:
    """What the circuit step found.

    Attributes:
        curves: MIB's summaries (both curves, CPR and CMD) of each ranking of `RANKINGS`, on the
            held-out prompts.
        scores: The edge scores of each ranking, on the scoring prompts.
        selection: Each ranking's signed curve on the scoring prompts, which choose the circuit.
        chosen: The index (into `curves`) of the ranking the circuit comes from: the largest
            area under its selection curve.
        circuit: The smallest circuit of that selection curve with at least `target`
            faithfulness (the most faithful one if none reaches it).
        faithfulness: The circuit's faithfulness on the held-out prompts.
        chosen_faithfulness: Its faithfulness on the scoring prompts, which chose it.
        target: The faithfulness asked for (`JobSettings.circuit_faithfulness`).
        candidates: How many of the EAP-IG ranking's strongest edges were scored exactly.
        scored_on: The prompts (indices) that scored the edges.
        held_out: The prompts (indices) that measured faithfulness.
        candidate_edges: The edges scored exactly, EAP-IG's strongest first.
        size: The circuit's size on the selection curve: a fraction of the graph's edges, as
            `Circuit.from_scores` takes it (before pruning).
        stability: The circuit found again, with the same ranking and size, on
            `STABILITY_RESAMPLES` bootstrap resamples of the scoring prompts: each edge's
            inclusion frequency and the circuits' Jaccard overlap with it; None with fewer than
            two scoring prompts, which leave nothing to resample.
        edge_errors: The standard error and `CI_LEVEL` interval (low, high) of the score of each
            of the circuit's edges (in `circuit.edges` order), over the scoring prompts; None
            with fewer than two.
    """

    curves: tuple[tlp.MIBFaithfulness, ...]
    scores: tuple[tlp.EdgeScores, ...]
    selection: tuple[tlp.FaithfulnessCurve, ...]
    chosen: int
    circuit: tlp.Circuit
    faithfulness: float
    chosen_faithfulness: float
    target: float
    candidates: int
    scored_on: tuple[int, ...]
    held_out: tuple[int, ...]
    candidate_edges: tuple[tlp.Edge, ...]
    size: float = 1.0
    stability: tlp.CircuitStability | None = None
    edge_errors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def method(self) -> str:
        return RANKINGS[self.chosen]

    @property
    def agreement(self) -> tuple[tlp.Confirmation, ...]:
        """Each of `ESTIMATORS`' scores of the candidates beside their exact scores, as a
        `tlp.Confirmation` (cells ordered by the estimate's size, each cell's `coords` its edge's
        index in the graph): its `spearman` and `overlap` say how well the estimate ranks them."""
        exact = self.scores[-1]
        return tuple(_confirmation(scores, exact, self.candidate_edges) for scores in self.scores[: len(ESTIMATORS)])

    @property
    def overlap_size(self) -> int:
        """The k of the estimators' top-k overlap: `AGREEMENT_TOP`, or with fewer than twice as many
        candidates, half of them (rounded up, as `Confirmation.overlap_size`), so that it is not all."""
        return min(AGREEMENT_TOP, (len(self.candidate_edges) + 1) // 2)


def split(n_prompts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The prompts that score the edges and the held-out prompts that measure faithfulness:
    every other prompt (0, 2, 4, ... and 1, 3, 5, ...). The job's prompts are drawn
    independently of each other, so the two halves are two samples of the same kind.

    >>> split(5)
    ((0, 2, 4), (1, 3))
    """
    return tuple(range(0, n_prompts, 2)), tuple(range(1, n_prompts, 2))


def describe(finding: CircuitFinding, graph_size: int) -> str:
    """The step's description: what ran, and what it found."""
    curves = "; ".join(f"{method}: CPR {c.cpr:.3f}, CMD {c.cmd:.3f}" for method, c in zip(RANKINGS, finding.curves))
    return (
        f"The prompts split in two, as MIB does: {len(finding.scored_on)} score the edges (prompts "
        f"{_indices(finding.scored_on)}) and the other {len(finding.held_out)} measure faithfulness (prompts "
        f"{_indices(finding.held_out)}). Every one of the model's {graph_size:,} edges scored by EAP and EAP-IG "
        f"({IG_STEPS} steps), clean prompts with each edge resampled from the corrupted ones; the EAP-IG ranking's "
        f"{finding.candidates} strongest edges then scored exactly (each removed alone). For each ranking, "
        f"circuits of its strongest edges at MIB's sizes ({', '.join(f'{f:g}' for f in tlp.MIB_FRACTIONS)} of the "
        "edges, pruned of dangling edges), ranked by signed score (the edges whose removal lowers the logit "
        "difference most) and by |score|, evaluated exactly on the held-out prompts: the clean run with every "
        "edge outside the circuit resampled from the corrupted run. Faithfulness: (circuit - empty) / "
        "(full - empty) of the mean logit difference. MIB's CPR is the area under the signed ranking's curve "
        "(higher is better), its CMD the area between 1 and the |score| ranking's curve (lower is better). "
        f"{curves}. Circuit, chosen on the scoring prompts alone (the same curves evaluated there, signed ranking): "
        + (
            f"the smallest of the best ranking ({finding.method}) with faithfulness at least {finding.target:.0%}"
            if finding.chosen_faithfulness >= finding.target
            else f"no circuit of the best ranking ({finding.method}) reaches faithfulness {finding.target:.0%}; "
            "its most faithful one"
        )
        + f": {len(finding.circuit):,} edges, faithfulness {finding.chosen_faithfulness:.3f} on the scoring prompts "
        f"and {finding.faithfulness:.3f} on the held-out ones. {_agreement_sentence(finding)}"
    )


def _agreement_sentence(finding: CircuitFinding) -> str:
    """How well each estimator ranks the candidates, against their exact scores."""
    k = finding.overlap_size
    each = "; ".join(
        f"{method}: Spearman {_correlation(confirmation.spearman)}, top-{k} overlap {confirmation.overlap(k)} of {k}"
        for method, confirmation in zip(ESTIMATORS, finding.agreement)
    )
    return f"Against the exact scores of the {finding.candidates} candidates: {each}."


def _correlation(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def find_circuit(
    model,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: LogitDiff,
    candidates: int,
    target: float,
    batch_size: int | None,
) -> CircuitFinding:
    """Split, score, confirm, evaluate and pick, as the module says; `metric` is the raw logit
    difference of all the prompts."""
    scored_on, held_out = split(clean.shape[0])
    clean_s, corrupted_s, metric_s = _prompts(clean, corrupted, metric, scored_on)
    clean_h, corrupted_h, metric_h = _prompts(clean, corrupted, metric, held_out)
    eap = tlp.attr_edges(model, orig_input=clean_s, patching_metric=metric_s, new_input=corrupted_s, uncertainty=True)
    ig = tlp.attr_edges(
        model,
        orig_input=clean_s,
        patching_metric=metric_s,
        new_input=corrupted_s,
        method="ig",
        steps=IG_STEPS,
        uncertainty=True,
    )
    confirmed, candidate_edges = _confirmed(
        model, ig, clean_s, corrupted_s, metric_s, min(candidates, len(ig.graph)), batch_size
    )
    scores = (eap, ig, confirmed)
    selection = tuple(
        tlp.faithfulness_curve(
            model,
            s,
            orig_input=clean_s,
            patching_metric=metric_s,
            new_input=corrupted_s,
            absolute=False,
            uncertainty=True,
            batch_size=batch_size,
        )
        for s in scores
    )
    curves = tuple(
        tlp.mib_faithfulness(
            model,
            s,
            orig_input=clean_h,
            patching_metric=metric_h,
            new_input=corrupted_h,
            uncertainty=True,
            batch_size=batch_size,
        )
        for s in scores
    )
    chosen = max(range(len(selection)), key=lambda i: selection[i].area_under)
    chooser = selection[chosen]
    reaching = [i for i, f in enumerate(chooser.faithfulness) if f >= target]
    index = reaching[0] if reaching else max(range(len(chooser.fractions)), key=lambda i: chooser.faithfulness[i])
    size = chooser.fractions[index]
    stability = (
        tlp.circuit_stability(scores[chosen], size, n_resamples=STABILITY_RESAMPLES, absolute=False, prune=True)
        if len(scored_on) >= 2
        else None
    )
    return CircuitFinding(
        curves,
        scores,
        selection,
        chosen,
        chooser.circuits[index],
        curves[chosen].signed.faithfulness[index],
        chooser.faithfulness[index],
        target,
        min(candidates, len(ig.graph)),
        scored_on,
        held_out,
        tuple(candidate_edges),
        size,
        stability,
        _edge_errors(scores[chosen], chooser.circuits[index]),
    )


def _confirmed(
    model,
    ig: tlp.EdgeScores,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: LogitDiff,
    candidates: int,
    batch_size: int | None,
) -> tuple[tlp.EdgeScores, list[tlp.Edge]]:
    """`ig` with its `candidates` strongest edges scored exactly (`confirm_edges`), keeping every
    score's per-prompt values: the exact scores are measured per prompt (the same circuits, the
    same passes; their mean is the mean metric's score), merged into IG's per-prompt scores; and
    those edges, strongest first, as `confirm_edges` picks them."""
    per_prompt_metric = LogitDiff(metric.answers, metric.positions, per_prompt=True)
    per_prompt_ig = tlp.EdgeScores(ig.graph, ig.samples.values.float(), ig.method, ig.unpatched)
    merged = tlp.confirm_edges(
        model,
        per_prompt_ig,
        orig_input=clean,
        patching_metric=per_prompt_metric,
        new_input=corrupted,
        candidates=candidates,
        batch_size=batch_size,
    )
    kept = PatchResult.from_per_prompt(
        PatchResult(merged.scores, ("edge", "batch")), baseline=torch.zeros(merged.scores.shape[1])
    )
    unpatched = merged.unpatched
    unpatched = float(unpatched.double().mean()) if isinstance(unpatched, torch.Tensor) else float(unpatched)
    scores = tlp.EdgeScores(ig.graph, kept.as_tensor().float(), merged.method, unpatched, kept.samples)
    return scores, per_prompt_ig.top(candidates)


def _confirmation(estimate: tlp.EdgeScores, exact: tlp.EdgeScores, edges: tuple[tlp.Edge, ...]) -> tlp.Confirmation:
    """`estimate`'s scores of `edges` beside their `exact` ones, as `tlp.confirm` gives cells: the
    largest estimate in size first (ties in the order of `edges`)."""
    unpatched = float(exact.unpatched)
    pairs = sorted(
        ((edge, float(estimate.score(edge)), float(exact.score(edge))) for edge in edges), key=lambda p: -abs(p[1])
    )
    cells = tuple(
        tlp.ConfirmedCell("edge", {"edge": exact.graph.index(edge)}, unpatched + guess, unpatched + value, guess, value)
        for edge, guess, value in pairs
    )
    return tlp.Confirmation(cells, unpatched, len(exact.graph), per_prompt=True)


def _edge_errors(
    scores: tlp.EdgeScores, circuit: tlp.Circuit
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The standard error and interval of the score of each of the circuit's edges, from the scores'
    per-prompt values; None with fewer than two prompts."""
    samples = scores.samples
    if samples is None or samples.n < 2 or not len(circuit):
        return None
    rows = torch.tensor([scores.graph.index(edge) for edge in circuit.edges], dtype=torch.long)
    edges = PatchResult.from_per_prompt(
        PatchResult(samples.values[rows], ("edge", "batch")),
        offset=samples.offset,
        scale=samples.scale,
        baseline=samples.baseline,
    )
    low, high = edges.ci(CI_LEVEL, ci_method(samples.n, len(rows)), n_resamples=CI_RESAMPLES)
    return edges.stderr.as_tensor(), low.as_tensor(), high.as_tensor()


def evaluation_plans(
    model, clean: torch.Tensor, corrupted: torch.Tensor, metric: LogitDiff, candidates: int, batch_size: int | None
) -> dict[str, tlp.PatchPlan]:
    """The step's exact evaluations as plans, by label, for the time estimate: as many circuits as
    it evaluates, on the prompts it evaluates them on (their edges are known only once scored; the
    work does not depend on them)."""
    graph = tlp.EdgeGraph.of(model)
    placeholder = tlp.Circuit.empty(graph)
    scored_on, held_out = split(clean.shape[0])
    confirmations = min(candidates, len(graph)) + 1
    selection = len(RANKINGS) * (len(tlp.MIB_FRACTIONS) + 2)
    curves = len(RANKINGS) * (2 * len(tlp.MIB_FRACTIONS) + 2)
    plans = {}
    for label, indices, circuits in (
        ("circuit, exact scores of the candidates", scored_on, confirmations),
        ("circuit, choosing on the scoring prompts", scored_on, selection),
        ("circuit, faithfulness curves", held_out, curves),
    ):
        clean_part, corrupted_part, metric_part = _prompts(clean, corrupted, metric, indices)
        plans[label] = tlp.plan_circuit_evaluation(
            model,
            [placeholder] * circuits,
            orig_input=clean_part,
            patching_metric=metric_part,
            new_input=corrupted_part,
            uncertainty=True,
            batch_size=batch_size,
        )
    return plans


def _prompts(clean: torch.Tensor, corrupted: torch.Tensor, metric: LogitDiff, indices: tuple[int, ...]):
    """The clean and corrupted prompts of `indices`, and the logit difference read on them."""
    rows = torch.tensor(indices, dtype=torch.long)
    positions = None if metric.positions is None else metric.positions[rows]
    return clean[rows], corrupted[rows], LogitDiff(metric.answers[rows], positions)


def _indices(indices: tuple[int, ...]) -> str:
    """'0, 2, 4'."""
    return ", ".join(str(i) for i in indices)
