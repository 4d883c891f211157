"""Exact edge scores and confirmed rankings: circuit discovery that checks its estimates.

An edge's exact score is what removing it alone from the full circuit changes the metric
by, which is path patching that one edge (`path_patch(..., direct_includes_mlps=False)`
minus the unpatched metric): one stacked variant per edge. `confirm_edges` computes it
for the strongest candidates of an estimate and puts it in their place, so that
`Circuit.from_scores` and `faithfulness_curve` rank the candidates by their exact effect.
"""

from collections.abc import Callable, Sequence

import torch

from .._core.circuit import Circuit
from .._core.distributed import shared_by_ranks
from .._core.graph import Edge, EdgeGraph, EdgeScores
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from .circuit_evaluation import evaluate_circuit

EDGES_PER_CALL = 512
"""Edges `exact_edge_scores` evaluates per `evaluate_circuit` call. Each edge's circuit holds a
mask over every edge of the graph, so the whole graph at once would hold edges x edges of them
(5 GB for SmolLM2's 70,651 edges); in chunks they stay small, and the chunks' passes stack
their circuits as one call's would."""


@shared_by_ranks
def exact_edge_scores(
    model,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    edges: Sequence[Edge] | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> EdgeScores:
    """Each edge's exact effect: the metric with only that edge ablated minus the orig metric.

    One circuit (the full graph less one edge) per edge, stacked as any sweep, `EDGES_PER_CALL`
    edges at a time; `edges` restricts the work to some edges (the others' scores are NaN, and
    rank last). The result has `attr_edges`' form (method "exact"), so estimates and exact scores
    compare edge for edge. `batch_size`, `max_memory` and `progress` are as in `evaluate_circuit`.

    >>> exact = exact_edge_scores(model, clean, metric, new_input=corrupted)
    """
    graph = EdgeGraph.of(model)
    chosen = list(graph.edges if edges is None else edges)
    if not chosen:
        raise PatchingError("exact_edge_scores needs at least one edge to score.")
    indices = [graph.index(edge) for edge in chosen]
    parts = []
    for start in range(0, len(indices), EDGES_PER_CALL):
        circuits = [_without(graph, index) for index in indices[start : start + EDGES_PER_CALL]]
        if start == 0:
            circuits.append(Circuit.full(graph))
        values = evaluate_circuit(
            model,
            circuits,
            orig_input,
            patching_metric,
            new_input,
            new_cache,
            batch_size=batch_size,
            max_memory=max_memory,
            progress=progress,
        ).as_tensor()
        if values.ndim > 2:
            raise PatchingError(
                f"Edge scores need a metric that returns one number, or one per prompt; this one returns "
                f"shape {tuple(values.shape[1:])}."
            )
        parts.append(values)
    unpatched = parts[0][-1]
    removed = torch.cat([parts[0][:-1], *parts[1:]])
    scores = torch.full((len(graph), *removed.shape[1:]), float("nan"), dtype=removed.dtype)
    scores[indices] = removed - unpatched
    return EdgeScores(graph, scores, "exact", unpatched if unpatched.ndim else float(unpatched))


def _without(graph: EdgeGraph, index: int) -> Circuit:
    """The full circuit less the edge at `index`."""
    kept = torch.ones(len(graph), dtype=torch.bool)
    kept[index] = False
    return Circuit.from_mask(graph, kept)


@shared_by_ranks
def confirm_edges(
    model,
    scores: EdgeScores,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    candidates: int,
    absolute: bool = True,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> EdgeScores:
    """`scores` with the `candidates` strongest edges' estimates replaced by their exact scores.

    The exact scores (as `exact_edge_scores`) re-rank the candidates among themselves and
    against the rest; edges outside them keep their estimates. Method: e.g. "ig+exact".
    `batch_size`, `max_memory` and `progress` are as in `evaluate_circuit`. The result keeps
    no per-prompt values (`samples`), even of scores that had them: for the exact scores' own,
    evaluate the circuits with a per-prompt metric.

    >>> confirmed = confirm_edges(model, scores, clean, metric, new_input=corrupted, candidates=50)
    >>> circuit = Circuit.from_scores(confirmed, 200)
    """
    if not isinstance(scores, EdgeScores):
        raise PatchingError(f"confirm_edges needs EdgeScores (e.g. from attr_edges), got {type(scores).__name__}.")
    if scores.graph != EdgeGraph.of(model):
        raise PatchingError(f"These scores are of {scores.graph!r}, not of this model's edge graph.")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= len(scores.graph):
        raise PatchingError(
            f"candidates must be an int from 1 to the graph's {len(scores.graph)} edges, got {candidates!r}."
        )
    chosen = scores.top(candidates, absolute)
    exact = exact_edge_scores(
        model,
        orig_input,
        patching_metric,
        new_input,
        new_cache,
        edges=chosen,
        batch_size=batch_size,
        max_memory=max_memory,
        progress=progress,
    )
    if exact.scores.shape[1:] != scores.scores.shape[1:]:
        raise PatchingError(
            "The scores and this metric differ in being per prompt: pass the metric the scores were estimated with."
        )
    rows = torch.tensor([scores.graph.index(edge) for edge in chosen])
    merged = scores.scores.clone().to(exact.scores.dtype)
    merged[rows] = exact.scores[rows]
    return EdgeScores(scores.graph, merged, f"{scores.method}+exact", exact.unpatched)
