"""The IOI analysis' circuit step: score every edge, evaluate circuits exactly, pick one.

Every edge of the model's graph is scored by EAP and EAP-IG (`attr_edges`), and the
EAP-IG ranking's strongest candidates are re-scored exactly (`confirm_edges`). Each
ranking gives a faithfulness curve over MIB's circuit sizes, every circuit evaluated
exactly on the clean prompts with every other edge resampled from the corrupted ones;
the discovered circuit is the smallest of the best curve (highest CPR) that reaches the
faithfulness asked for.
"""

from dataclasses import dataclass

import torch

from ... import _tl
from ..._core.circuit import Circuit
from ..._core.graph import EdgeGraph, EdgeScores
from ..._core.plan import PatchPlan
from ..._methods.circuit_discovery import confirm_edges
from ..._methods.circuits import plan_circuit_evaluation
from ..._methods.edges import attr_edges
from ..._methods.faithfulness import MIB_FRACTIONS, FaithfulnessCurve, faithfulness_curve
from ..._methods.path_rules import nonlinear_writes

IG_STEPS = 5
"""The integrated-gradients points of the EAP-IG ranking."""
METHODS = ("EAP", f"EAP-IG ({IG_STEPS} steps)", "EAP-IG, candidates confirmed exactly")
"""The rankings the step compares, in the order of `CircuitFinding.curves`."""


@dataclass(frozen=True)
class CircuitFinding:
    """What the circuit step found.

    Attributes:
        curves: One faithfulness curve per ranking of `METHODS`.
        scores: The edge scores of each ranking.
        chosen: The index (into `curves`) of the ranking the circuit comes from: the highest CPR.
        circuit: The smallest circuit of that curve with at least `target` faithfulness (the
            most faithful one if none reaches it).
        faithfulness: The circuit's faithfulness.
        target: The faithfulness asked for (`IOISettings.circuit_faithfulness`).
        candidates: How many of the EAP-IG ranking's strongest edges were scored exactly.
    """

    curves: tuple[FaithfulnessCurve, ...]
    scores: tuple[EdgeScores, ...]
    chosen: int
    circuit: Circuit
    faithfulness: float
    target: float
    candidates: int

    @property
    def method(self) -> str:
        return METHODS[self.chosen]


def supported(model) -> bool:
    """Whether this step runs on `model` (see `why_not_supported`)."""
    return why_not_supported(model) is None


def why_not_supported(model) -> str | None:
    """Why this step cannot run on `model`, or None: it needs per-head q/k/v input hooks, blocks
    that are not parallel (the step is not yet checked on them) and senders whose writes are
    linear in their outputs (no post-norm blocks)."""
    if not _tl.supports_split_qkv_input(model):
        return "this model has no per-head q/k/v input hooks (a TransformerBridge from boot_native), which circuit "\
               "evaluation edits"  # fmt: skip
    if getattr(model.cfg, "parallel_attn_mlp", False):
        return "this model computes attention and MLP in parallel, where this step is not yet checked"
    reason = nonlinear_writes(model)
    return None if reason is None else f"{reason}; circuit evaluation refuses it"


def describe(finding: CircuitFinding, graph_size: int) -> str:
    """The step's description: what ran, and what it found."""
    curves = "; ".join(f"{method}: CPR {c.cpr:.3f}, CMD {c.cmd:.3f}" for method, c in zip(METHODS, finding.curves))
    return (
        f"Every one of the model's {graph_size:,} edges scored by EAP and EAP-IG ({IG_STEPS} steps), clean prompts "
        f"with each edge resampled from the corrupted ones; the EAP-IG ranking's {finding.candidates} strongest "
        "edges then scored exactly (each removed alone). For each ranking, circuits of its strongest edges at "
        f"MIB's sizes ({', '.join(f'{f:g}' for f in MIB_FRACTIONS)} of the edges, pruned of dangling edges) "
        "evaluated exactly: the clean run with every edge outside the circuit resampled from the corrupted run. "
        "Faithfulness: (circuit - empty) / (full - empty) of the mean logit difference. "
        f"{curves}. Circuit: " + (
            f"the smallest of the best ranking ({finding.method}) with faithfulness at least {finding.target:.0%}"
            if finding.faithfulness >= finding.target else
            f"no circuit of the best ranking ({finding.method}) reaches faithfulness {finding.target:.0%}; its most "
            "faithful one"
        ) + f": {len(finding.circuit):,} edges, faithfulness {finding.faithfulness:.3f}."
    )  # fmt: skip


def find_circuit(model, clean: torch.Tensor, corrupted: torch.Tensor, metric, candidates: int, target: float,
                 batch_size: int | None) -> CircuitFinding:  # fmt: skip
    """Score, confirm, evaluate and pick, as the module says; `metric` is the raw logit difference."""
    options = {"new_input": corrupted, "batch_size": batch_size}
    eap = attr_edges(model, clean, metric, new_input=corrupted)
    ig = attr_edges(model, clean, metric, new_input=corrupted, method="ig", steps=IG_STEPS)
    confirmed = confirm_edges(model, ig, clean, metric, candidates=min(candidates, len(ig.graph)), **options)
    scores = (eap, ig, confirmed)
    curves = tuple(faithfulness_curve(model, s, clean, metric, **options) for s in scores)
    chosen = max(range(len(curves)), key=lambda i: curves[i].cpr)
    curve = curves[chosen]
    reaching = [i for i, f in enumerate(curve.faithfulness) if f >= target]
    index = reaching[0] if reaching else max(range(len(curve.fractions)), key=lambda i: curve.faithfulness[i])
    return CircuitFinding(curves, scores, chosen, curve.circuits[index], curve.faithfulness[index], target,
                          min(candidates, len(ig.graph)))  # fmt: skip


def circuit_plans(model, clean: torch.Tensor, corrupted: torch.Tensor, metric, candidates: int,
                  batch_size: int | None) -> list[tuple[str, PatchPlan]]:  # fmt: skip
    """The step's exact evaluations as plans, for the time estimate: as many circuits as it
    evaluates (their edges are known only once scored; the work does not depend on them)."""
    graph = EdgeGraph.of(model)
    placeholder = Circuit.empty(graph)
    confirmations = min(candidates, len(graph)) + 1
    curve = len(MIB_FRACTIONS) + 2
    options = {"new_input": corrupted, "batch_size": batch_size}
    return [
        ("circuit, exact scores of the candidates",
         plan_circuit_evaluation(model, [placeholder] * confirmations, clean, metric, **options)),
        ("circuit, faithfulness curves", plan_circuit_evaluation(model, [placeholder] * (3 * curve), clean, metric,
                                                                 **options)),
    ]  # fmt: skip


SCREEN_PASSES = 2 + 3 * (1 + IG_STEPS)
"""The edge scores' work in forward passes of the prompts, for the time estimate: the
corrupted run for each method, and a forward and a backward pass (about two forwards) for
EAP and for each of EAP-IG's points."""
