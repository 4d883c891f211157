"""Faithfulness curves: how much of the model's behaviour circuits of growing size recover.

As the Mechanistic Interpretability Benchmark (MIB, Mueller et al. 2025) defines it, a
circuit's faithfulness is `(m(circuit) - m(empty)) / (m(full) - m(empty))`, `m` the metric
averaged over prompts; the curve takes the strongest edges of some scores at each size
(a fraction of the graph's edges), pruned of dangling edges. CPR is the area under the
curve and CMD the area between the curve and 1, each by the trapezoidal rule over the
fractions (MIB: 0.1% to 100%).
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .._core.circuit import Circuit, edge_count
from .._core.distributed import shared_by_ranks
from .._core.graph import EdgeScores
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from .circuits import evaluate_circuit

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes of MIB's curves: fractions of the graph's edges."""


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness at each circuit size, with the circuits and the metric values behind it.

    Attributes:
        method: What ranked the edges (the scores' method, e.g. "atp", "ig", "exact").
        fractions: Each circuit's size as a fraction of the graph's edges (the curve's x).
        circuits: The circuit evaluated at each size (top edges, pruned if asked).
        values: The metric (mean over prompts) of each circuit.
        full: The metric with every edge kept (the orig run).
        empty: The metric with every edge ablated.
    """

    method: str
    fractions: tuple[float, ...]
    circuits: tuple[Circuit, ...]
    values: tuple[float, ...]
    full: float
    empty: float

    @property
    def faithfulness(self) -> tuple[float, ...]:
        """`(value - empty) / (full - empty)` at each size: 0 is the ablated run, 1 the model."""
        return tuple((value - self.empty) / (self.full - self.empty) for value in self.values)

    @property
    def edge_counts(self) -> tuple[int, ...]:
        """The edges each circuit kept (after pruning, fewer than the size may remain)."""
        return tuple(len(circuit) for circuit in self.circuits)

    @property
    def cpr(self) -> float:
        """Area under the faithfulness curve over the fractions (MIB's CPR: higher is better)."""
        return _trapezoid(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        """Area between the curve and 1 over the fractions (MIB's CMD: lower is better)."""
        return _trapezoid(self.fractions, [abs(1.0 - f) for f in self.faithfulness])

    def to_frame(self):
        """A pandas DataFrame, one row per size: `method`, `fraction`, `requested_edges`
        (the size in edges), `edges` (kept after pruning), `metric`, `faithfulness`."""
        import pandas as pd

        n_edges = len(self.circuits[0].graph)
        return pd.DataFrame({
            "method": [self.method] * len(self.fractions),
            "fraction": list(self.fractions),
            "requested_edges": [edge_count(f, n_edges) for f in self.fractions],
            "edges": list(self.edge_counts),
            "metric": list(self.values),
            "faithfulness": list(self.faithfulness),
        })  # fmt: skip

    def __repr__(self) -> str:
        points = ", ".join(f"{f:g}: {v:.3f}" for f, v in zip(self.fractions, self.faithfulness))
        return f"FaithfulnessCurve({self.method}: CPR {self.cpr:.4f}, CMD {self.cmd:.4f}; {points})"


@shared_by_ranks
def faithfulness_curve(
    model,
    scores: EdgeScores,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    sizes: Sequence[float | int] = MIB_FRACTIONS,
    absolute: bool = True,
    prune: bool = True,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> FaithfulnessCurve:
    """The faithfulness of the strongest edges of `scores` at each size, evaluated exactly.

    Each circuit is `Circuit.from_scores(scores, size, absolute=absolute, prune=prune)`; all
    of them, the full and the empty circuit run stacked in one `evaluate_circuit` call.

    Args:
        scores: Edge scores of this model (`attr_edges`, `confirm_edges`, `exact_edge_scores`).
        sizes: Circuit sizes, increasing: fractions of the graph's edges (floats in (0, 1]) or
            edge counts (ints). The curve's x is the fraction either way.
        absolute: Rank edges by |score| (else by most negative score), as in
            `Circuit.from_scores`. MIB's CPR ranks by signed score, its CMD by |score|.
        prune: Drop the edges that no longer connect the embeddings to the logits.
        orig_input: As in `evaluate_circuit`.
        patching_metric: As in `evaluate_circuit`; a per-prompt metric is averaged over prompts.
        new_input: As in `evaluate_circuit`.
        new_cache: As in `evaluate_circuit`.
        batch_size: As in `evaluate_circuit`.
        max_memory: As in `evaluate_circuit`.

    >>> curve = faithfulness_curve(model, attr_edges(model, clean, metric, new_input=corrupted),  # doctest: +SKIP
    ...                            clean, metric, new_input=corrupted)
    >>> curve.cpr, curve.cmd  # doctest: +SKIP
    """
    if not isinstance(scores, EdgeScores):
        raise PatchingError(f"faithfulness_curve needs EdgeScores (e.g. from attr_edges), got {type(scores).__name__}.")
    graph = scores.graph
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise PatchingError(f"sizes must be a list of at least two circuit sizes in increasing order, got {sizes!r}.")
    sizes = [size.item() if hasattr(size, "item") else size for size in sizes]  # numpy or torch scalars too
    for size in sizes:
        edge_count(size, len(graph))
    fractions = tuple(size if isinstance(size, float) else size / len(graph) for size in sizes)
    if len(fractions) < 2 or any(later <= earlier for earlier, later in zip(fractions, fractions[1:])):
        raise PatchingError(
            f"sizes must be at least two circuit sizes in increasing order (the curve's x runs left to right), "
            f"got {sizes!r}."
        )
    circuits = [Circuit.from_scores(scores, size, absolute=absolute, prune=prune) for size in sizes]
    evaluated = evaluate_circuit(model, [*circuits, Circuit.full(graph), Circuit.empty(graph)], orig_input,
                                 patching_metric, new_input, new_cache, batch_size=batch_size,
                                 max_memory=max_memory)  # fmt: skip
    values = evaluated.as_tensor().float()
    values = values.reshape(values.shape[0], -1).mean(1).tolist()
    full, empty = values[-2], values[-1]
    if math.isclose(full, empty, rel_tol=1e-5, abs_tol=1e-6):
        raise PatchingError(f"The full and the empty circuit give the same metric ({full:.6g}, to float rounding), "
                            "so faithfulness, a fraction of their difference, is undefined: the ablation changes "
                            "nothing.")  # fmt: skip
    return FaithfulnessCurve(scores.method, fractions, tuple(circuits), tuple(values[:-2]), full, empty)


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(torch.trapezoid(torch.tensor(list(ys), dtype=torch.float64), torch.tensor(list(xs), dtype=torch.float64)))
